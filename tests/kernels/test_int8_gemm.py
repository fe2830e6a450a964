"""int8 GEMMs and quantizers (``graphopt.kernels.int8_gemm``) against exact and float64 references.

* ``int8_matmul_i32`` must equal the int64 product of the same codes exactly (checked to lie in
  the int32 range first);
* ``int8_linear`` and ``w8a16_linear`` are compared with the same formula in float64, with
  per-output-dtype tolerances; requantized int8 outputs must match ``round(ref / out_scale)``
  exactly except within 1e-3 of a .5 tie, where fp32 rounding may pick the other neighbour;
* the quantizers must equal ``torch.round(x.float() / scale).clamp(-127, 127)`` bit for bit.

Without a GPU the kernels run under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``)
on small, odd-shaped CPU tensors with one small tile config. bfloat16 ``w8a16`` tiles are
upcast to fp32 before ``tl.dot`` there (the interpreter multiplies bfloat16 bits as uint16), so
the bfloat16 tensor-core dot, like the int8 tensor-core dot and the autotuned configs, is only
covered by the ``gpu`` tests at full size.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.kernels import int8_gemm
from graphopt.kernels.activations import ACTIVATIONS
from graphopt.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 1e-2},
}
# w8a16 multiplies x's dtype on the tensor cores (fp32 accumulation): looser than the int8 path.
W8A16_TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float16: {"rtol": 1e-2, "atol": 2e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}
INT32 = torch.iinfo(torch.int32)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _codes(*shape: int, device: str = DEVICE) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=device)


def _int_reference(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    if xq.device.type == "cpu":
        ref = xq.long() @ wq.long().T
    else:  # no integer matmul on CUDA; float64 is exact below 2**53
        ref = (xq.double() @ wq.double().T).long()
    assert INT32.min <= ref.min() and ref.max() <= INT32.max
    return ref


def _assert_exact_i32(got: torch.Tensor, xq: torch.Tensor, wq: torch.Tensor) -> None:
    assert got.dtype == torch.int32 and got.shape == (*xq.shape[:-1], wq.shape[0])
    assert torch.equal(got.long(), _int_reference(xq, wq))


def _scales(m: int, n: int, per_token: bool, device: str = DEVICE):  # type: ignore[no-untyped-def]
    # Pre-activations of a few units for K ~ 40: every activation's non-linear part is reached.
    xs = (torch.rand(m if per_token else 1, device=device) + 0.5) * 0.02
    ws = (torch.rand(n, device=device) + 0.5) * 0.002
    return xs, ws


def _linear_reference(
    xq: torch.Tensor,
    wq: torch.Tensor,
    xs: torch.Tensor,
    ws: torch.Tensor,
    bias: torch.Tensor | None,
    act: str,
) -> torch.Tensor:
    acc = xq.double() @ wq.double().T
    y = acc * xs.double().reshape(-1, 1) * ws.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return ACTIVATIONS[act].reference(y)


def _assert_requantized(got: torch.Tensor, y64: torch.Tensor, out_scale: float) -> None:
    """Exact codes, except off by one where y / out_scale lies within 1e-3 of a .5 tie."""
    assert got.dtype == torch.int8 and got.shape == y64.shape
    v = (y64 / out_scale).clamp(-127, 127)
    want = torch.round(v)
    diff = (got.long() - want.long()).abs()
    near_tie = ((v - v.floor()) - 0.5).abs() < 1e-3
    assert diff.max() <= 1 and not (diff.bool() & ~near_tie).any()
    assert got.min() >= -127


# --- int8_matmul_i32 ---------------------------------------------------------------------


def test_epilogues_are_the_documented_set() -> None:
    assert int8_gemm.INT8_EPILOGUES == ("none", "relu", "gelu", "gelu_tanh", "silu")


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [
        (19, 23, 37),  # one tile, K not a multiple of the 32-wide K block
        (1, 23, 37),  # a single row
        (70, 50, 90),  # 3 x 2 tiles in groups of 2 tile-rows (the last short), 3 K steps
        (32, 64, 64),  # whole tiles, no masking
    ],
)
def test_int8_matmul_i32_is_exact(m: int, n: int, k: int) -> None:
    xq, wq = _codes(m, k), _codes(n, k)
    _assert_exact_i32(int8_gemm.int8_matmul_i32(xq, wq), xq, wq)


def test_int8_matmul_i32_extreme_codes() -> None:
    # -128 * -128 summed over K: the largest products int8 can give, still exact.
    xq = torch.full((19, 90), -128, dtype=torch.int8, device=DEVICE)
    wq = torch.cat([xq[:10], torch.full((13, 90), 127, dtype=torch.int8, device=DEVICE)])
    _assert_exact_i32(int8_gemm.int8_matmul_i32(xq, wq), xq, wq)


def test_int8_matmul_i32_strided_operands() -> None:
    w_col_major = _codes(37, 23).t()  # [23, 37], strides (1, 23): a pre-transposed copy
    w_sliced = _codes(23, 74)[:, ::2]  # strides (74, 2)
    x3 = _codes(3, 37, 11).transpose(1, 2)  # [3, 11, 37], not contiguous
    assert not (w_col_major.is_contiguous() or w_sliced.is_contiguous() or x3.is_contiguous())
    for wq in (w_col_major, w_sliced):
        _assert_exact_i32(int8_gemm.int8_matmul_i32(x3, wq), x3, wq)


def test_int8_matmul_i32_empty() -> None:
    y = int8_gemm.int8_matmul_i32(_codes(3, 0), _codes(5, 0))
    assert y.dtype == torch.int32 and torch.equal(y, torch.zeros_like(y))
    assert int8_gemm.int8_matmul_i32(_codes(0, 8), _codes(5, 8)).shape == (0, 5)


# --- int8_linear -------------------------------------------------------------------------


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-tensor"])
@pytest.mark.parametrize("act", int8_gemm.INT8_EPILOGUES)
def test_int8_linear_every_epilogue(act: str, per_token: bool, out_dtype: torch.dtype) -> None:
    xq, wq = _codes(19, 37), _codes(23, 37)
    xs, ws = _scales(19, 23, per_token)
    bias = torch.randn(23, device=DEVICE)
    y = int8_gemm.int8_linear(xq, wq, xs, ws, bias, act, out_dtype)
    assert_kernel_close(y, _linear_reference(xq, wq, xs, ws, bias, act), out_dtype, TOL)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
def test_int8_linear_without_bias_and_scalar_scales(out_dtype: torch.dtype) -> None:
    xq, wq = _codes(70, 37), _codes(50, 37)
    xs, ws = torch.tensor(0.01, device=DEVICE), torch.tensor([0.003], device=DEVICE)  # [] / [1]
    y = int8_gemm.int8_linear(xq, wq, xs, ws, out_dtype=out_dtype)
    assert_kernel_close(y, _linear_reference(xq, wq, xs, ws, None, "none"), out_dtype, TOL)


def test_int8_linear_leading_dims_strided_weight_and_half_bias() -> None:
    xq = _codes(2, 5, 37)
    wq = _codes(37, 23).t()  # column-major
    xs = (torch.rand(2, 5, device=DEVICE) + 0.5) * 0.02  # per token, in xq's leading shape
    ws = (torch.rand(23, device=DEVICE) + 0.5) * 0.002
    bias = torch.randn(46, device=DEVICE, dtype=torch.float16)[::2]  # fp16, strided
    y = int8_gemm.int8_linear(xq, wq, xs, ws, bias, "gelu_tanh", torch.float32)
    assert y.shape == (2, 5, 23)
    ref = _linear_reference(xq.reshape(10, 37), wq, xs, ws, bias, "gelu_tanh")
    assert_kernel_close(y, ref.reshape(2, 5, 23), torch.float32, TOL)


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("scale_as_tensor", [False, True], ids=["float", "tensor"])
def test_int8_linear_requantizes(act: str, scale_as_tensor: bool) -> None:
    xq, wq = _codes(70, 37), _codes(50, 37)
    xs, ws = _scales(70, 50, per_token=True)
    bias = torch.randn(50, device=DEVICE)
    out_scale = 0.03  # |y| up to ~4: the codes span [-127, 127]
    scale_arg = torch.tensor([out_scale], device=DEVICE) if scale_as_tensor else out_scale
    y = int8_gemm.int8_linear(xq, wq, xs, ws, bias, act, out_scale=scale_arg)
    ref = _linear_reference(xq, wq, xs, ws, bias, act)
    # the float32 value of out_scale is what the kernel divides by
    _assert_requantized(y, ref, float(torch.tensor(out_scale)))
    assert y.abs().max() > 60  # a real spread of codes, not a degenerate test


def test_int8_linear_requantize_saturates_symmetrically() -> None:
    xq, wq = _codes(19, 37), _codes(23, 37)
    xs, ws = _scales(19, 23, per_token=False)
    y = int8_gemm.int8_linear(xq, wq, xs, ws, out_scale=1e-6)
    ref = _linear_reference(xq, wq, xs, ws, None, "none")
    assert torch.equal(y.long(), torch.sign(ref).long() * 127)


def test_int8_linear_empty_reduction_and_empty_output() -> None:
    bias = torch.randn(5, device=DEVICE)
    one = torch.ones(1, device=DEVICE)
    y = int8_gemm.int8_linear(_codes(3, 0), _codes(5, 0), one, one, bias, "relu", torch.float32)
    assert_kernel_close(y, F.relu(bias.double()).expand(3, 5), torch.float32, TOL)
    y = int8_gemm.int8_linear(_codes(0, 8), _codes(5, 8), torch.ones(0, device=DEVICE), one)
    assert y.shape == (0, 5) and y.dtype == torch.float16


# --- quantizers ----------------------------------------------------------------------------


def _per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x2 = x.float().reshape(-1, x.shape[-1])
    scale = x2.abs().amax(-1).clamp_min(1e-12) / 127
    q = torch.round(x2 / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(x.shape), scale


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("shape", [(19, 37), (2, 3, 37), (3, 5000), (1, 1)])
def test_quantize_per_token_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    # (3, 5000): rows longer than one 4096-wide chunk; (2, 3, 37): leading dims flattened
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    x.reshape(-1, shape[-1])[0] = 0  # an all-zero row: scale 1e-12 / 127, codes 0
    q, scale = int8_gemm.quantize_per_token(x)
    q_ref, scale_ref = _per_token_reference(x)
    assert q.shape == x.shape and q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    assert q.reshape(-1, shape[-1])[0].abs().max() == 0


def test_quantize_per_token_rounds_half_to_even() -> None:
    ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]  # amax 127: scale exactly 1
    q, scale = int8_gemm.quantize_per_token(torch.tensor([ties, [-t for t in ties]], device=DEVICE))
    assert torch.equal(scale, torch.ones(2, device=DEVICE))
    assert q.tolist() == [[127, 0, 2, 2, 0, -2, -2, 126], [-127, 0, -2, -2, 0, 2, 2, -126]]


def test_quantize_per_token_non_contiguous_input() -> None:
    x = torch.randn(37, 19, device=DEVICE).t()  # [19, 37], strides (1, 19)
    assert not x.is_contiguous()
    q, scale = int8_gemm.quantize_per_token(x)
    q_ref, scale_ref = _per_token_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
def test_quantize_per_tensor_is_exact(dtype: torch.dtype) -> None:
    x = (torch.randn(3, 19, 37, device=DEVICE) * 4).to(dtype)
    x[0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1e4, -1e4, 0.0])  # ties, saturation
    scale = 0.03
    q = int8_gemm.quantize_per_tensor(x, scale)
    # A full tensor of the scale: torch divides by a CUDA-side Python scalar via its reciprocal.
    xf = x.float()
    ref = torch.round(xf / torch.full_like(xf, scale)).clamp(-127, 127).to(torch.int8)
    assert q.shape == x.shape and torch.equal(q, ref)
    assert int8_gemm.quantize_per_tensor(x[0, 0, :5], 1.0).tolist() == [0, 2, 2, 0, -2]


def test_quantizers_on_empty_and_zero_dim_inputs() -> None:
    q, scale = int8_gemm.quantize_per_token(torch.randn(0, 7, device=DEVICE))
    assert q.shape == (0, 7) and scale.shape == (0,)
    q, scale = int8_gemm.quantize_per_token(torch.randn(3, 0, device=DEVICE))
    assert q.shape == (3, 0) and torch.equal(scale, torch.full((3,), 1e-12, device=DEVICE) / 127)
    assert int8_gemm.quantize_per_tensor(torch.tensor(2.6, device=DEVICE), 1.0).item() == 3


def test_quantize_then_int8_linear_approximates_the_float_linear() -> None:
    # The pipeline the int8 lowering emits: per-token activations, per-channel weights.
    x = torch.randn(19, 64, device=DEVICE)
    w = torch.randn(23, 64, device=DEVICE) / 8
    xq, xs = int8_gemm.quantize_per_token(x)
    wq, ws = int8_gemm.quantize_per_token(w)
    y = int8_gemm.int8_linear(xq, wq, xs, ws, out_dtype=torch.float32)
    err = (y.double() - x.double() @ w.double().T).abs().max()
    assert err < 0.05 * (x.double() @ w.double().T).abs().max()


# --- w8a16_linear --------------------------------------------------------------------------


def _w8a16_operands(
    m: int, n: int, k: int, dtype: torch.dtype, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k, device=device).to(dtype)
    wq = _codes(n, k, device=device)
    ws = (torch.rand(n, device=device) + 0.5) * (2.0 / (127 * k**0.5))
    bias = torch.randn(n, device=device).to(dtype)
    return x, wq, ws, bias


def _w8a16_reference(x, wq, ws, bias, act):  # type: ignore[no-untyped-def]
    w = wq.double() * ws.double().reshape(-1, 1)
    y = x.double() @ w.T
    if bias is not None:
        y = y + bias.double()
    return ACTIVATIONS[act].reference(y)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("m", [1, 5, 19])
def test_w8a16_linear_decode_sizes(m: int, dtype: torch.dtype) -> None:
    x, wq, ws, bias = _w8a16_operands(m, 23, 37, dtype)
    y = int8_gemm.w8a16_linear(x, wq, ws, bias, "gelu")
    assert_kernel_close(y, _w8a16_reference(x, wq, ws, bias, "gelu"), dtype, W8A16_TOL)


@pytest.mark.parametrize("act", int8_gemm.INT8_EPILOGUES)
def test_w8a16_linear_every_epilogue(act: str) -> None:
    x, wq, ws, bias = _w8a16_operands(5, 23, 37, torch.float16)
    y = int8_gemm.w8a16_linear(x * 2, wq, ws, bias, act)
    assert_kernel_close(y, _w8a16_reference(x * 2, wq, ws, bias, act), torch.float16, W8A16_TOL)


@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize(("k", "split"), [(90, 2), (90, 3), (37, 3)])
def test_w8a16_linear_split_k(
    monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, k: int, split: int
) -> None:
    # 3 K blocks in 2 or 3 splits; (37, 3): 2 K blocks in 3 splits, the last one empty.
    monkeypatch.setattr(int8_gemm, "choose_split_k", lambda *_: split)
    x, wq, ws, bias = _w8a16_operands(5, 50, k, dtype)
    for act, b in (("silu", bias), ("none", None)):
        y = int8_gemm.w8a16_linear(x, wq, ws, b, act)
        assert_kernel_close(y, _w8a16_reference(x, wq, ws, b, act), dtype, W8A16_TOL)


def test_w8a16_linear_strided_weight_leading_dims_and_scalar_scale() -> None:
    x = torch.randn(2, 3, 37, device=DEVICE, dtype=torch.float16)
    wq = _codes(37, 23).t()  # column-major
    ws = torch.tensor([0.01], device=DEVICE)
    bias = torch.randn(23, device=DEVICE)  # fp32 bias on an fp16 input
    y = int8_gemm.w8a16_linear(x, wq, ws, bias, "relu")
    assert y.shape == (2, 3, 23) and y.dtype == torch.float16
    assert_kernel_close(y, _w8a16_reference(x, wq, ws, bias, "relu"), torch.float16, W8A16_TOL)


def test_w8a16_split_k_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a 132-SM H100: split while the N tiles fill at most half the SMs and K stays >= 256.
    monkeypatch.setattr(int8_gemm, "_num_sms", lambda _device: 132)
    choose = int8_gemm.choose_split_k
    cuda = torch.device("cuda", 0)
    assert choose(1, 2304, 768, cuda) == 2  # 36 tiles of 64 columns: 72 programs
    assert choose(1, 768, 3072, cuda) == 8  # 12 tiles: 96 programs, 384 of K each
    assert choose(16, 768, 384, cuda) == 1  # K too short to split
    assert choose(64, 768, 3072, cuda) == 1  # not a decode size


def test_w8a16_linear_empty_reduction() -> None:
    bias = torch.randn(5, device=DEVICE)
    x = torch.randn(3, 0, device=DEVICE, dtype=torch.float16)
    y = int8_gemm.w8a16_linear(x, _codes(5, 0), torch.ones(5, device=DEVICE), bias, "relu")
    assert_kernel_close(y, F.relu(bias.double()).expand(3, 5), torch.float16, W8A16_TOL)


# --- bad inputs ----------------------------------------------------------------------------

X8, W8 = (19, 37), (23, 37)


def _args() -> dict:
    return {
        "xq": _codes(*X8),
        "wq": _codes(*W8),
        "x_scale": torch.ones(19, device=DEVICE),
        "w_scale": torch.ones(23, device=DEVICE),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"xq": torch.ones(X8, device=DEVICE)}, r"xq must be an int8 \[..., K\] tensor, got torch.float32"),
        ({"wq": torch.ones(W8, device=DEVICE)}, r"wq must be an int8 \[N, K\] tensor, got torch.float32"),
        ({"wq": _codes(23, 36)}, r"expected x \[..., K\] and wq \[N, K\] with the same K"),
        ({"x_scale": torch.ones(7, device=DEVICE)}, r"x_scale must be a float32 tensor of shape \[M=19\] or \[1\], got torch.float32 \(7,\)"),
        ({"x_scale": torch.ones(19, device=DEVICE).half()}, r"x_scale must be a float32 tensor"),
        ({"w_scale": torch.ones(19, device=DEVICE)}, r"w_scale must be a float32 tensor of shape \[N=23\]"),
        ({"bias": torch.ones(4, device=DEVICE)}, r"bias must be a float \[23\] tensor or None, got torch.float32 \(4,\)"),
        ({"bias": torch.ones(23, dtype=torch.int32, device=DEVICE)}, r"bias must be a float \[23\]"),
        ({"activation": "tanh"}, "unknown activation 'tanh'"),
        ({"out_dtype": torch.int32}, "out_dtype must be float16, bfloat16 or float32, got torch.int32"),
        ({"out_scale": 0.0}, "out_scale must be a positive finite float, got 0.0"),
        ({"out_scale": torch.ones(2, device=DEVICE)}, "out_scale tensor must be float32 with one element"),
    ],
)  # fmt: skip
def test_int8_linear_rejects_bad_inputs(change: dict, message: str) -> None:
    with pytest.raises(GraphoptError, match=f"int8_linear: {message}"):
        int8_gemm.int8_linear(**{**_args(), **change})


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: int8_gemm.int8_matmul_i32(_codes(*X8).float(), _codes(*W8)), "int8_matmul_i32: xq must be an int8"),
        (lambda: int8_gemm.int8_matmul_i32(_codes(*X8), _codes(23, 37, 1)), r"wq must be an int8 \[N, K\] tensor, got torch.int8 \(23, 37, 1\)"),
        (lambda: int8_gemm.w8a16_linear(_codes(*X8), _codes(*W8), torch.ones(23)), "w8a16_linear: x must be a float16/bfloat16/float32"),
        (lambda: int8_gemm.w8a16_linear(torch.randn(X8), _codes(*W8), torch.ones(5)), r"w_scale must be a float32 tensor of shape \[N=23\]"),
        (lambda: int8_gemm.w8a16_linear(torch.randn(X8), _codes(*W8).half(), torch.ones(23)), "wq must be an int8"),
        (lambda: int8_gemm.quantize_per_token(_codes(*X8)), "quantize_per_token: x must be a float16/bfloat16/float32 tensor, got torch.int8"),
        (lambda: int8_gemm.quantize_per_token(torch.tensor(1.0)), "at least one dimension"),
        (lambda: int8_gemm.quantize_per_tensor(torch.randn(X8), 0.0), "quantize_per_tensor: scale must be a positive finite float, got 0.0"),
        (lambda: int8_gemm.quantize_per_tensor(torch.randn(X8), float("inf")), "positive finite"),
    ],
)  # fmt: skip
def test_other_wrappers_reject_bad_inputs(call: Callable[[], object], message: str) -> None:
    with pytest.raises(GraphoptError, match=message):
        call()


def test_inputs_on_different_devices_are_rejected() -> None:
    meta = torch.ones(23, device="meta")
    with pytest.raises(GraphoptError, match=r"w_scale is on meta but the input is on"):
        int8_gemm.int8_linear(**{**_args(), "w_scale": meta})


def test_kernels_need_cuda_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8_gemm, "_INTERPRET", False)
    for call in (
        lambda: int8_gemm.int8_matmul_i32(_codes(*X8, device="cpu"), _codes(*W8, device="cpu")),
        lambda: int8_gemm.quantize_per_token(torch.randn(X8)),
        lambda: int8_gemm.w8a16_linear(torch.randn(X8), _codes(*W8, device="cpu"), torch.ones(23)),
    ):
        with pytest.raises(GraphoptError, match="needs CUDA tensors"):
            call()


# --- full size on a GPU --------------------------------------------------------------------


@pytest.mark.gpu
def test_int8_full_size_on_gpu() -> None:
    m, n, k = 1823, 781, 1024
    xq, wq = _codes(m, k, device="cuda"), _codes(n, k, device="cuda")
    for w in (wq, wq.t().contiguous().t()):  # row-major and column-major weights
        _assert_exact_i32(int8_gemm.int8_matmul_i32(xq, w), xq, w)
    bias = torch.randn(n, device="cuda")
    for per_token in (True, False):
        xs, ws = _scales(m, n, per_token, "cuda")
        xs = xs / 5  # K = 1024 instead of ~40: keep pre-activations a few units wide
        for act in int8_gemm.INT8_EPILOGUES:
            ref = _linear_reference(xq, wq, xs, ws, bias, act)
            for out_dtype in OUT_DTYPES:
                y = int8_gemm.int8_linear(xq, wq, xs, ws, bias, act, out_dtype)
                assert_kernel_close(y, ref, out_dtype, TOL)
            y8 = int8_gemm.int8_linear(xq, wq, xs, ws, bias, act, out_scale=0.05)
            _assert_requantized(y8, ref, float(torch.tensor(0.05)))


@pytest.mark.gpu
def test_int8_8192_cube_on_gpu() -> None:
    # Correctness only; the timing is tools/bench/kernels.py's. Checked against torch._int_mm and,
    # on a slice of rows, against float64.
    xq, wq = _codes(8192, 8192, device="cuda"), _codes(8192, 8192, device="cuda")
    y = int8_gemm.int8_matmul_i32(xq, wq)
    assert torch.equal(y, torch._int_mm(xq, wq.t()))
    _assert_exact_i32(y[:64], xq[:64], wq)
    xs, ws = _scales(8192, 8192, True, "cuda")
    y16 = int8_gemm.int8_linear(xq[:64], wq, xs[:64] / 15, ws, None, "gelu")
    assert_kernel_close(
        y16, _linear_reference(xq[:64], wq, xs[:64] / 15, ws, None, "gelu"), torch.float16, TOL
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 16, 1823])
def test_w8a16_full_size_on_gpu(m: int, dtype: torch.dtype) -> None:
    for n, k in ((781, 1024), (768, 3072)):  # the second splits K at decode sizes
        x, wq, ws, bias = _w8a16_operands(m, n, k, dtype, "cuda")
        for act in ("none", "gelu"):
            y = int8_gemm.w8a16_linear(x, wq, ws, bias, act)
            assert_kernel_close(y, _w8a16_reference(x, wq, ws, bias, act), dtype, W8A16_TOL)


@pytest.mark.gpu
def test_quantizers_full_size_on_gpu() -> None:
    x = torch.randn(1823, 4100, device="cuda", dtype=torch.float16) * 3
    q, scale = int8_gemm.quantize_per_token(x)
    q_ref, scale_ref = _per_token_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    xf = x.float()
    ref = torch.round(xf / torch.full_like(xf, 0.02)).clamp(-127, 127).to(torch.int8)
    assert torch.equal(int8_gemm.quantize_per_tensor(x, 0.02), ref)
