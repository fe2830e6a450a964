"""Flash-attention forward: ``softmax(q @ k^T * scale + mask) @ v`` without the T x T matrix.

Semantics are those of ``F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
is_causal=causal, scale=scale)``: q ``[B, H, Tq, D]``, k ``[B, H, Tk, D]``, v ``[B, H, Tk, Dv]``;
the causal mask is top-left aligned (query i sees keys j <= i); a bool mask keeps True; a float
mask is added; mask and causal may be combined, as the SDPA CPU kernels do. A query row that
sees no key at all gives 0, as SDPA does (plain softmax would give NaN).

One program computes ``BLOCK_M`` query rows of one (batch, head) and walks the keys in
``BLOCK_N`` blocks with an online softmax (running max and sum in fp32, base-2 exponentials).
With ``causal``, key blocks entirely below the diagonal skip the causal mask and blocks above it
are not visited. Head dims that are not powers of two are padded to ``BLOCK_D`` with masks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from graphopt.errors import GraphoptError

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634
_MASK_NONE, _MASK_BOOL, _MASK_FLOAT = 0, 1, 2


def _configs() -> list[triton.Config]:
    if _INTERPRET:
        # The interpreter would run every config while autotuning; one small tile suffices.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16})]
    shapes = [
        # BLOCK_M, BLOCK_N, num_stages, num_warps
        (128, 64, 3, 4),
        (128, 64, 3, 8),
        (128, 128, 2, 8),
        (64, 64, 3, 4),
        (64, 32, 2, 4),
    ]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)
        for bm, bn, stages, warps in shapes
    ]


# Shared memory of an H100 / A100 block, less some slack for the compiler's own buffers.
_SMEM_BUDGET = 200 * 1024


def _prune_configs(
    configs: list[triton.Config], named_args: dict, **kwargs: object
) -> list[triton.Config]:
    """Drops tiles whose pipelined K and V buffers cannot fit in shared memory.

    Such a config would fail to compile anyway (fp32 with D = 128 or 256), but only after a slow
    compile; the smallest config is always kept.
    """
    args = {**named_args, **kwargs}
    head = int(args["BLOCK_D"]) + int(args["BLOCK_DV"])  # type: ignore[call-overload]
    size = args["q_ptr"].element_size()  # type: ignore[union-attr]

    def smem(c: triton.Config) -> int:
        return c.num_stages * c.kwargs["BLOCK_N"] * head * size

    fitting = [c for c in configs if smem(c) <= _SMEM_BUDGET]
    return fitting or [min(configs, key=smem)]


@triton.jit
def _attention_block(
    acc,
    l_i,
    m_i,
    q,
    k_ptr,
    v_ptr,
    mask_ptr,
    offs_m,
    offs_d,
    offs_dv,
    lo,
    hi,
    TQ,
    TK,
    D,
    DV,
    stride_kt,
    stride_kd,
    stride_vt,
    stride_vd,
    stride_mq,
    stride_mk,
    qk_scale,
    APPLY_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Folds key blocks [lo, hi) into the running (acc, l_i, m_i); logits are in base 2."""
    LOG2E: tl.constexpr = 1.4426950408889634
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < TK
        k_t = tl.load(
            k_ptr + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=n_valid[None, :] & (offs_d[:, None] < D),
            other=0.0,
        )
        if UPCAST_DOT:
            k_t = k_t.to(tl.float32)
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        if MASK_KIND != 0:
            m_valid = (offs_m[:, None] < TQ) & n_valid[None, :]
            m_ptrs = mask_ptr + offs_m[:, None] * stride_mq + offs_n[None, :] * stride_mk
            if MASK_KIND == 1:
                keep = tl.load(m_ptrs, mask=m_valid, other=0)
                s = tl.where(keep != 0, s, float("-inf"))
            else:
                s = s + tl.load(m_ptrs, mask=m_valid, other=0.0).to(tl.float32) * LOG2E
        if APPLY_CAUSAL:
            s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # Until a row has seen a visible key its reference point is 0, not -inf, so a fully
        # masked block adds exp2(-inf) = 0 rather than NaN.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + offs_n[:, None] * stride_vt + offs_dv[None, :] * stride_vd,
            mask=n_valid[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_configs(),
    key=["TQ_BUCKET", "TK_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "MASK_KIND"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    mask_ptr,
    o_ptr,
    H,
    TQ,
    TK,
    D,
    DV,
    TQ_BUCKET,
    TK_BUCKET,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_mb,
    stride_mh,
    stride_mq,
    stride_mk,
    qk_scale,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    mask_ptr += b * stride_mb + h * stride_mh
    o_ptr += pid_bh.to(tl.int64) * TQ * DV

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < TQ) & (offs_d[None, :] < D),
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    if CAUSAL:
        # Keys past the block's last query are never visible; key blocks ending at or before
        # its first query are fully visible and skip the causal mask.
        hi = tl.minimum(TK, (pid_m + 1) * BLOCK_M)
        diagonal = tl.minimum((pid_m * BLOCK_M) // BLOCK_N * BLOCK_N, hi)
        acc, l_i, m_i = _attention_block(
            acc, l_i, m_i, q, k_ptr, v_ptr, mask_ptr, offs_m, offs_d, offs_dv, 0, diagonal,
            TQ, TK, D, DV, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq, stride_mk,
            qk_scale, False, MASK_KIND, UPCAST_DOT, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        acc, l_i, m_i = _attention_block(
            acc, l_i, m_i, q, k_ptr, v_ptr, mask_ptr, offs_m, offs_d, offs_dv, diagonal, hi,
            TQ, TK, D, DV, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq, stride_mk,
            qk_scale, True, MASK_KIND, UPCAST_DOT, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
    else:
        acc, l_i, m_i = _attention_block(
            acc, l_i, m_i, q, k_ptr, v_ptr, mask_ptr, offs_m, offs_d, offs_dv, 0, TK,
            TQ, TK, D, DV, stride_kt, stride_kd, stride_vt, stride_vd, stride_mq, stride_mk,
            qk_scale, False, MASK_KIND, UPCAST_DOT, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip

    # Rows that saw no visible key have l = 0 and acc = 0: they come out as 0, like SDPA.
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + offs_m[:, None] * DV + offs_dv[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=(offs_m[:, None] < TQ) & (offs_dv[None, :] < DV),
    )


def _check_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES or t.dim() != 4:
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise GraphoptError(
                f"attention: {name} must be a 4-d [B, H, T, D] float16/bfloat16/float32 tensor, "
                f"got {got}"
            )
        if t.dtype != q.dtype or t.device != q.device:
            raise GraphoptError(
                f"attention: q, k and v must share dtype and device; q is {q.dtype} on "
                f"{q.device}, {name} is {t.dtype} on {t.device}"
            )
    if q.device.type != "cuda" and not _INTERPRET:
        raise GraphoptError(
            f"attention: q is on {q.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    (b, h, _, d), (_, _, tk, dv) = q.shape, v.shape
    if k.shape != (b, h, tk, d) or v.shape[:2] != (b, h):
        raise GraphoptError(
            f"attention: expected q [B, H, Tq, D], k [B, H, Tk, D], v [B, H, Tk, Dv]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (0 < d <= _MAX_HEAD_DIM and 0 < dv <= _MAX_HEAD_DIM):
        raise GraphoptError(
            f"attention: head dims must be in 1..{_MAX_HEAD_DIM}, got D={d}, Dv={dv}"
        )
    if b * h > 65535:
        raise GraphoptError(f"attention: B * H = {b * h} exceeds the grid limit of 65535")
    if mask is None:
        return
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise GraphoptError(f"attention: mask must be bool or floating, got {mask.dtype}")
    if mask.device != q.device:
        raise GraphoptError(f"attention: mask is on {mask.device} but q is on {q.device}")
    full = (b, h, q.shape[2], tk)
    try:
        fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, full) == full
    except RuntimeError:
        fits = False
    if not fits:
        raise GraphoptError(
            f"attention: mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Tq, Tk] "
            f"= {list(full)}"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)``.

    q ``[B, H, Tq, D]``, k ``[B, H, Tk, D]``, v ``[B, H, Tk, Dv]``: float16, bfloat16 or float32
    (all the same), any strides, head dims 1..256. mask: None, bool (True keeps) or float
    (added), broadcastable to ``[B, H, Tq, Tk]`` and read through broadcast strides. scale
    defaults to ``1 / sqrt(D)``. Returns a contiguous ``[B, H, Tq, Dv]`` tensor in q's dtype.
    """
    _check_inputs(q, k, v, mask)
    b, h, tq, d = q.shape
    tk, dv = v.shape[2], v.shape[3]
    out = torch.empty((b, h, tq, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if tk == 0:  # no keys: every row sees nothing, which SDPA's convention makes 0
        return out.zero_()
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    kind = _MASK_NONE if mask is None else _MASK_BOOL if mask.dtype == torch.bool else _MASK_FLOAT
    if mask is None:
        mask_arg, mask_strides = q, (0, 0, 0, 0)
    else:
        mask_arg = mask.expand(b, h, tq, tk)
        if kind == _MASK_BOOL:
            mask_arg = mask_arg.view(torch.uint8)
        mask_strides = mask_arg.stride()
    # The interpreter multiplies bfloat16 tiles as raw uint16 bits; give it fp32 instead.
    upcast = _INTERPRET and q.dtype == torch.bfloat16
    # fp32: exact products (no TF32), like ATen; the setting is ignored for 16-bit operands.
    precision = "ieee" if q.dtype == torch.float32 or upcast else "tf32"

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(tq, meta["BLOCK_M"]), b * h)

    _attention_kernel[grid](
        q, k, v, mask_arg, out, h, tq, tk, d, dv,
        triton.next_power_of_2(tq), triton.next_power_of_2(tk),
        *q.stride(), *k.stride(), *v.stride(), *mask_strides, scale * _LOG2E,
        CAUSAL=bool(causal), MASK_KIND=kind, UPCAST_DOT=upcast, DOT_PRECISION=precision,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )  # fmt: skip
    return out
