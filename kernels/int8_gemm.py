"""int8 linear layers: W8A8 GEMM with a dequantizing epilogue, weight-only W8A16, quantizers.

    int8_linear:   acc = xq @ wq.T                      (int8 x int8 -> exact int32, tl.dot)
                   y   = acc * x_scale[:, None] * w_scale[None, :] + bias     (fp32)
                   y   = act(y), then out_dtype, or requantized: round(y / out_scale) -> int8
    w8a16_linear:  y   = act((x @ wq.T) * w_scale + bias)   (int8 weight tiles converted to x's
                   dtype in registers, fp32 accumulation; split-K for decode-sized M)
    quantize_per_token:  scale = max(amax(|row|), 1e-12) / 127, xq = round(x / scale)
    quantize_per_tensor: xq = round(x / scale)

Weights are ``[N, K]`` (the ``nn.Linear`` layout) read through their strides, so a transposed
weight needs no copy. GEMM tiles are walked in groups of ``GROUP_M`` tile-rows (the Triton matmul
tutorial's order) and autotuned per (M bucket, N, K); the interpreter gets one small config.

Rounding everywhere is round-half-to-even (``torch.round``) of the IEEE-rounded fp32 quotient
``x / scale`` (``tl.math.div_rn``), clamped to [-127, 127]: -128 is never produced, so the int8
range stays symmetric. The quantizers therefore equal ``torch.round(x.float() / scale)
.clamp(-127, 127)`` bit for bit when the division is a true division (torch divides by a Python
float scalar on CUDA as a multiplication by its reciprocal, which can differ by one at ties).
The rounding is written with ``tl.floor`` (exact for |v| <= 127) rather than libdevice's
``rint``, which Triton's interpreter does not implement. NaN inputs give unspecified codes.

The int32 accumulator wraps (like ``torch._int_mm``) once |sum| >= 2**31, i.e. only for
K > 2**31 / 128**2 = 131072 with extreme codes.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from graphopt.errors import GraphoptError
from graphopt.kernels.activations import INT8_EPILOGUES
from graphopt.kernels.epilogue import HAS_ERF, apply_activation
from graphopt.kernels.gemm import grouped_tile, tile_configs

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_AMAX_EPS = 1e-12  # all-zero rows get a tiny scale (and codes 0) instead of 0 / 0

# w8a16: M up to this is "decode" (16-row tiles, split-K when the N tiles cannot fill the GPU).
W8A16_SMALL_M = 16
_MAX_SPLIT_K = 8
_MIN_K_PER_SPLIT = 256
_QUANT_TILE = 4096  # elements of one quantizer program's tile
_REDUCE_BLOCK = 1024


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); int8 x int8 tiles read 128-byte K rows
INT8_TILES = [
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (128, 128, 128, 4, 4),
    (128, 128, 128, 3, 8),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),
    (128, 64, 128, 4, 4),
    (64, 64, 128, 4, 4),
    (32, 64, 128, 4, 4),
    (16, 64, 256, 3, 4),
]
# w8a16: 16-row tiles for decode, larger ones for prefill (_prune_w8a16 picks the family)
W8A16_TILES = [
    (16, 32, 128, 4, 4),
    (16, 64, 128, 4, 4),
    (16, 64, 256, 3, 4),
    (16, 128, 128, 4, 4),
    (16, 128, 64, 5, 4),
    (16, 32, 256, 4, 2),
    (32, 64, 128, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 64, 3, 8),
    (128, 64, 64, 4, 4),
]
W8A16_INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


def _prune_w8a16(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list:
    # Decode (M <= 16) only tries 16-row tiles; larger M only tiles that are mostly rows of x.
    m = named_args["M_BUCKET"]
    keep = [c for c in configs if (c.kwargs["BLOCK_M"] <= 16) == (m <= W8A16_SMALL_M)]
    return keep or configs


@triton.jit
def _round_half_even(v):
    # torch.round's rule; exact for |v| < 2**22 (v - floor(v) is exact there).
    r = tl.floor(v)
    frac = v - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


@triton.jit
def _quantize(v, scale):
    """int8 codes of fp32 ``v / scale``: IEEE division, clamp to [-127, 127], half to even."""
    q = tl.math.div_rn(v, scale)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return _round_half_even(q).to(tl.int8)


@triton.autotune(configs=tile_configs(INT8_TILES), key=["M_BUCKET", "N", "K"])
@triton.jit
def _int8_gemm_kernel(
    x_ptr,
    w_ptr,
    xs_ptr,
    ws_ptr,
    bias_ptr,
    out_scale_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_xs,
    stride_ws,
    stride_bias,
    out_scale,
    RAW: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    REQUANT: tl.constexpr,
    OUT_SCALE_FROM_PTR: tl.constexpr,
    HAS_ERF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & n_mask[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = m_mask[:, None] & n_mask[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if RAW:
        tl.store(y_ptrs, acc, mask=mask)
    else:
        x_scale = tl.load(xs_ptr + offs_m * stride_xs, mask=m_mask, other=0.0)
        w_scale = tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0)
        y = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
            y = y + bias.to(tl.float32)[None, :]
        y = apply_activation(y, ACTIVATION, HAS_ERF)
        if REQUANT:
            if OUT_SCALE_FROM_PTR:
                out_scale = tl.load(out_scale_ptr)
            tl.store(y_ptrs, _quantize(y, out_scale), mask=mask)
        else:
            tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(
    configs=tile_configs(W8A16_TILES, W8A16_INTERPRETER_TILE),
    key=["M_BUCKET", "N", "K", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _prune_w8a16},
)
@triton.jit
def _w8a16_kernel(
    x_ptr,
    w_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ws,
    stride_bias,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    HAS_ERF: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    pid_k = tl.program_id(1)
    # Split pid_k reduces K blocks [k_first, k_last); a trailing split may get none (zeros).
    k_blocks = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_blocks, SPLIT_K)
    k_first = pid_k * per_split
    k_last = tl.minimum(k_first + per_split, k_blocks)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = k_first * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for _ in range(k_first, k_last):
        k_mask = offs_k < K
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        else:
            b = b.to(a.dtype)  # |code| <= 128 is exact in fp16, bf16 and fp32
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        offs_k += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if SPLIT_K == 1:
        w_scale = tl.load(ws_ptr + offs_n * stride_ws, mask=n_mask, other=0.0)
        y = acc * w_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
            y = y + bias.to(tl.float32)[None, :]
        y = apply_activation(y, ACTIVATION, HAS_ERF)
        tl.store(y_ptr + rows * N + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        part_ptrs = part_ptr + (pid_k * M + rows) * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask)


@triton.jit
def _split_k_epilogue_kernel(
    part_ptr,
    ws_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    stride_ws,
    stride_bias,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    HAS_ERF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Sums the SPLIT_K fp32 partials in a fixed order (deterministic), then the epilogue.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    cols = offs % N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    y = acc * tl.load(ws_ptr + cols * stride_ws, mask=mask, other=0.0)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + cols * stride_bias, mask=mask, other=0.0).to(tl.float32)
    y = apply_activation(y, ACTIVATION, HAS_ERF)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(
    x_ptr,
    q_ptr,
    scale_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    scale,
    PER_TOKEN: tl.constexpr,
    AMAX_EPS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rows[:, None].to(tl.int64) * K
    if PER_TOKEN:
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            mask = row_mask[:, None] & (cols[None, :] < K)
            x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        row_scale = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), 127.0)
        tl.store(scale_ptr + rows, row_scale, mask=row_mask)
    else:
        row_scale = tl.zeros([ROWS], dtype=tl.float32) + scale
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0)
        q = _quantize(x.to(tl.float32), row_scale[:, None])
        tl.store(q_rows + cols[None, :], q, mask=mask)


# ---------------------------------------------------------------------------------------------
# host side


def _fail(op: str, message: str) -> GraphoptError:
    return GraphoptError(f"{op}: {message}")


def _got(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_device(op: str, x: torch.Tensor, **others: torch.Tensor | None) -> None:
    if x.device.type != "cuda" and not _INTERPRET:
        raise _fail(
            op,
            f"inputs are on {x.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)",
        )
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise _fail(op, f"{name} is on {t.device} but the input is on {x.device}")


def _check_weight(op: str, x: torch.Tensor, wq: torch.Tensor) -> None:
    if not isinstance(wq, torch.Tensor) or wq.dtype != torch.int8 or wq.dim() != 2:
        raise _fail(op, f"wq must be an int8 [N, K] tensor, got {_got(wq)}")
    if x.dim() < 1 or x.shape[-1] != wq.shape[1]:
        raise _fail(
            op,
            f"expected x [..., K] and wq [N, K] with the same K, got x {tuple(x.shape)} "
            f"and wq {tuple(wq.shape)}",
        )


def _check_scale(op: str, name: str, scale: object, sizes: tuple[int, ...], dims: str) -> None:
    if (
        not isinstance(scale, torch.Tensor)
        or scale.dtype != torch.float32
        or scale.numel() not in sizes
    ):
        raise _fail(
            op, f"{name} must be a float32 tensor of shape {dims} or [1], got {_got(scale)}"
        )


def _check_bias(op: str, bias: torch.Tensor | None, n: int) -> None:
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.shape != (n,) or not bias.is_floating_point()
    ):
        raise _fail(op, f"bias must be a float [{n}] tensor or None, got {_got(bias)}")


def _check_activation(op: str, activation: str) -> None:
    if activation not in INT8_EPILOGUES:
        raise _fail(op, f"unknown activation {activation!r}; supported: {INT8_EPILOGUES}")


def _flat_scale(scale: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The scale as 1-D and its stride: 0 broadcasts a single value over every row/column."""
    flat = scale.reshape(-1)
    return flat, (0 if flat.numel() == 1 else flat.stride(0))


def _as_2d(x: torch.Tensor, wq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """x as [M, K] (a view where reshape allows) and wq; an empty K becomes one zero column."""
    n, k = wq.shape
    m = math.prod(x.shape[:-1])
    if k == 0:  # empty reduction: the epilogue applied to a zero accumulator
        return (
            torch.zeros((m, 1), dtype=x.dtype, device=x.device),
            torch.zeros((n, 1), dtype=wq.dtype, device=wq.device),
            m,
            n,
            1,
        )
    return x.reshape(m, k), wq, m, n, k


def _launch_int8(
    xq: torch.Tensor,
    wq: torch.Tensor,
    y: torch.Tensor,
    x_scale: torch.Tensor | None,
    w_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    activation: str,
    out_scale: float | torch.Tensor | None,
) -> None:
    x2, w2, m, n, k = _as_2d(xq, wq)
    raw = x_scale is None
    xs, stride_xs = _flat_scale(x_scale) if x_scale is not None else (y, 0)
    ws, stride_ws = _flat_scale(w_scale) if w_scale is not None else (y, 0)
    scale_tensor = out_scale if isinstance(out_scale, torch.Tensor) else None
    scale_value = float(out_scale) if isinstance(out_scale, (int, float)) else 1.0

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _int8_gemm_kernel[grid](
        x2, w2, xs, ws, bias if bias is not None else y,
        scale_tensor if scale_tensor is not None else y, y,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), w2.stride(0), w2.stride(1), stride_xs, stride_ws,
        bias.stride(0) if bias is not None else 0, scale_value,
        RAW=raw, HAS_BIAS=bias is not None, ACTIVATION=activation,
        REQUANT=out_scale is not None, OUT_SCALE_FROM_PTR=scale_tensor is not None,
        HAS_ERF=HAS_ERF,
    )  # fmt: skip


def int8_matmul_i32(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """The exact integer product ``xq @ wq.T`` as int32 ``[..., N]`` (wraps past 2**31).

    xq: int8 ``[..., K]``; wq: int8 ``[N, K]``, any strides. Equals ``torch._int_mm(xq,
    wq.t())`` (which needs M > 16 and K, N multiples of 8; this has no such limits).
    """
    op = "int8_matmul_i32"
    if not isinstance(xq, torch.Tensor) or xq.dtype != torch.int8:
        raise _fail(op, f"xq must be an int8 [..., K] tensor, got {_got(xq)}")
    _check_weight(op, xq, wq)
    _check_device(op, xq, wq=wq)
    y = torch.empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.int32, device=xq.device)
    if y.numel() == 0:
        return y
    if wq.shape[1] == 0:
        return y.zero_()
    _launch_int8(xq, wq, y, None, None, None, "none", None)
    return y


def int8_linear(
    xq: torch.Tensor,
    wq: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    out_dtype: torch.dtype = torch.float16,
    out_scale: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 linear: ``act((xq @ wq.T) * x_scale[:, None] * w_scale[None, :] + bias)``.

    xq: int8 ``[..., K]``; wq: int8 ``[N, K]``, any strides. x_scale: float32 with one value per
    row of xq (``[M]`` or xq's leading shape; per-token) or a single value (``[1]``/``[]``;
    per-tensor). w_scale: float32 ``[N]`` (per-channel) or a single value. bias: ``[N]`` of any
    float dtype or None. activation: one of :data:`INT8_EPILOGUES`. The integer product is
    exact (int32), the epilogue fp32. Output ``[..., N]``: ``out_dtype`` (float16, bfloat16 or
    float32), or, when ``out_scale`` (a positive float, or a float32 tensor with one element) is
    given, int8 codes ``round_half_even(y / out_scale)`` clamped to [-127, 127].
    """
    op = "int8_linear"
    if not isinstance(xq, torch.Tensor) or xq.dtype != torch.int8:
        raise _fail(op, f"xq must be an int8 [..., K] tensor, got {_got(xq)}")
    _check_weight(op, xq, wq)
    m, n = math.prod(xq.shape[:-1]), wq.shape[0]
    _check_scale(op, "x_scale", x_scale, (1, m), f"[M={m}]")
    _check_scale(op, "w_scale", w_scale, (1, n), f"[N={n}]")
    _check_bias(op, bias, n)
    _check_activation(op, activation)
    if out_dtype not in _FLOAT_DTYPES:
        raise _fail(op, f"out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    scale_tensor = out_scale if isinstance(out_scale, torch.Tensor) else None
    if out_scale is not None:
        if scale_tensor is not None:
            if scale_tensor.dtype != torch.float32 or scale_tensor.numel() != 1:
                raise _fail(
                    op, f"out_scale tensor must be float32 with one element, got {_got(out_scale)}"
                )
        elif not isinstance(out_scale, (int, float)) or not 0 < out_scale < math.inf:
            raise _fail(op, f"out_scale must be a positive finite float, got {out_scale!r}")
    _check_device(
        op, xq, wq=wq, x_scale=x_scale, w_scale=w_scale, bias=bias, out_scale=scale_tensor
    )
    dtype = torch.int8 if out_scale is not None else out_dtype
    y = torch.empty((*xq.shape[:-1], n), dtype=dtype, device=xq.device)
    if y.numel() == 0:
        return y
    _launch_int8(xq, wq, y, x_scale, w_scale, bias, activation, out_scale)
    return y


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """Splits of K for w8a16: only for decode-sized M, until the tiles about fill the GPU."""
    if m > W8A16_SMALL_M:
        return 1
    tiles = triton.cdiv(n, 64)  # a typical decode BLOCK_N
    split = 1
    while (
        split < _MAX_SPLIT_K
        and 2 * tiles * split <= _num_sms(device)
        and k // (2 * split) >= _MIN_K_PER_SPLIT
    ):
        split *= 2
    return split


def w8a16_linear(
    x: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """Weight-only int8 linear: ``act((x @ wq.T) * w_scale + bias)`` in x's dtype.

    x: float16, bfloat16 or float32 ``[..., K]``; wq: int8 ``[N, K]``, any strides; w_scale:
    float32 ``[N]`` (per-channel) or a single value; bias: ``[N]`` of any float dtype or None.
    Weight tiles are converted to x's dtype in registers (exact) and multiplied with fp32
    accumulation; the scale, bias and activation (one of :data:`INT8_EPILOGUES`) run in fp32.
    For M <= ``W8A16_SMALL_M`` (decode) K is split across programs when the N tiles alone
    cannot fill the GPU; the fp32 partials are then summed in a fixed order by a second kernel
    that applies the epilogue (deterministic, no atomics).
    """
    op = "w8a16_linear"
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise _fail(op, f"x must be a float16/bfloat16/float32 [..., K] tensor, got {_got(x)}")
    _check_weight(op, x, wq)
    n = wq.shape[0]
    _check_scale(op, "w_scale", w_scale, (1, n), f"[N={n}]")
    _check_bias(op, bias, n)
    _check_activation(op, activation)
    _check_device(op, x, wq=wq, w_scale=w_scale, bias=bias)
    y = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    x2, w2, m, n, k = _as_2d(x, wq)
    ws, stride_ws = _flat_scale(w_scale)
    split = choose_split_k(m, n, k, x.device)
    part = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    # The interpreter multiplies bfloat16 tiles as raw uint16 bits; give it fp32 instead.
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split)

    _w8a16_kernel[grid](
        x2, w2, ws, bias if bias is not None else y, y, part,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), w2.stride(0), w2.stride(1), stride_ws,
        bias.stride(0) if bias is not None else 0,
        SPLIT_K=split, HAS_BIAS=bias is not None, ACTIVATION=activation,
        DOT_PRECISION=precision, UPCAST_DOT=upcast, HAS_ERF=HAS_ERF,
    )  # fmt: skip
    if split > 1:
        _split_k_epilogue_kernel[(triton.cdiv(m * n, _REDUCE_BLOCK),)](
            part, ws, bias if bias is not None else y, y, m, n, stride_ws,
            bias.stride(0) if bias is not None else 0,
            SPLIT_K=split, HAS_BIAS=bias is not None, ACTIVATION=activation, HAS_ERF=HAS_ERF,
            BLOCK=_REDUCE_BLOCK,
        )  # fmt: skip
    return y


def _quantize_rows(
    x: torch.Tensor, scale: float | None, op: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
        raise _fail(op, f"x must be a float16/bfloat16/float32 tensor, got {_got(x)}")
    per_token = scale is None
    if per_token and x.dim() < 1:
        raise _fail(op, f"x must have at least one dimension (rows of the last), got {_got(x)}")
    _check_device(op, x)
    k = x.shape[-1] if x.dim() else 1
    m = math.prod(x.shape[:-1]) if x.dim() else 1
    q = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    row_scale = torch.empty(m, dtype=torch.float32, device=x.device) if per_token else None
    if q.numel() == 0:  # an empty row has amax 0: the smallest scale, like an all-zero row
        return q, row_scale.fill_(_AMAX_EPS).div_(127) if row_scale is not None else None
    x2 = x.reshape(m, k)
    block_k = min(triton.next_power_of_2(k), _QUANT_TILE)
    rows = max(1, _QUANT_TILE // block_k)
    _quantize_kernel[(triton.cdiv(m, rows),)](
        x2, q, row_scale if row_scale is not None else q, m, k, x2.stride(0), x2.stride(1),
        1.0 if scale is None else float(scale),
        PER_TOKEN=per_token, AMAX_EPS=_AMAX_EPS, ROWS=rows, BLOCK_K=block_k,
    )  # fmt: skip
    return q, row_scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per row of the last dimension, and the rows' float32 scales.

    ``scale = max(amax(|row|), 1e-12) / 127`` (an all-zero row gets codes 0), ``xq =
    round_half_even(x / scale)`` clamped to [-127, 127], all in fp32 from any float dtype.
    Returns xq with x's shape and scale ``[M]``, M = the product of x's leading dimensions.
    """
    q, scale = _quantize_rows(x, None, "quantize_per_token")
    assert scale is not None
    return q, scale


def quantize_per_tensor(x: torch.Tensor, scale: float) -> torch.Tensor:
    """int8 codes ``round_half_even(x / scale)`` clamped to [-127, 127], in x's shape (fp32 math)."""
    op = "quantize_per_tensor"
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
        raise _fail(op, f"scale must be a positive finite float, got {scale!r}")
    return _quantize_rows(x, float(scale), op)[0]
