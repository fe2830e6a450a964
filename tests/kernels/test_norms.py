"""LayerNorm / RMSNorm kernels (``graphopt.kernels.norms``) against ATen.

Each output is compared with the ATen op run in float64 on the same inputs, with per-dtype
tolerances. Without a GPU the kernels run under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) on small, odd-shaped CPU tensors; the ``gpu`` tests run at full size.
Under the interpreter a float32 -> bfloat16 cast truncates instead of rounding to nearest, so
bfloat16 results there can be one bfloat16 ulp off what the GPU gives; the tolerance covers it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptError
from graphopt.kernels import norms
from graphopt.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _reference(
    kind: str, s: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None
) -> torch.Tensor:
    n = (s.shape[-1],)
    w64 = w.double() if w is not None else None
    if kind == "rms":
        return F.rms_norm(s.double(), n, w64, EPS)
    return F.layer_norm(s.double(), n, w64, b.double() if b is not None else None, EPS)


def _run(
    kind: str,
    x: torch.Tensor,
    w: torch.Tensor | None,
    b: torch.Tensor | None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if kind == "rms":
        return norms.rms_norm(x, w, EPS, residual)
    return norms.layer_norm(x, w, b, EPS, residual)


def _inputs(
    shape: tuple[int, ...], dtype: torch.dtype, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device) * 3 + 1  # non-zero mean
    w = torch.randn(n, dtype=dtype, device=device)
    b = torch.randn(n, dtype=dtype, device=device)
    return x, w, b


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_matches_aten(kind: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs((7, 33), dtype)
    y, s = _run(kind, x, w, b)
    assert s is None and y.shape == x.shape
    assert_kernel_close(y, _reference(kind, x, w, b), dtype)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_with_residual_returns_the_sum(kind: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs((2, 5, 33), dtype)
    r = torch.randn_like(x)
    y, s = _run(kind, x, w, b, r)
    assert s is not None and s.shape == x.shape and s.dtype == dtype
    assert_kernel_close(s, x + r, dtype)
    assert_kernel_close(y, _reference(kind, x + r, w, b), dtype)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_non_contiguous_inputs(kind: str, dtype: torch.dtype) -> None:
    _, w, b = _inputs((33,), dtype)
    x = torch.randn(33, 2, 7, dtype=dtype, device=DEVICE).permute(1, 2, 0)  # strided last dim
    r = torch.randn(2, 7, 66, dtype=dtype, device=DEVICE)[..., ::2]  # sliced
    assert not x.is_contiguous() and not r.is_contiguous()
    y, s = _run(kind, x, w, b, r)
    assert_kernel_close(s, x + r, dtype)
    assert_kernel_close(y, _reference(kind, x + r, w, b), dtype)


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_without_affine_parameters(kind: str) -> None:
    x, _, _ = _inputs((7, 33), torch.float32)
    y, _ = _run(kind, x, None, None)
    assert_kernel_close(y, _reference(kind, x, None, None), torch.float32)


def test_layer_norm_weight_without_bias_and_mixed_parameter_dtype() -> None:
    x, w, _ = _inputs((7, 33), torch.float16)
    y, _ = norms.layer_norm(x, w.float(), None, EPS)
    assert_kernel_close(y, _reference("layer", x, w, None), torch.float16)


@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_long_rows_stream_in_chunks(
    kind: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows longer than MAX_FUSED_N take the chunked (three-pass) path; 33 = 2 chunks of 16 + 1.
    monkeypatch.setattr(norms, "MAX_FUSED_N", 16)
    x, w, b = _inputs((5, 33), dtype)
    r = torch.randn_like(x)
    y, s = _run(kind, x, w, b, r)
    assert_kernel_close(s, x + r, dtype)
    assert_kernel_close(y, _reference(kind, x + r, w, b), dtype)


def test_rms_norm_default_eps_is_the_dtype_epsilon() -> None:
    x, w, _ = _inputs((3, 33), torch.float32)
    y, _ = norms.rms_norm(x, w, None)
    want = F.rms_norm(x.double(), (33,), w.double(), torch.finfo(torch.float32).eps)
    assert_kernel_close(y, want, torch.float32)


def test_norm_empty_input() -> None:
    x = torch.randn(0, 33, device=DEVICE)
    y, s = norms.layer_norm(x, None, None, EPS, torch.randn(0, 33, device=DEVICE))
    assert y.shape == (0, 33) and s is not None and s.shape == (0, 33)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: norms.layer_norm(x.int(), None, None, EPS), "dtype"),
        (lambda x: norms.layer_norm(x.double(), None, None, EPS), "dtype"),
        (lambda x: norms.layer_norm(x, torch.ones(32, device=DEVICE), None, EPS), r"weight must"),
        (lambda x: norms.layer_norm(x, None, torch.ones(3, 33, device=DEVICE), EPS), "bias must"),
        (lambda x: norms.rms_norm(x, None, EPS, residual=x.half()), "residual must match"),
        (lambda x: norms.rms_norm(x, None, EPS, residual=x[:, :5]), "residual must match"),
        (lambda x: norms.layer_norm(x, None, None, -1.0), "eps"),
        (lambda x: norms.layer_norm(x[:, :0], None, None, EPS), "non-empty last dimension"),
    ],
)
def test_norm_rejects_bad_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GraphoptError, match=message):
        call(torch.randn(7, 33, device=DEVICE))


def test_norm_needs_cuda_tensors_outside_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(norms, "_INTERPRET", False)
    with pytest.raises(GraphoptError, match="needs a CUDA tensor"):
        norms.rms_norm(torch.randn(7, 33), None, EPS)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer", "rms"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_full_size_on_gpu(kind: str, dtype: torch.dtype) -> None:
    x, w, b = _inputs((1823, 781), dtype, "cuda")
    r = torch.randn_like(x)
    y, s = _run(kind, x, w, b, r)
    assert_kernel_close(s, x + r, dtype)
    assert_kernel_close(y, _reference(kind, x + r, w, b), dtype)
    y, _ = _run(kind, x.t().contiguous().t(), w, b)  # column-major rows
    assert_kernel_close(y, _reference(kind, x, w, b), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_norm_long_rows_on_gpu(kind: str) -> None:
    x, w, b = _inputs((37, 20011), torch.float16, "cuda")  # > MAX_FUSED_N: streamed
    r = torch.randn_like(x)
    y, s = _run(kind, x, w, b, r)
    assert_kernel_close(s, x + r, torch.float16)
    assert_kernel_close(y, _reference(kind, x + r, w, b), torch.float16)
