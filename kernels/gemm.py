"""Linear layer GEMM with a fused epilogue: ``y = act(alpha * (x @ weight.T) + bias) + residual``.

x is ``[..., K]``, weight ``[N, K]`` (the ``nn.Linear`` layout, read through its strides, so a
transposed weight needs no copy). Tiles of ``BLOCK_M x BLOCK_N`` accumulate in fp32 with
``tl.dot``; programs are ordered in groups of ``GROUP_M`` tile-rows so that neighbouring programs
share x and weight tiles in L2 (the Triton matmul tutorial's ordering). The epilogue (scale, bias,
activation, residual) runs on the fp32 accumulator before the single store.

fp32 inputs use ``input_precision="ieee"`` (no TF32: results match ``F.linear`` on the CPU, at
fp32 tensor-core-less speed); fp16/bf16 inputs use the tensor cores with fp32 accumulation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from graphopt.errors import GraphoptError
from graphopt.kernels.activations import EPILOGUES
from graphopt.kernels.epilogue import HAS_ERF, apply_activation

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# one small tile under the interpreter, which would run every config while autotuning
INTERPRETER_TILE = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}

# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of the fp16/bf16/fp32 GEMM
TILES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 5, 2),
]


def tile_configs(
    tiles: list[tuple[int, int, int, int, int]], interpreter_tile: dict[str, int] = INTERPRETER_TILE
) -> list[triton.Config]:
    """Autotune configs of a grouped-order GEMM (``GROUP_M`` 8), one per
    (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps); only ``interpreter_tile`` under
    ``TRITON_INTERPRET=1``."""
    if _INTERPRET:
        return [triton.Config(dict(interpreter_tile))]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
            num_stages=stages,
            num_warps=warps,
        )
        for bm, bn, bk, stages, warps in tiles
    ]


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The (tile-row, tile-column) of program ``pid``: GROUP_M tile-rows are walked column by
    column, so neighbouring programs share x and weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.autotune(configs=tile_configs(TILES), key=["M_BUCKET", "N_BUCKET", "K_BUCKET"])
@triton.jit
def _linear_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    res_ptr,
    y_ptr,
    M,
    N,
    K,
    M_BUCKET,
    N_BUCKET,
    K_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_bias,
    stride_rm,
    stride_rn,
    alpha,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
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
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = acc * alpha
    n_mask = offs_n < N
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0)
        acc = acc + bias.to(tl.float32)[None, :]
    acc = apply_activation(acc, ACTIVATION, HAS_ERF)
    mask = (offs_m[:, None] < M) & n_mask[None, :]
    rows = offs_m[:, None].to(tl.int64)
    if HAS_RESIDUAL:
        res = tl.load(
            res_ptr + rows * stride_rm + offs_n[None, :] * stride_rn, mask=mask, other=0.0
        )
        acc = acc + res.to(tl.float32)
    tl.store(y_ptr + rows * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    residual: torch.Tensor | None,
) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dtype not in _DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise GraphoptError(
                f"linear: {name} must be a float16/bfloat16/float32 tensor, got {got}"
            )
    if x.dtype != weight.dtype:
        raise GraphoptError(
            f"linear: x is {x.dtype} but weight is {weight.dtype}; cast one of them"
        )
    if x.dim() < 1 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise GraphoptError(
            f"linear: expected x [..., K] and weight [N, K], got x {tuple(x.shape)} and "
            f"weight {tuple(weight.shape)}"
        )
    if x.device.type != "cuda" and not _INTERPRET:
        raise GraphoptError(
            f"linear: x is on {x.device}; the Triton kernel needs CUDA tensors "
            "(or TRITON_INTERPRET=1 for the CPU interpreter)"
        )
    if activation not in EPILOGUES:
        raise GraphoptError(f"linear: unknown activation {activation!r}; supported: {EPILOGUES}")
    n = weight.shape[0]
    out_shape = (*x.shape[:-1], n)
    others = {"weight": weight, "bias": bias, "residual": residual}
    for name, t in others.items():
        if t is not None and t.device != x.device:
            raise GraphoptError(f"linear: {name} is on {t.device} but x is on {x.device}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise GraphoptError(f"linear: bias must be a float [{n}] tensor, got {tuple(bias.shape)}")
    if residual is not None:
        try:
            fits = torch.broadcast_shapes(residual.shape, out_shape) == out_shape
        except RuntimeError:
            fits = False
        if not fits or not residual.is_floating_point():
            raise GraphoptError(
                f"linear: residual must be a float tensor broadcastable to the output "
                f"{out_shape}, got {residual.dtype} {tuple(residual.shape)}"
            )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    residual: torch.Tensor | None = None,
    alpha: float = 1.0,
) -> torch.Tensor:
    """``act(alpha * (x @ weight.T) + bias) + residual`` in one kernel, in x's dtype.

    x: ``[..., K]`` and weight ``[N, K]``, both float16, bfloat16 or float32 (the same), any
    strides. bias: ``[N]`` float tensor or None. residual: float tensor broadcastable to the
    output ``[..., N]`` or None. activation: one of :data:`EPILOGUES` (``gelu`` is the erf form,
    ``gelu_tanh`` the tanh approximation). Accumulation is fp32.
    """
    _check_inputs(x, weight, bias, activation, residual)
    n, k = weight.shape
    out_shape = (*x.shape[:-1], n)
    y = torch.empty(out_shape, dtype=x.dtype, device=x.device)
    m = math.prod(x.shape[:-1])
    if y.numel() == 0:
        return y
    if k == 0:  # empty reduction: the epilogue applied to a zero accumulator
        x2 = torch.zeros((m, 1), dtype=x.dtype, device=x.device)
        weight = torch.zeros((n, 1), dtype=x.dtype, device=x.device)
        k = 1
    else:
        x2 = x.reshape(m, k)
    # A broadcast residual stays a view (stride 0) wherever reshape allows it.
    r2 = residual.expand(out_shape).reshape(-1, n) if residual is not None else y.view(-1, n)
    # The interpreter multiplies bfloat16 tiles as raw uint16 bits; give it fp32 instead.
    upcast = _INTERPRET and x.dtype == torch.bfloat16
    # fp32: exact products (no TF32), like ATen; the setting is ignored for 16-bit operands.
    precision = "ieee" if x.dtype == torch.float32 or upcast else "tf32"

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _linear_kernel[grid](
        x2, weight, bias if bias is not None else y, r2, y, m, n, k,
        triton.next_power_of_2(m), triton.next_power_of_2(n), triton.next_power_of_2(k),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, r2.stride(0), r2.stride(1), float(alpha),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, ACTIVATION=activation,
        DOT_PRECISION=precision, UPCAST_DOT=upcast, HAS_ERF=HAS_ERF,
    )  # fmt: skip
    return y
