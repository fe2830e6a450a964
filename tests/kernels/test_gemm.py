"""Linear GEMM with fused epilogues (``graphopt.kernels.gemm``) against ATen.

The reference is ``act(alpha * F.linear(x, w) + b) + r`` in float64 on the same inputs, with
per-dtype tolerances. Without a GPU the kernel runs under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) on small, odd-shaped CPU tensors with one 32 x 32 x 32 tile config; the
``gpu`` tests run at full size through the autotuner.

bfloat16 under the interpreter: its ``tl.dot`` multiplies the raw uint16 bit patterns of
bfloat16 tiles (Triton 3.9), so the kernel upcasts bfloat16 tiles to float32 before ``tl.dot``
when ``TRITON_INTERPRET=1``. The CPU tests therefore check bfloat16 loads, epilogue and stores;
the bfloat16 tensor-core ``tl.dot`` itself is covered only by the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.kernels import gemm
from graphopt.kernels.activations import ACTIVATIONS
from graphopt.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None = None,
    act: str = "none",
    r: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    y = alpha * F.linear(x.double(), w.double())
    if b is not None:
        y = y + b.double()
    y = ACTIVATIONS[act].reference(y)
    return y + r.double() if r is not None else y


def _operands(
    m: int, n: int, k: int, dtype: torch.dtype, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, device=device) / k**0.5).to(dtype)
    b = torch.randn(n, dtype=dtype, device=device)
    r = torch.randn(m, n, dtype=dtype, device=device)
    return x, w, b, r


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_epilogues_are_the_documented_set() -> None:
    assert gemm.EPILOGUES == ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")


@pytest.mark.parametrize("act", gemm.EPILOGUES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_every_epilogue(dtype: torch.dtype, act: str) -> None:
    x, w, b, r = _operands(19, 23, 37, dtype)
    x = x * 2  # pre-activations around +-3 reach the non-linear parts of every activation
    assert_kernel_close(
        gemm.linear(x, w, b, act, r, alpha=0.75), _reference(x, w, b, act, r, 0.75), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_plain_and_bias_only(dtype: torch.dtype) -> None:
    x, w, b, _ = _operands(19, 23, 37, dtype)
    assert_kernel_close(gemm.linear(x, w), _reference(x, w), dtype)
    assert_kernel_close(gemm.linear(x, w, b), _reference(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_many_tiles_and_k_steps(dtype: torch.dtype) -> None:
    # 3 x 2 tiles of 32 x 32 in groups of 2 tile-rows (the last group is short), 3 K steps.
    x, w, b, r = _operands(70, 50, 90, dtype)
    assert_kernel_close(gemm.linear(x, w, b, "relu", r), _reference(x, w, b, "relu", r), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_non_contiguous_operands_and_broadcast_residual(dtype: torch.dtype) -> None:
    x = torch.randn(3, 37, 11, dtype=dtype, device=DEVICE).transpose(1, 2)  # [3, 11, 37]
    w = torch.randn(37, 23, dtype=dtype, device=DEVICE).t()  # [23, 37], column-major
    b = torch.randn(46, dtype=dtype, device=DEVICE)[::2]
    r = torch.randn(23, dtype=torch.float32, device=DEVICE)  # broadcast over [3, 11, 23]
    assert not (x.is_contiguous() or w.is_contiguous() or b.is_contiguous())
    y = gemm.linear(x, w, b, "silu", r)
    assert y.shape == (3, 11, 23)
    assert_kernel_close(y, _reference(x, w, b, "silu", r), dtype)


def test_linear_gelu_without_tl_math_erf(monkeypatch: pytest.MonkeyPatch) -> None:
    # The polynomial erf used on a Triton that lacks tl.math.erf (|error| < 1.5e-7).
    monkeypatch.setattr(gemm, "HAS_ERF", False)
    x, w, b, _ = _operands(19, 23, 37, torch.float32)
    assert_kernel_close(
        gemm.linear(x * 2, w, b, "gelu"), _reference(x * 2, w, b, "gelu"), torch.float32
    )


# exp(+-200) overflows to inf on purpose (then 1 / inf = 0); numpy warns under the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_linear_large_activations_saturate_without_nan() -> None:
    x = torch.full((4, 16), 20.0, device=DEVICE)
    w = torch.cat([torch.eye(16, device=DEVICE), -torch.eye(16, device=DEVICE)]) * 10
    for act in ("gelu_tanh", "silu", "sigmoid", "tanh"):
        assert_kernel_close(
            gemm.linear(x, w, None, act), _reference(x, w, None, act), torch.float32
        )


def test_linear_empty_reduction_and_empty_output() -> None:
    b = torch.randn(5, device=DEVICE)
    y = gemm.linear(torch.randn(3, 0, device=DEVICE), torch.randn(5, 0, device=DEVICE), b, "relu")
    assert_kernel_close(y, F.relu(b.double()).expand(3, 5), torch.float32)
    assert gemm.linear(
        torch.randn(0, 4, device=DEVICE), torch.randn(5, 4, device=DEVICE)
    ).shape == (0, 5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x, w: gemm.linear(x, w.half()), "x is torch.float32 but weight is torch.float16"),
        (lambda x, w: gemm.linear(x.int(), w), "float16/bfloat16/float32"),
        (lambda x, w: gemm.linear(x, w[:, :5]), r"expected x \[..., K\]"),
        (lambda x, w: gemm.linear(x, w, activation="swish"), "unknown activation"),
        (lambda x, w: gemm.linear(x, w, torch.ones(4, device=DEVICE)), "bias must"),
        (
            lambda x, w: gemm.linear(x, w, residual=torch.ones(2, 7, 23, device=DEVICE)),
            "residual must",
        ),
    ],
)
def test_linear_rejects_bad_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GraphoptError, match=message):
        call(torch.randn(7, 37, device=DEVICE), torch.randn(23, 37, device=DEVICE))


def test_linear_needs_cuda_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm, "_INTERPRET", False)
    with pytest.raises(GraphoptError, match="needs CUDA tensors"):
        gemm.linear(torch.randn(7, 37), torch.randn(23, 37))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_full_size_on_gpu(dtype: torch.dtype) -> None:
    x, w, b, r = _operands(1823, 781, 1024, dtype, "cuda")
    for act in gemm.EPILOGUES:
        assert_kernel_close(gemm.linear(x, w, b, act, r), _reference(x, w, b, act, r), dtype)
    wt = w.t().contiguous().t()
    assert_kernel_close(gemm.linear(x, wt, b, "gelu"), _reference(x, wt, b, "gelu"), dtype)
