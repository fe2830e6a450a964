"""lower-int8: turn the QDQ form of a quantized linear into int8 compute.

    before:  %xd = graphopt.dequantize_per_tensor(%q, s, f32)
             %wd = graphopt.dequantize_per_channel(%w_int8, %w_scales, 0, f32)
             %y = linear(%xd, %wd, %b)            (or graphopt.linear(.., %r, act, 1.0))
    after:   %y = graphopt.int8_linear(%q, s, %w_int8, %w_scales, %b, %r, act, f32)

Where a chain stays int8 (the next layer quantizes this layer's output and nothing else reads
it), the quantize folds into the epilogue: ``int8_linear_requant`` writes int8 directly. A
quantize right after a norm (whose float output nothing else reads) joins the norm:
``norm_quant`` normalizes and quantizes in one pass (a generated kernel on CUDA).

``int8_linear`` multiplies int8 by int8 into an int32 accumulator (``torch._int_mm`` on the CPU,
a Triton kernel or cuBLAS on CUDA) and applies both scales, the bias, the activation and the
residual in its epilogue. The dequantize nodes left without users are erased by the rewriter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt
RULE = "qdq-linear"


def _qdq_linear(node: Node, rw: Rewriter) -> bool:
    """linear(dequant(q, s), dequant_channel(wq, ws, 0)) -> int8_linear(q, s, wq, ws, ...)"""
    if node.target == aten.linear.default:
        xd, wd = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        r, act, alpha = None, "none", 1.0
    else:
        xd, wd, b, r, act, alpha = node.args
    if not (isinstance(xd, Node) and xd.target == go.dequantize_per_tensor.default):
        return False
    if not (isinstance(wd, Node) and wd.target == go.dequantize_per_channel.default):
        return rw.missed(RULE, node, "the weight is not a per-channel dequantize")
    q, s, dtype = xd.args
    wq, ws, axis, _ = wd.args
    if axis != 0 or alpha != 1.0:
        return rw.missed(RULE, node, "weights quantized along another axis, or a GEMM scale")
    args = (q, s, wq, ws, b, r, act, dtype)
    new = rw.call(go.int8_linear.default, args, before=node, sources=[xd, wd, node])
    rw.replace(node, new)
    return rw.applied(RULE)


def _requant(node: Node, rw: Rewriter) -> bool:
    """quantize(int8_linear(..), s) -> int8_linear_requant(.., s): the chain stays int8"""
    producer, out_scale = node.args
    if not (isinstance(producer, Node) and producer.target == go.int8_linear.default):
        return False
    if len(producer.users) != 1:
        return rw.missed(REQUANT, node, f"the float output of %{producer.name} is also used")
    *args, dtype = producer.args
    new = rw.call(
        go.int8_linear_requant.default, (*args, out_scale), before=node, sources=[producer, node]
    )
    rw.replace(node, new)
    return rw.applied(REQUANT)


def _qdq_conv1x1(node: Node, rw: Rewriter) -> bool:
    """conv(dequant(q, s), dequant_channel(wq, ws, 0)) 1x1 -> int8_conv1x1(q, s, wq, ws, ...)"""
    if node.target != go.conv.default:
        return False
    xd, wd, b, r, stride, padding, dilation, groups, act = node.args
    if not (isinstance(xd, Node) and xd.target == go.dequantize_per_tensor.default):
        return False
    if not (isinstance(wd, Node) and wd.target == go.dequantize_per_channel.default):
        return rw.missed(RULE, node, "the weight is not a per-channel dequantize")
    w_val = wd.meta["val"]
    if tuple(w_val.shape[2:]) != (1, 1) or list(stride) != [1, 1] or any(padding) or groups != 1:
        return rw.missed(RULE, node, "not a 1x1 convolution with stride 1 and no padding")
    q, s, dtype = xd.args
    wq, ws, _, _ = wd.args
    args = (q, s, wq, ws, b, r, act, dtype)
    new = rw.call(go.int8_conv1x1.default, args, before=node, sources=[xd, wd, node])
    rw.replace(node, new)
    return rw.applied(RULE)


REQUANT = "requant"
NORM_QUANT = "norm+quantize"


def _norm_quant(node: Node, rw: Rewriter) -> bool:
    """quantize(layer_norm(x, [n], w, b, eps), s) -> norm_quant(x, w, b, eps, 'layer', s)"""
    norm, scale = node.args
    if not isinstance(norm, Node):
        return False
    parts = _norm_parts(norm)
    if parts is None:
        return False
    if len(norm.users) != 1:
        return rw.missed(NORM_QUANT, node, f"the float output of %{norm.name} is also used")
    x, w, b, eps, kind = parts
    new = rw.call(
        go.norm_quant.default, (x, w, b, eps, kind, scale), before=node, sources=[norm, node]
    )
    rw.replace(node, new)
    return rw.applied(NORM_QUANT)


def _norm_parts(node: Node) -> tuple | None:  # type: ignore[type-arg]
    """(x, w, b, eps, kind) of a last-dim layer_norm / rms_norm / graphopt.norm, else None."""
    if node.target == go.norm.default:
        return tuple(node.args)
    if node.target not in (aten.layer_norm.default, aten.rms_norm.default):
        return None
    args = list(node.args) + [None] * 6
    x, shape = args[0], args[1]
    val = x.meta.get("val") if isinstance(x, Node) else None
    if val is None or len(shape) != 1 or str(shape[0]) != str(val.shape[-1]):
        return None
    if node.target == aten.rms_norm.default:
        eps = args[3] if args[3] is not None else node.kwargs.get("eps")
        return None if eps is None else (x, args[2], None, float(eps), "rms")
    eps = args[4] if args[4] is not None else node.kwargs.get("eps", 1e-5)
    return (x, args[2], args[3], float(eps), "layer")


RULES = [
    ((aten.linear.default, go.linear.default), _qdq_linear),  # linear(dq(q), dq(wq)) -> int8_linear
    ((go.conv.default,), _qdq_conv1x1),  # conv1x1(dq(q), dq(wq)) -> int8_conv1x1
    ((go.quantize_per_tensor.default,), _requant),  # quantize(int8_linear(..)) -> .._requant
    ((go.quantize_per_tensor.default,), _norm_quant),  # quantize(layer_norm(x)) -> norm_quant(x)
]


def lower(gm: GraphModule, rw: Rewriter) -> None:
    apply_rules(gm, RULES, rw)


@register_pass
@dataclass(frozen=True)
class LowerInt8(Pass):
    """Lower quantize/dequantize around linear layers to int8 GEMMs (module docstring)."""

    name = "lower-int8"
    contract = Contract.rounding()
    runs_after = ("int8",)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        lower(gm, rw)
        return PassResult(rw.rewrites > 0, {"lowered": rw.rewrites})
