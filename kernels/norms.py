"""Row-wise normalization kernels: LayerNorm and RMSNorm, optionally fused with a residual add.

    s = x + residual                          (written out: the residual stream needs it)
    layer_norm: y = (s - mean(s)) * rsqrt(var(s) + eps) * weight + bias
    rms_norm:   y = s * rsqrt(mean(s^2) + eps) * weight

Both normalize over the last dimension. One program handles ``ROWS`` rows. A row of up to
``MAX_FUSED_N`` elements is held in registers (x is read once); longer rows are streamed in
chunks (statistics passes, then a normalize pass that reads the row again). Statistics are
accumulated in fp32 whatever the input dtype; ``s`` is rounded to the input dtype before it is
normalized, exactly like ``F.layer_norm(x + residual)`` in that dtype.
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
# Module attributes (not constants in the kernel) so tests can force the streaming path.
MAX_FUSED_N = 16384
STREAM_BLOCK_N = 4096
# Elements of one program's tile when rows are short (several rows per program).
_TILE_ELEMENTS = 4096


@triton.jit
def _load_sum(
    x_ptr,
    res_ptr,
    s_ptr,
    rows,
    cols,
    M,
    N,
    stride_xm,
    stride_xn,
    stride_rm,
    stride_rn,
    HAS_RESIDUAL: tl.constexpr,
    STORE_SUM: tl.constexpr,
):
    """Loads a [ROWS, BLOCK_N] tile of s = x (+ residual) as fp32; padding lanes are 0."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(
            res_ptr + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0
        )
        # Round the sum to the input dtype, as `x + residual` does in torch.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(s_ptr + rows[:, None] * N + cols[None, :], x, mask=mask)
    return x.to(tl.float32)


@triton.jit
def _affine_store(
    y_hat,
    w_ptr,
    b_ptr,
    y_ptr,
    rows,
    cols,
    M,
    N,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Stores y = y_hat * weight + bias (each optional) into the contiguous output."""
    col_mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y_hat = y_hat * w[None, :]
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        y_hat = y_hat + b[None, :]
    mask = (rows[:, None] < M) & col_mask[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y_hat.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    s_ptr,
    M,
    N,
    stride_xm,
    stride_xn,
    stride_rm,
    stride_rn,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_TILE: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    if SINGLE_TILE:
        # The whole row lives in registers: one read of x (and residual), one write of y (and s).
        cols = tl.arange(0, BLOCK_N)
        s = _load_sum(
            x_ptr, res_ptr, s_ptr, rows, cols, M, N, stride_xm, stride_xn, stride_rm, stride_rn,
            HAS_RESIDUAL, True,
        )  # fmt: skip
        if IS_RMS:
            rstd = tl.math.rsqrt(tl.sum(s * s, axis=1) / N + eps)
            y_hat = s * rstd[:, None]
        else:
            mean = tl.sum(s, axis=1) / N
            d = tl.where(cols[None, :] < N, s - mean[:, None], 0.0)
            rstd = tl.math.rsqrt(tl.sum(d * d, axis=1) / N + eps)
            y_hat = d * rstd[:, None]
        _affine_store(y_hat, w_ptr, b_ptr, y_ptr, rows, cols, M, N, HAS_WEIGHT, HAS_BIAS)
    else:
        # Streaming: statistics pass(es) over BLOCK_N chunks, then a normalize pass.
        # The first pass writes s; later passes recompute x + residual rather than read s back
        # (other threads of this program wrote it: there is no ordering guarantee).
        mean = tl.zeros([ROWS], dtype=tl.float32)
        if not IS_RMS:
            acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                acc += _load_sum(
                    x_ptr, res_ptr, s_ptr, rows, cols, M, N, stride_xm, stride_xn, stride_rm,
                    stride_rn, HAS_RESIDUAL, True,
                )  # fmt: skip
            mean = tl.sum(acc, axis=1) / N
        acc = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _load_sum(
                x_ptr, res_ptr, s_ptr, rows, cols, M, N, stride_xm, stride_xn, stride_rm,
                stride_rn, HAS_RESIDUAL, IS_RMS,
            )  # fmt: skip
            d = tl.where(cols[None, :] < N, s - mean[:, None], 0.0)
            acc += d * d
        rstd = tl.math.rsqrt(tl.sum(acc, axis=1) / N + eps)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            s = _load_sum(
                x_ptr, res_ptr, s_ptr, rows, cols, M, N, stride_xm, stride_xn, stride_rm,
                stride_rn, HAS_RESIDUAL, False,
            )  # fmt: skip
            y_hat = (s - mean[:, None]) * rstd[:, None]
            _affine_store(y_hat, w_ptr, b_ptr, y_ptr, rows, cols, M, N, HAS_WEIGHT, HAS_BIAS)


def _check_inputs(
    op: str,
    x: torch.Tensor,
    params: dict[str, torch.Tensor | None],
    residual: torch.Tensor | None,
    eps: float,
) -> None:
    if not isinstance(x, torch.Tensor):
        raise GraphoptError(f"{op}: x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise GraphoptError(f"{op}: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise GraphoptError(
            f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}"
        )
    if x.device.type != "cuda" and not _INTERPRET:
        raise GraphoptError(
            f"{op}: x is on {x.device}; the Triton kernel needs a CUDA tensor "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    n = x.shape[-1]
    for name, p in params.items():
        if p is None:
            continue
        if p.shape != (n,):
            raise GraphoptError(f"{op}: {name} must have shape ({n},), got {tuple(p.shape)}")
        if not p.is_floating_point() or p.device != x.device:
            raise GraphoptError(
                f"{op}: {name} must be a floating tensor on {x.device}, got {p.dtype} on {p.device}"
            )
    if residual is not None and (
        residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device
    ):
        raise GraphoptError(
            f"{op}: residual must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), got "
            f"shape {tuple(residual.shape)}, {residual.dtype}, {residual.device}"
        )
    if not eps >= 0.0:
        raise GraphoptError(f"{op}: eps must be >= 0, got {eps}")


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n = x.shape[-1]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(y) if residual is not None else None
    if x.numel() == 0:
        return y, s
    # reshape is a view whenever the leading dims collapse (transposes and slices of the last
    # dims included); the kernel takes both strides of the [M, N] view.
    x2 = x.reshape(-1, n)
    r2 = residual.reshape(-1, n) if residual is not None else x2
    m = x2.shape[0]
    if n <= MAX_FUSED_N:
        block_n, single = triton.next_power_of_2(n), True
    else:
        block_n, single = min(STREAM_BLOCK_N, triton.next_power_of_2(MAX_FUSED_N)), False
    rows = max(1, min(_TILE_ELEMENTS // block_n, triton.next_power_of_2(m), 64))
    num_warps = min(max(rows * block_n // 512, 1), 8)
    w = weight.contiguous() if weight is not None else x2
    b = bias.contiguous() if bias is not None else x2
    _norm_kernel[(triton.cdiv(m, rows),)](
        x2, r2, w, b, y, s if s is not None else y,
        m, n, x2.stride(0), x2.stride(1), r2.stride(0), r2.stride(1), float(eps),
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, ROWS=rows, BLOCK_N=block_n, SINGLE_TILE=single,
        num_warps=num_warps,
    )  # fmt: skip
    return y, s


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm over the last dim of ``x`` (optionally of ``x + residual``).

    Returns ``(y, s)``: ``y = F.layer_norm(s, (N,), weight, bias, eps)`` and ``s = x + residual``
    (``None`` without a residual). x: float16/bfloat16/float32, any leading shape and strides;
    weight/bias: ``[N]`` floating tensors or None; residual: same shape and dtype as x. Outputs
    are contiguous, in x's dtype.
    """
    _check_inputs("layer_norm", x, {"weight": weight, "bias": bias}, residual, eps)
    return _launch(x, weight, bias, eps, residual, is_rms=False)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float | None,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim: ``y = s * rsqrt(mean(s^2) + eps) * weight``, ``s = x + residual``.

    Same conventions as :func:`layer_norm`; ``eps=None`` means ``torch.finfo(x.dtype).eps``, as in
    ``F.rms_norm``.
    """
    if eps is None and isinstance(x, torch.Tensor) and x.is_floating_point():
        eps = torch.finfo(x.dtype).eps
    _check_inputs("rms_norm", x, {"weight": weight}, residual, eps if eps is not None else 0.0)
    return _launch(x, weight, None, float(eps), residual, is_rms=True)
