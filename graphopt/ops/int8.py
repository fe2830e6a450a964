"""graphopt's int8 ops (``torch.ops.graphopt.*``), each registered by one call of
:func:`graphopt.ops.registry.define` from its ATen reference, like the float ops of
graphopt/ops/fused.py (whose epilogue and norm they reuse).

Symmetric int8 everywhere: range [-127, 127], zero point 0, round half to even (torch.round).
Scales are floats or tensors that the float64 reference run promotes, so the reference run of
an int8 graph is the exact real-valued version of its integer arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from graphopt.ir.program import Program
from graphopt.kernels.activations import INT8_EPILOGUES
from graphopt.ops.fused import epilogue, norm_reference
from graphopt.ops.registry import define

QMAX = 127


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _quantize_ref(x: Tensor, scale: float) -> Tensor:
    """``round(x / scale)`` clamped to [-127, 127], as int8 (per-tensor, symmetric)."""
    # divide in fp32 at least (as the kernel does): fp16 quotients would shift ties
    return torch.round(_at_least_fp32(x) / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def _quantize_kernel(x, scale):  # type: ignore[no-untyped-def]
    from graphopt.kernels import int8_gemm

    return int8_gemm.quantize_per_tensor(x, scale)


def _quantize_fake(x, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.int8)


quantize_per_tensor = define(
    "quantize_per_tensor", _quantize_ref, fake=_quantize_fake, kernel=_quantize_kernel
)


def _dequantize_ref(q: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """``q * scale`` in ``dtype`` (per-tensor)."""
    return q.to(dtype) * scale


def _dequantize_fake(q, scale, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(q, dtype=dtype)


# the dequantizers have no Triton kernel: ATen on every device
dequantize_per_tensor = define("dequantize_per_tensor", _dequantize_ref, fake=_dequantize_fake)


def _dequantize_channel_ref(q: Tensor, scales: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """``q * scales`` along ``axis`` (per-channel weights), in ``dtype``."""
    shape = [1] * q.dim()
    shape[axis] = -1
    return q.to(dtype) * scales.to(dtype).reshape(shape)


def _dequantize_channel_fake(q, scales, axis, dtype):  # type: ignore[no-untyped-def]
    return torch.empty_like(q, dtype=dtype)


dequantize_per_channel = define(
    "dequantize_per_channel", _dequantize_channel_ref, fake=_dequantize_channel_fake
)


def _int_mm(xq: Tensor, wq: Tensor) -> Tensor:
    """int8 [..., K] x int8 [N, K] -> int32 [..., N], exact."""
    flat = xq.reshape(-1, xq.shape[-1])
    if flat.device.type == "cuda" and (flat.shape[0] <= 16 or flat.shape[1] % 8 or wq.shape[0] % 8):
        # cuBLAS int8 needs M > 16 and K, N multiples of 8; float64 sums of int8 products are
        # exact far beyond any int32 result
        acc = torch.matmul(flat.double(), wq.double().t()).to(torch.int32)
    else:
        acc = torch._int_mm(flat, wq.t())
    return acc.reshape(*xq.shape[:-1], wq.shape[0])


def _int8_linear_ref(
    xq: Tensor,
    x_scale: float,
    wq: Tensor,
    w_scale: Tensor,
    b: Tensor | None,
    r: Tensor | None,
    act: str,
    dtype: torch.dtype,
) -> Tensor:
    """W8A8 static: ``act((xq @ wq.T) * x_scale * w_scale + b) + r`` with an int32 accumulator."""
    acc = _int_mm(xq, wq)
    # scale in fp32 at least: an int32 accumulator overflows fp16 long before it overflows
    ftype = torch.promote_types(dtype, torch.float32)
    y = acc.to(ftype) * (w_scale.to(ftype) * x_scale)
    return epilogue(y, b, r, act).to(dtype)


def _int8_linear_kernel(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    from graphopt.kernels import int8_gemm

    xs = torch.full((1,), x_scale, dtype=torch.float32, device=xq.device)
    y = int8_gemm.int8_linear(xq, wq, xs, w_scale.float(), b, act, out_dtype=dtype)
    return y if r is None else y + r


def _int8_linear_why_not(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    return None if act in INT8_EPILOGUES else f"activation {act!r} has no epilogue"


def _int8_linear_fake(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=dtype)


int8_linear = define(
    "int8_linear",
    _int8_linear_ref,
    fake=_int8_linear_fake,
    kernel=_int8_linear_kernel,
    why_not=_int8_linear_why_not,
)


def _int8_requant_ref(
    xq: Tensor,
    x_scale: float,
    wq: Tensor,
    w_scale: Tensor,
    b: Tensor | None,
    r: Tensor | None,
    act: str,
    out_scale: float,
) -> Tensor:
    """``int8_linear`` whose epilogue requantizes: int8 out, for a chain that stays int8."""
    y = _int8_linear_ref(xq, x_scale, wq, w_scale, b, r, act, torch.float32)
    return _quantize_ref(y, out_scale)


def _int8_requant_kernel(xq, x_scale, wq, w_scale, b, r, act, out_scale):  # type: ignore[no-untyped-def]
    from graphopt.kernels import int8_gemm

    xs = torch.full((1,), x_scale, dtype=torch.float32, device=xq.device)
    return int8_gemm.int8_linear(xq, wq, xs, w_scale.float(), b, act, out_scale=out_scale)


def _int8_requant_why_not(xq, x_scale, wq, w_scale, b, r, act, out_scale):  # type: ignore[no-untyped-def]
    if r is not None:
        return "the requantizing kernel has no residual input"
    return _int8_linear_why_not(xq, x_scale, wq, w_scale, b, r, act, torch.float32)


def _int8_requant_fake(xq, x_scale, wq, w_scale, b, r, act, out_scale):  # type: ignore[no-untyped-def]
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=torch.int8)


int8_linear_requant = define(
    "int8_linear_requant",
    _int8_requant_ref,
    fake=_int8_requant_fake,
    kernel=_int8_requant_kernel,
    why_not=_int8_requant_why_not,
)


def _norm_quant_program(eps: float, kind: str, scale: float, affine: tuple[bool, bool]) -> Program:
    """The decomposed norm followed by the quantize, for the code generator:
    layer: (x - mean) * rsqrt(var + eps) * w + b;  rms: x * rsqrt(mean(x^2) + eps) * w;
    then round(y / scale) clamped to [-127, 127], as int8. Inputs: x, then w and b if given."""
    from graphopt.ir.program import Call, Ref

    calls: list[Call] = []

    def call(op: str, *args: Any, **kwargs: Any) -> Ref:
        calls.append(Call(op, args, tuple(kwargs.items())))
        return Ref("node", len(calls) - 1)

    x = Ref("in", 0)
    if kind == "layer":
        mean = call("aten.mean.dim", x, (-1,), True)
        d = call("aten.sub.Tensor", x, mean)
        var = call("aten.mean.dim", call("aten.mul.Tensor", d, d), (-1,), True)
    else:
        d = x
        var = call("aten.mean.dim", call("aten.mul.Tensor", x, x), (-1,), True)
    y = call("aten.mul.Tensor", d, call("aten.rsqrt.default", call("aten.add.Tensor", var, eps)))
    k = 1
    if affine[0]:
        y, k = call("aten.mul.Tensor", y, Ref("in", k)), k + 1
    if affine[1]:
        y = call("aten.add.Tensor", y, Ref("in", k))
    q = call(
        "aten.clamp.default",
        call("aten.round.default", call("aten.div.Tensor", y, scale)),
        -127,
        127,
    )
    out = call("aten._to_copy.default", q, dtype=torch.int8)
    return Program(1 + affine[0] + affine[1], tuple(calls), (out,))


def _norm_quant_ref(
    x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str, scale: float
) -> Tensor:
    """A norm over the last dim whose output is quantized in the same pass: int8 out."""
    return _quantize_ref(norm_reference(x, w, b, eps, kind), scale)


def _norm_quant_args(x, w, b, eps, kind, scale):  # type: ignore[no-untyped-def]
    affine = (w is not None, b is not None and kind == "layer")
    inputs = [x] + ([w] if affine[0] else []) + ([b] if affine[1] else [])
    return _norm_quant_program(eps, kind, scale, affine), inputs


def _norm_quant_kernel(x, w, b, eps, kind, scale):  # type: ignore[no-untyped-def]
    from graphopt.kernels import codegen

    program, inputs = _norm_quant_args(x, w, b, eps, kind, scale)
    return codegen.run(program, inputs)[0]


def _norm_quant_why_not(x, w, b, eps, kind, scale):  # type: ignore[no-untyped-def]
    from graphopt.kernels import codegen

    return codegen.why_not(*_norm_quant_args(x, w, b, eps, kind, scale))


def _norm_quant_fake(x, w, b, eps, kind, scale):  # type: ignore[no-untyped-def]
    return torch.empty_like(x, dtype=torch.int8)


norm_quant = define(
    "norm_quant",
    _norm_quant_ref,
    fake=_norm_quant_fake,
    kernel=_norm_quant_kernel,
    why_not=_norm_quant_why_not,
)


def _int8_conv1x1_ref(
    xq: Tensor,
    x_scale: float,
    wq: Tensor,
    w_scale: Tensor,
    b: Tensor | None,
    r: Tensor | None,
    act: str,
    dtype: torch.dtype,
) -> Tensor:
    """A 1x1 convolution (stride 1, no padding, one group) in W8A8 static: ``int8_linear`` over
    the channel dim of NCHW ``xq``; ``act(conv + b) + r``."""
    # a 1x1 convolution is a GEMM over channels: NCHW -> NHWC rows, then back
    rows = xq.permute(0, 2, 3, 1)
    res = r.permute(0, 2, 3, 1) if r is not None else None
    w2 = wq.reshape(wq.shape[0], wq.shape[1])
    y = _int8_linear_ref(rows, x_scale, w2, w_scale, b, res, act, dtype)
    return y.permute(0, 3, 1, 2).contiguous()


def _int8_conv1x1_kernel(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    rows = xq.permute(0, 2, 3, 1).contiguous()
    res = r.permute(0, 2, 3, 1) if r is not None else None
    w2 = wq.reshape(wq.shape[0], wq.shape[1])
    y = _int8_linear_kernel(rows, x_scale, w2, w_scale, b, res, act, dtype)
    return y.permute(0, 3, 1, 2).contiguous()


def _int8_conv1x1_fake(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    return xq.new_empty((xq.shape[0], wq.shape[0], *xq.shape[2:]), dtype=dtype)


int8_conv1x1 = define(
    "int8_conv1x1",
    _int8_conv1x1_ref,
    fake=_int8_conv1x1_fake,
    kernel=_int8_conv1x1_kernel,
    why_not=_int8_linear_why_not,
)


def _quantize_per_token(x: Tensor) -> tuple[Tensor, Tensor]:
    x = _at_least_fp32(x)
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX
    return torch.round(x / scale).clamp_(-QMAX, QMAX).to(torch.int8), scale


def _int8_dynamic_ref(
    x: Tensor, wq: Tensor, w_scale: Tensor, b: Tensor | None, r: Tensor | None, act: str
) -> Tensor:
    """W8A8 dynamic: activations quantized per token at run time, then as ``int8_linear``."""
    xq, x_scale = _quantize_per_token(x)
    acc = _int_mm(xq, wq)
    y = acc.to(x_scale.dtype) * x_scale * w_scale.to(x_scale.dtype)
    return epilogue(y, b, r, act).to(x.dtype)


def _int8_dynamic_kernel(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    from graphopt.kernels import int8_gemm

    flat = x.reshape(-1, x.shape[-1])
    xq, xs = int8_gemm.quantize_per_token(flat)
    y = int8_gemm.int8_linear(xq, wq, xs, w_scale.float(), b, act, out_dtype=x.dtype)
    y = y.reshape(*x.shape[:-1], wq.shape[0])
    return y if r is None else y + r


def _int8_dynamic_why_not(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    return _int8_linear_why_not(x, 1.0, wq, w_scale, b, r, act, x.dtype)


def _float_linear_fake(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], wq.shape[0]))


int8_linear_dynamic = define(
    "int8_linear_dynamic",
    _int8_dynamic_ref,
    fake=_float_linear_fake,
    kernel=_int8_dynamic_kernel,
    why_not=_int8_dynamic_why_not,
)


def _w8a16_ref(
    x: Tensor, wq: Tensor, w_scale: Tensor, b: Tensor | None, r: Tensor | None, act: str
) -> Tensor:
    """W8A16 weight-only: ``act(x @ (wq * w_scale).T + b) + r`` in x's dtype."""
    w = wq.to(x.dtype) * w_scale.to(x.dtype)[:, None]
    return epilogue(F.linear(x, w), b, r, act)


def _w8a16_kernel(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    from graphopt.kernels import int8_gemm

    y = int8_gemm.w8a16_linear(x, wq, w_scale.float(), b, act)
    return y if r is None else y + r


def _w8a16_why_not(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    if x.dtype not in (torch.float16, torch.bfloat16):
        return "weight-only int8 kernels take fp16/bf16 activations"
    return _int8_linear_why_not(x, 1.0, wq, w_scale, b, r, act, x.dtype)


w8a16_linear = define(
    "w8a16_linear",
    _w8a16_ref,
    fake=_float_linear_fake,
    kernel=_w8a16_kernel,
    why_not=_w8a16_why_not,
)
