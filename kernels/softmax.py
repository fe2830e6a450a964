"""Masked, scaled softmax: ``softmax(scale * x + mask)`` over one dimension.

The mask is a bool tensor (True keeps, False gives -inf) or an additive float tensor,
broadcastable to x; it is read through broadcast (zero) strides, never materialized. Rows are
addressed through up to three collapsed leading dimensions, so transposed or sliced inputs and
masks such as ``[B, 1, 1, T]`` or ``[T, T]`` need no copy.

A row of up to ``MAX_FUSED_N`` elements is held in registers (one read, one write); longer rows
use an online softmax (running max and sum in one pass, then a normalize pass). fp32 throughout.
A row whose every element is masked gives NaN, as ``torch.softmax`` does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from graphopt.errors import GraphoptError

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Longest row kept in registers; longer rows are streamed in chunks of STREAM_BLOCK_N.
# Module attributes (not kernel constants) so tests can force the streaming path.
MAX_FUSED_N = 16384
STREAM_BLOCK_N = 4096
_TILE_ELEMENTS = 4096

_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


@triton.jit
def _logits(
    x_ptr,
    mask_ptr,
    x_row,
    m_row,
    rows,
    cols,
    M,
    N,
    stride_xn,
    stride_mn,
    scale,
    MASK_KIND: tl.constexpr,
):
    """Returns a [ROWS, BLOCK_N] fp32 tile of scale * x + mask, -inf past the row's end.

    Rows past M (the tile's padding) read as finite values so that they never compute NaN.
    """
    valid = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + x_row[:, None] + cols[None, :] * stride_xn, mask=valid, other=0.0)
    z = x.to(tl.float32) * scale
    if MASK_KIND == 1:
        keep = tl.load(mask_ptr + m_row[:, None] + cols[None, :] * stride_mn, mask=valid, other=1)
        z = tl.where(keep != 0, z, float("-inf"))
    if MASK_KIND == 2:
        add = tl.load(mask_ptr + m_row[:, None] + cols[None, :] * stride_mn, mask=valid, other=0.0)
        z = z + add.to(tl.float32)
    return tl.where(cols[None, :] < N, z, float("-inf"))


@triton.jit
def _softmax_kernel(
    x_ptr,
    mask_ptr,
    y_ptr,
    M,
    N,
    D1,
    D2,
    stride_x0,
    stride_x1,
    stride_x2,
    stride_xn,
    stride_m0,
    stride_m1,
    stride_m2,
    stride_mn,
    scale,
    MASK_KIND: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    # Row r of the [D0, D1, D2] leading dims -> element offsets in x and in the mask.
    i2 = rows % D2
    i1 = (rows // D2) % D1
    i0 = rows // (D2 * D1)
    x_row = i0 * stride_x0 + i1 * stride_x1 + i2 * stride_x2
    m_row = i0 * stride_m0 + i1 * stride_m1 + i2 * stride_m2
    y_row = rows * N
    if SINGLE_TILE:
        cols = tl.arange(0, BLOCK_N)
        z = _logits(
            x_ptr, mask_ptr, x_row, m_row, rows, cols, M, N, stride_xn, stride_mn, scale, MASK_KIND
        )
        z_max = tl.max(z, axis=1)
        e = tl.exp2((z - z_max[:, None]) * LOG2E)
        y = e / tl.sum(e, axis=1)[:, None]
        mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(y_ptr + y_row[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Online softmax: running row_max and row_sum. Until a row has seen a finite logit its
        # reference point is 0 (not -inf), so chunks that are fully masked add exp(-inf) = 0
        # instead of NaN.
        row_max = tl.full([ROWS], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([ROWS], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z = _logits(
                x_ptr, mask_ptr, x_row, m_row, rows, cols, M, N, stride_xn, stride_mn, scale,
                MASK_KIND,
            )  # fmt: skip
            m_new = tl.maximum(row_max, tl.max(z, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            row_sum = row_sum * tl.exp2((row_max - m_ref) * LOG2E) + tl.sum(
                tl.exp2((z - m_ref[:, None]) * LOG2E), axis=1
            )
            row_max = m_new
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            z = _logits(
                x_ptr, mask_ptr, x_row, m_row, rows, cols, M, N, stride_xn, stride_mn, scale,
                MASK_KIND,
            )  # fmt: skip
            # A fully masked row has row_max = -inf: (-inf) - (-inf) = NaN, as in torch.
            y = tl.exp2((z - row_max[:, None]) * LOG2E) / row_sum[:, None]
            mask = (rows[:, None] < M) & (cols[None, :] < N)
            tl.store(
                y_ptr + y_row[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask
            )


def _collapse_leading(
    shape: tuple[int, ...], strides: list[tuple[int, ...]]
) -> tuple[list[int], list[list[int]]] | None:
    """Merges adjacent leading dims that are contiguous with each other in every tensor.

    Returns (sizes, per-tensor strides) padded to three dims, or None if more than three remain.
    """
    sizes: list[int] = []
    merged: list[list[int]] = [[] for _ in strides]
    for i, size in enumerate(shape):
        if size == 1:
            continue
        if sizes and all(st[-1] == s[i] * size for st, s in zip(merged, strides)):
            sizes[-1] *= size
            for st, s in zip(merged, strides):
                st[-1] = s[i]
        else:
            sizes.append(size)
            for st, s in zip(merged, strides):
                st.append(s[i])
    if len(sizes) > 3:
        return None
    pad = 3 - len(sizes)
    return [1] * pad + sizes, [[0] * pad + st for st in merged]


def _check_inputs(x: torch.Tensor, dim: int, mask: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in _DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise GraphoptError(f"softmax: x must be a float16/bfloat16/float32 tensor, got {got}")
    if x.dim() < 1:
        raise GraphoptError("softmax: x must have at least one dimension, got a 0-d tensor")
    if not -x.dim() <= dim < x.dim():
        raise GraphoptError(f"softmax: dim {dim} is out of range for a {x.dim()}-d tensor")
    if x.device.type != "cuda" and not _INTERPRET:
        raise GraphoptError(
            f"softmax: x is on {x.device}; the Triton kernel needs a CUDA tensor "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    if mask is None:
        return
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise GraphoptError(f"softmax: mask must be bool or floating, got {mask.dtype}")
    if mask.device != x.device:
        raise GraphoptError(f"softmax: mask is on {mask.device} but x is on {x.device}")
    try:
        fits = torch.broadcast_shapes(mask.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise GraphoptError(
            f"softmax: mask of shape {tuple(mask.shape)} does not broadcast to x's shape "
            f"{tuple(x.shape)}"
        )


def softmax(
    x: torch.Tensor,
    dim: int = -1,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``torch.softmax(scale * x + mask, dim)`` with the mask broadcast to x, in x's dtype.

    x: float16/bfloat16/float32, any shape and strides. mask: None, a bool tensor (False -> -inf)
    or a float tensor of any float dtype, broadcastable to x (never materialized unless x has
    more than three leading dims that cannot be merged). Rows whose elements are all masked are
    NaN, like torch. The result has x's shape; for ``dim`` other than the last it is a view of a
    tensor laid out with ``dim`` innermost.
    """
    _check_inputs(x, dim, mask)
    kind = _MASK_NONE if mask is None else _MASK_BOOL if mask.dtype == torch.bool else _MASK_FLOAT
    xt = x.movedim(dim, -1)
    mt = mask.expand(x.shape).movedim(dim, -1) if mask is not None else xt
    if kind == _MASK_BOOL:
        mt = mt.view(torch.uint8)
    y = torch.empty(xt.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.movedim(-1, dim)
    lead = tuple(xt.shape[:-1])
    layout = _collapse_leading(lead, [xt.stride()[:-1], mt.stride()[:-1]])
    if layout is None:  # more than three non-mergeable leading dims: copy them into one
        xt, mt = xt.contiguous(), mt.contiguous()
        layout = _collapse_leading(lead, [xt.stride()[:-1], mt.stride()[:-1]])
        assert layout is not None
    (d0, d1, d2), (sx, sm) = layout
    n = xt.shape[-1]
    m = d0 * d1 * d2
    if n <= MAX_FUSED_N:
        block_n, single = triton.next_power_of_2(n), True
    else:
        block_n, single = min(STREAM_BLOCK_N, triton.next_power_of_2(MAX_FUSED_N)), False
    rows = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(m), 64))
    num_warps = min(max(rows * block_n // 512, 1), 8)
    _softmax_kernel[(triton.cdiv(m, rows),)](
        xt, mt, y, m, n, d1, d2, sx[0], sx[1], sx[2], xt.stride(-1), sm[0], sm[1], sm[2],
        mt.stride(-1), float(scale), MASK_KIND=kind, ROWS=rows, BLOCK_N=block_n,
        SINGLE_TILE=single, num_warps=num_warps,
    )  # fmt: skip
    return y.movedim(-1, dim)
