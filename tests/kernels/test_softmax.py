"""Masked, scaled softmax kernel (``graphopt.kernels.softmax``) against ATen.

The reference is ``torch.softmax(scale * x + mask)`` in float64 on the same inputs, with
per-dtype tolerances. Without a GPU the kernel runs under Triton's interpreter (conftest sets
``TRITON_INTERPRET=1``) on small, odd-shaped CPU tensors; the ``gpu`` tests run at full size.
"""

from __future__ import annotations

import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.kernels import softmax as ksoftmax
from graphopt.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# A fully masked row is NaN (as in torch); numpy warns about -inf - -inf under the interpreter.
IGNORE_NAN_WARNING = pytest.mark.filterwarnings("ignore:invalid value encountered")


def _reference(
    x: torch.Tensor, dim: int = -1, scale: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    z = x.double() * scale
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.double()
    return torch.softmax(z, dim)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_matches_aten(dtype: torch.dtype) -> None:
    x = torch.randn(7, 33, dtype=dtype, device=DEVICE) * 4
    assert_kernel_close(ksoftmax.softmax(x), _reference(x), dtype)
    assert_kernel_close(ksoftmax.softmax(x, scale=0.125), _reference(x, scale=0.125), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_bool_padding_mask_is_broadcast(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 5, 33, dtype=dtype, device=DEVICE)
    keep = torch.rand(2, 1, 1, 33, device=DEVICE) > 0.3  # [B, 1, 1, T]
    keep[..., 0] = True
    assert_kernel_close(
        ksoftmax.softmax(x, scale=0.5, mask=keep), _reference(x, -1, 0.5, keep), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_float_mask_is_broadcast(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 5, 33, dtype=dtype, device=DEVICE)
    add = torch.randn(5, 33, device=DEVICE)  # [T, T]-style, fp32 whatever x's dtype
    add[1, 7:] = float("-inf")
    assert_kernel_close(ksoftmax.softmax(x, mask=add), _reference(x, mask=add), dtype)
    half = add.to(dtype)
    assert_kernel_close(ksoftmax.softmax(x, mask=half), _reference(x, mask=half), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_non_contiguous_and_other_dims(dtype: torch.dtype) -> None:
    x = torch.randn(33, 3, 7, dtype=dtype, device=DEVICE).transpose(0, 2)  # [7, 3, 33]
    assert not x.is_contiguous()
    assert_kernel_close(ksoftmax.softmax(x), _reference(x), dtype)
    assert_kernel_close(ksoftmax.softmax(x, dim=0), _reference(x, dim=0), dtype)
    sliced = torch.randn(7, 70, dtype=dtype, device=DEVICE)[:, 1::2]
    assert_kernel_close(ksoftmax.softmax(sliced), _reference(sliced), dtype)


def test_softmax_many_leading_dims_with_mask() -> None:
    # Five leading dims that do not merge: the kernel falls back to contiguous copies.
    x = torch.randn(2, 3, 4, 5, 6, 9, device=DEVICE).transpose(0, 3)
    add = torch.randn(5, 1, 4, 1, 1, 9, device=DEVICE)
    assert_kernel_close(ksoftmax.softmax(x, mask=add), _reference(x, mask=add), torch.float32)


@IGNORE_NAN_WARNING
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_long_rows_use_online_softmax(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 33 columns with MAX_FUSED_N = 16: three chunks; row 1's first chunk is fully masked
    # (must not turn into NaN), row 2 is fully masked (NaN, as torch).
    monkeypatch.setattr(ksoftmax, "MAX_FUSED_N", 16)
    x = torch.randn(5, 33, dtype=dtype, device=DEVICE) * 4
    keep = torch.rand(5, 33, device=DEVICE) > 0.2
    keep[1, :20] = False
    keep[2] = False
    want = _reference(x, scale=0.7, mask=keep)
    assert_kernel_close(ksoftmax.softmax(x, scale=0.7, mask=keep), want, dtype, equal_nan=True)
    assert_kernel_close(ksoftmax.softmax(x), _reference(x), dtype)


@IGNORE_NAN_WARNING
def test_softmax_fully_masked_row_is_nan_like_torch() -> None:
    x = torch.randn(4, 33, device=DEVICE)
    add = torch.zeros(4, 33, device=DEVICE)
    add[2] = float("-inf")
    y = ksoftmax.softmax(x, mask=add)
    assert y[2].isnan().all() and not y[[0, 1, 3]].isnan().any()
    assert_kernel_close(y, _reference(x, mask=add), torch.float32, equal_nan=True)


def test_softmax_empty_input() -> None:
    assert ksoftmax.softmax(torch.randn(0, 33, device=DEVICE)).shape == (0, 33)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda x: ksoftmax.softmax(x.double()), "float16/bfloat16/float32"),
        (lambda x: ksoftmax.softmax(x, dim=2), "out of range"),
        (
            lambda x: ksoftmax.softmax(x, mask=torch.ones(7, 33, dtype=torch.int32, device=DEVICE)),
            "bool or",
        ),
        (
            lambda x: ksoftmax.softmax(x, mask=torch.ones(8, 33, dtype=torch.bool, device=DEVICE)),
            "broadcast",
        ),
        (lambda x: ksoftmax.softmax(x, mask=torch.ones(2, 7, 33, device=DEVICE)), "broadcast"),
    ],
)
def test_softmax_rejects_bad_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GraphoptError, match=message):
        call(torch.randn(7, 33, device=DEVICE))


def test_softmax_needs_cuda_tensors_outside_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ksoftmax, "_INTERPRET", False)
    with pytest.raises(GraphoptError, match="needs a CUDA tensor"):
        ksoftmax.softmax(torch.randn(7, 33))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_full_size_on_gpu(dtype: torch.dtype) -> None:
    x = torch.randn(1823, 781, dtype=dtype, device="cuda") * 4
    assert_kernel_close(ksoftmax.softmax(x, scale=0.3), _reference(x, scale=0.3), dtype)
    keep = torch.rand(1, 781, device="cuda") > 0.5
    assert_kernel_close(ksoftmax.softmax(x, mask=keep), _reference(x, mask=keep), dtype)
    scores = torch.randn(4, 12, 128, 128, dtype=dtype, device="cuda")
    causal = torch.ones(128, 128, dtype=torch.bool, device="cuda").tril()
    assert_kernel_close(
        ksoftmax.softmax(scores, scale=0.125, mask=causal),
        _reference(scores, -1, 0.125, causal),
        dtype,
    )
    long = torch.randn(37, 50021, dtype=dtype, device="cuda")  # > MAX_FUSED_N: online softmax
    assert_kernel_close(ksoftmax.softmax(long), _reference(long), dtype)
