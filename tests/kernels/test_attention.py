"""Flash-attention forward (``graphopt.kernels.attention``) against SDPA.

The reference is ``F.scaled_dot_product_attention`` in float64 on the same inputs (its math
backend, which rejects a mask together with ``is_causal``: there the causal mask is folded into
the float mask first). Per-dtype tolerances. Without a GPU the kernel runs under Triton's
interpreter (conftest sets ``TRITON_INTERPRET=1``) on small, odd-shaped CPU tensors with 16 x 16
blocks, so several query and key blocks and the causal diagonal are exercised; the ``gpu``
tests run at full size through the autotuner.

bfloat16 under the interpreter: its ``tl.dot`` multiplies the raw uint16 bit patterns of
bfloat16 tiles (Triton 3.9), so the kernel upcasts bfloat16 tiles to float32 before ``tl.dot``
when ``TRITON_INTERPRET=1``; the bfloat16 tensor-core path is covered only by the ``gpu`` tests.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton

from graphopt.errors import GraphoptError
from graphopt.kernels import attention as kattention
from graphopt.testing import assert_kernel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    if mask is not None and causal:
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float64, device=mask.device).masked_fill(
                ~mask, float("-inf")
            )
        visible = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask, causal = mask.masked_fill(~visible, float("-inf")), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _qkv(
    b: int, h: int, tq: int, tk: int, d: int, dv: int, dtype: torch.dtype, device: str = DEVICE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q = torch.randn(b, h, tq, d, dtype=dtype, device=device)
    k = torch.randn(b, h, tk, d, dtype=dtype, device=device)
    v = torch.randn(b, h, tk, dv, dtype=dtype, device=device)
    return q, k, v


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_matches_sdpa(dtype: torch.dtype, causal: bool) -> None:
    q, k, v = _qkv(1, 2, 13, 13, 16, 16, dtype)
    assert_kernel_close(
        kattention.attention(q, k, v, causal=causal), _reference(q, k, v, causal=causal), dtype
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_odd_lengths_and_padded_head_dims(dtype: torch.dtype, causal: bool) -> None:
    # Tq != Tk over several 16-blocks; D = 24 and Dv = 40 are padded to 32 and 64.
    q, k, v = _qkv(2, 3, 37, 29, 24, 40, dtype)
    got = kattention.attention(q, k, v, scale=0.3, causal=causal)
    assert_kernel_close(got, _reference(q, k, v, scale=0.3, causal=causal), dtype)
    q2 = q[:, :, :11]  # Tq < Tk: the top-left-aligned causal mask hides most keys
    assert_kernel_close(
        kattention.attention(q2, k, v, causal=causal), _reference(q2, k, v, causal=causal), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_bool_padding_mask(dtype: torch.dtype) -> None:
    q, k, v = _qkv(2, 2, 21, 21, 8, 8, dtype)
    keep = torch.rand(2, 1, 1, 21, device=DEVICE) > 0.3  # [B, 1, 1, Tk]
    keep[0, ..., 0] = True
    keep[1] = False  # batch 1 sees no key at all: SDPA gives 0
    got = kattention.attention(q, k, v, mask=keep)
    assert not got.isnan().any() and (got[1] == 0).all()
    assert_kernel_close(got, _reference(q, k, v, mask=keep), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_float_mask_with_causal(dtype: torch.dtype) -> None:
    q, k, v = _qkv(1, 2, 35, 35, 16, 16, dtype)
    bias = torch.randn(35, 35, device=DEVICE)  # [Tq, Tk], fp32 for every dtype
    got = kattention.attention(q, k, v, mask=bias, causal=True)
    assert_kernel_close(got, _reference(q, k, v, mask=bias, causal=True), dtype)
    keep = torch.rand(1, 2, 35, 1, device=DEVICE) > 0.2  # broadcast over keys: whole rows off
    got = kattention.attention(q, k, v, mask=keep, causal=True)
    assert_kernel_close(got, _reference(q, k, v, mask=keep, causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_non_contiguous_inputs(dtype: torch.dtype) -> None:
    # The usual [B, T, H, D] projections viewed as [B, H, T, D], and a k with strided D.
    q = torch.randn(2, 19, 3, 16, dtype=dtype, device=DEVICE).transpose(1, 2)
    k = torch.randn(2, 3, 16, 23, dtype=dtype, device=DEVICE).transpose(2, 3)
    v = torch.randn(2, 23, 3, 32, dtype=dtype, device=DEVICE)[..., ::2].transpose(1, 2)
    mask = torch.randn(2, 1, 19, 23, dtype=dtype, device=DEVICE)
    got = kattention.attention(q, k, v, mask=mask)
    assert got.is_contiguous()
    assert_kernel_close(got, _reference(q, k, v, mask=mask), dtype)


def test_attention_empty_inputs() -> None:
    q, k, v = _qkv(1, 2, 0, 5, 16, 16, torch.float32)
    assert kattention.attention(q, k, v).shape == (1, 2, 0, 16)
    q, k, v = _qkv(1, 2, 3, 0, 16, 16, torch.float32)
    assert (kattention.attention(q, k, v) == 0).all()


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda q, k, v: kattention.attention(q[0], k, v), "4-d"),
        (lambda q, k, v: kattention.attention(q, k.half(), v), "share dtype"),
        (lambda q, k, v: kattention.attention(q.double(), k, v), "float16/bfloat16/float32"),
        (lambda q, k, v: kattention.attention(q, k[..., :8], v), r"expected q \[B, H, Tq, D\]"),
        (lambda q, k, v: kattention.attention(q, k, v[:, :1]), r"expected q \[B, H, Tq, D\]"),
        (
            lambda q, k, v: kattention.attention(q, k, v, mask=torch.ones(5, 6, device=DEVICE)),
            "broadcast",
        ),
        (
            lambda q, k, v: kattention.attention(
                q, k, v, mask=torch.ones(5, 7, device=DEVICE).int()
            ),
            "bool or",
        ),
    ],
)
def test_attention_rejects_bad_inputs(call, message: str) -> None:  # type: ignore[no-untyped-def]
    q, k, v = _qkv(1, 2, 5, 7, 16, 16, torch.float32)
    with pytest.raises(GraphoptError, match=message):
        call(q, k, v)


def test_attention_rejects_head_dims_over_the_limit() -> None:
    q, k, v = _qkv(1, 1, 2, 2, 300, 16, torch.float32)
    with pytest.raises(GraphoptError, match="head dims"):
        kattention.attention(q, k, v)


def test_attention_needs_cuda_tensors_outside_the_interpreter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kattention, "_INTERPRET", False)
    q, k, v = _qkv(1, 1, 2, 2, 16, 16, torch.float32, "cpu")
    with pytest.raises(GraphoptError, match="needs CUDA tensors"):
        kattention.attention(q, k, v)


def test_autotune_pruning_drops_tiles_that_overflow_shared_memory() -> None:
    big = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_stages=2, num_warps=8)
    small = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_stages=2, num_warps=4)
    fp16, fp32 = torch.empty(1, dtype=torch.float16), torch.empty(1)
    prune = kattention._prune_configs
    assert prune([big, small], {"q_ptr": fp16}, BLOCK_D=64, BLOCK_DV=64) == [big, small]
    assert prune([big, small], {"q_ptr": fp32}, BLOCK_D=128, BLOCK_DV=128) == [small]
    assert prune([big], {"q_ptr": fp32}, BLOCK_D=256, BLOCK_DV=256) == [big]  # never empty


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_full_size_on_gpu(dtype: torch.dtype, causal: bool) -> None:
    q, k, v = _qkv(2, 12, 512, 512, 64, 64, dtype, "cuda")
    assert_kernel_close(
        kattention.attention(q, k, v, causal=causal), _reference(q, k, v, causal=causal), dtype
    )
    keep = torch.rand(2, 1, 1, 512, device="cuda") > 0.1
    got = kattention.attention(q, k, v, mask=keep, causal=causal)
    assert_kernel_close(got, _reference(q, k, v, mask=keep, causal=causal), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [16, 32, 80, 128])
def test_attention_head_dims_on_gpu(d: int) -> None:
    q, k, v = _qkv(2, 4, 333, 277, d, d, torch.float16, "cuda")
    assert_kernel_close(kattention.attention(q, k, v), _reference(q, k, v), torch.float16)
