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
from torch.fx import Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.rules import Call, Match, Rule
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt
QDQ = "qdq-linear"
REQUANT = "requant"
NORM_QUANT = "norm+quantize"


def _is(node: object, target: object) -> bool:
    return isinstance(node, Node) and node.target == target


def _qdq_linear(node: Node) -> Match | str | None:
    """linear(dequant(q, s), dequant_channel(wq, ws, 0)) -> int8_linear(q, s, wq, ws, ...)"""
    if node.target == aten.linear.default:
        xd, wd = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        r, act, alpha = None, "none", 1.0
    else:
        xd, wd, b, r, act, alpha = node.args
    if not _is(xd, go.dequantize_per_tensor.default):
        return None
    if not _is(wd, go.dequantize_per_channel.default):
        return "the weight is not a per-channel dequantize"
    q, s, dtype = xd.args
    wq, ws, axis, _ = wd.args
    if axis != 0 or alpha != 1.0:
        return "weights quantized along another axis, or a GEMM scale"
    return Match([xd, wd, node], Call(go.int8_linear.default, (q, s, wq, ws, b, r, act, dtype)))


def _qdq_conv1x1(node: Node) -> Match | str | None:
    """conv(dequant(q, s), dequant_channel(wq, ws, 0)) 1x1 -> int8_conv1x1(q, s, wq, ws, ...)"""
    xd, wd, b, r, stride, padding, dilation, groups, act = node.args
    if not _is(xd, go.dequantize_per_tensor.default):
        return None
    if not _is(wd, go.dequantize_per_channel.default):
        return "the weight is not a per-channel dequantize"
    w_val = wd.meta["val"]
    if tuple(w_val.shape[2:]) != (1, 1) or list(stride) != [1, 1] or any(padding) or groups != 1:
        return "not a 1x1 convolution with stride 1 and no padding"
    q, s, dtype = xd.args
    wq, ws, _, _ = wd.args
    return Match([xd, wd, node], Call(go.int8_conv1x1.default, (q, s, wq, ws, b, r, act, dtype)))


def _requant(node: Node) -> Match | str | None:
    """quantize(int8_linear(..), s) -> int8_linear_requant(.., s): the chain stays int8"""
    producer, out_scale = node.args
    if not _is(producer, go.int8_linear.default):
        return None
    if len(producer.users) != 1:
        return f"the float output of %{producer.name} is also used"
    *args, _dtype = producer.args
    return Match([producer, node], Call(go.int8_linear_requant.default, (*args, out_scale)))


def _norm_quant(node: Node) -> Match | str | None:
    """quantize(layer_norm(x, [n], w, b, eps), s) -> norm_quant(x, w, b, eps, 'layer', s)"""
    norm, scale = node.args
    parts = _norm_parts(norm) if isinstance(norm, Node) else None
    if parts is None:
        return None
    if len(norm.users) != 1:
        return f"the float output of %{norm.name} is also used"
    x, w, b, eps, kind = parts
    return Match([norm, node], Call(go.norm_quant.default, (x, w, b, eps, kind, scale)))


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


LINEARS = (aten.linear.default, go.linear.default)
QUANTIZE = (go.quantize_per_tensor.default,)
RULES = [
    Rule(QDQ, LINEARS, _qdq_linear),  # linear(dq(q), dq(wq)) -> int8_linear(q, wq)
    Rule(QDQ, (go.conv.default,), _qdq_conv1x1),  # conv1x1(dq(q), dq(wq)) -> int8_conv1x1(q, wq)
    Rule(REQUANT, QUANTIZE, _requant),  # quantize(int8_linear(..)) -> int8_linear_requant(..)
    Rule(NORM_QUANT, QUANTIZE, _norm_quant),  # quantize(layer_norm(x)) -> norm_quant(x)
]


@register_pass
@dataclass(frozen=True)
class LowerInt8(RulePass):
    """Lower quantize/dequantize around linear layers to int8 GEMMs (module docstring).

    ``int8`` schedules it right after itself (``Int8.followed_by``). Its contract is
    ``rounding``: it changes how the quantized arithmetic is carried out (an exact int32
    accumulation scaled once, instead of float sums of dequantized values; a requantize or a
    quantize computed in the epilogue of the op before), not what is quantized, so the error it
    may add is the float rounding of that reordering, judged against the int8 error before it.
    """

    name = "lower-int8"
    contract = Contract.rounding()
    runs_after = ("int8",)
    rules = RULES
    stat = "lowered"
