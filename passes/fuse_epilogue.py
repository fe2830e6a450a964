"""fuse-epilogue: fold bias, activation, scale and residual add into the GEMM or convolution.

The epilogue then runs on the GEMM's output tile (Triton GEMM on CUDA) or in place on the fresh
output buffer (ATen), instead of one more pass over memory per op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.rules import Call, Judge, Match, Rule
from graphopt.kernels.activations import ATEN_ACTIVATIONS, activation_of
from graphopt.passes.lib.fusion import why_match_not_faster
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt

LINEAR = go.linear.default
CONV = go.conv.default
CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default)
ACTS = ATEN_ACTIVATIONS  # the ATen calls that are some epilogue activation
ADD = (aten.add.Tensor,)
SCALES = (aten.mul.Tensor, aten.div.Tensor)


def _activation(node: Node) -> str | None:
    """The epilogue name of an activation call, or None when it has no epilogue form."""
    return activation_of(node.target, node.args, node.kwargs)


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _single_use(producer: Node, user: Node) -> str | None:
    if len(producer.users) != 1:
        return f"%{producer.name} is also used by {len(producer.users) - 1} other node(s)"
    return None


def _linear_parts(node: Node) -> tuple[Any, ...] | None:
    """(x, w, b, r, act, alpha) of an aten.linear or graphopt.linear call."""
    if node.target == aten.linear.default:
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        return (node.args[0], node.args[1], b, None, "none", 1.0)
    if node.target == LINEAR:
        return tuple(node.args)
    return None


def _conv_parts(node: Node) -> tuple[Any, ...] | None:
    """(x, w, b, r, stride, padding, dilation, groups, act) of a convolution call."""
    if node.target == CONV:
        return tuple(node.args)
    if node.target not in CONVS:
        return None
    args = list(node.args)
    w = _val(args[1])
    if w is None:
        return None
    n = w.dim() - 2
    if node.target == aten.convolution.default:
        x, wt, b, stride, padding, dilation, transposed, _, groups = args
        if transposed:
            return None
    else:
        defaults = [None, None, None, [1], [0], [1], 1]
        args += defaults[len(args) :]
        x, wt, b, stride, padding, dilation, groups = args[:7]
        if isinstance(padding, str):
            return None

    def full(v: Any) -> list[int]:
        v = list(v) if isinstance(v, (list, tuple)) else [v]
        return v * n if len(v) == 1 else v

    return (x, wt, b, None, full(stride), full(padding), full(dilation), groups, "none")


def _act_into_linear(node: Node) -> Match | str | None:
    """act(linear(x, w, b)) -> graphopt.linear(x, w, b, act=act)"""
    producer = node.args[0]
    parts = _linear_parts(producer) if isinstance(producer, Node) else None
    if parts is None:
        return None
    act = _activation(node)
    x, w, b, r, prev_act, alpha = parts
    if act is None:
        return f"{node.target} with these arguments has no epilogue form"
    if r is not None or prev_act != "none":
        return "the linear already ends in a residual add or activation"
    if (why := _single_use(producer, node)) is not None:
        return why
    return Match([producer, node], Call(LINEAR, (x, w, b, None, act, alpha)))


def _act_into_conv(node: Node) -> Match | str | None:
    """act(conv(x, w, b) [+ r]) -> graphopt.conv(x, w, b, r, act=act)"""
    producer = node.args[0]
    parts = _conv_parts(producer) if isinstance(producer, Node) else None
    if parts is None:
        return None
    act = _activation(node)
    if act is None:
        return f"{node.target} with these arguments has no epilogue form"
    if parts[-1] != "none":
        return "the convolution already ends in an activation"
    if (why := _single_use(producer, node)) is not None:
        return why
    return Match([producer, node], Call(CONV, (*parts[:-1], act)))


def _residual(node: Node, parts_of: Any) -> tuple[Node, tuple[Any, ...], Node] | str | None:
    """(producer, parts, other operand) of ``producer + other``, or a near-miss reason."""
    if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    why: str | None = None
    for producer, other in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not isinstance(producer, Node) or parts_of(producer) is None:
            continue
        p, o, out = _val(producer), _val(other), _val(node)
        if not isinstance(other, Node) or other is producer:
            why = "the residual is not a tensor computed elsewhere"
        elif p is None or o is None or out is None:
            why = "missing tensor metadata"
        elif [str(d) for d in out.shape] != [str(d) for d in p.shape]:
            why = "the residual add broadcasts the GEMM output to a larger shape"
        elif o.dtype != p.dtype:
            why = f"the residual is {o.dtype}, the output {p.dtype}"
        elif (used := _single_use(producer, node)) is not None:
            why = used
        else:
            return producer, parts_of(producer), other
    return why


def _residual_into_linear(node: Node) -> Match | str | None:
    """linear(x, w, b) + r -> graphopt.linear(x, w, b, r)"""
    found = _residual(node, _linear_parts)
    if not isinstance(found, tuple):
        return found
    producer, (x, w, b, r, act, alpha), other = found
    if r is not None:
        return "the linear already has a residual"
    return Match([producer, node], Call(LINEAR, (x, w, b, other, act, alpha)))


def _residual_into_conv(node: Node) -> Match | str | None:
    """conv(x, w, b) + r -> graphopt.conv(x, w, b, r)"""
    found = _residual(node, _conv_parts)
    if not isinstance(found, tuple):
        return found
    producer, parts, other = found
    if parts[3] is not None or parts[-1] != "none":
        return "the convolution already has a residual or an activation"
    return Match([producer, node], Call(CONV, (*parts[:3], other, *parts[4:])))


def _scale_into_linear(node: Node) -> Match | str | None:
    """linear(x, w) * s -> graphopt.linear(x, w, alpha=s), also linear(x, w) / s"""
    producer, s = node.args[0], node.args[1] if len(node.args) > 1 else None
    parts = _linear_parts(producer) if isinstance(producer, Node) else None
    if parts is None or not isinstance(s, (int, float)) or isinstance(s, bool):
        return None
    x, w, b, r, act, alpha = parts
    if b is not None or r is not None or act != "none":
        return "a scale folds into the GEMM only before bias, activation and residual"
    if (why := _single_use(producer, node)) is not None:
        return why
    scale = float(s) if node.target == aten.mul.Tensor else 1.0 / float(s)
    return Match([producer, node], Call(LINEAR, (x, w, None, None, "none", alpha * scale)))


RULES = [
    Rule("linear+act", ACTS, _act_into_linear),  # act(linear(x, w, b)) -> graphopt.linear(.., act)
    Rule("conv+act", ACTS, _act_into_conv),  # act(conv(x, w, b) + r) -> graphopt.conv(.., r, act)
    Rule("linear+residual", ADD, _residual_into_linear),  # linear(..) + r -> linear(.., r)
    Rule("conv+residual", ADD, _residual_into_conv),  # conv(..) + r -> conv(.., r)
    Rule("linear*scale", SCALES, _scale_into_linear),  # linear(x, w) * s -> linear(x, w, alpha=s)
]


@register_pass
@dataclass(frozen=True)
class FuseEpilogue(RulePass):
    """Fold the ops that follow a GEMM or convolution into one ``graphopt`` call.

    before:  %y = linear(%x, %w, %b); %g = gelu(%y)
    after:   %g = graphopt.linear(%x, %w, %b, None, 'gelu', 1.0)

    before:  %c = conv2d(%x, %w, %b); %s = add(%c, %r); %o = relu(%s)
    after:   %o = graphopt.conv(%x, %w, %b, %r, [1, 1], [1, 1], [1, 1], 1, 'relu')

    ``measure`` (default on): a fusion is applied only where it measures faster than the
    unfused ATen calls on the target (once per shape, cached); otherwise the report lists it as
    a near miss with both times.
    """

    name = "fuse-epilogue"
    contract = Contract.rounding()
    runs_after = ("fold-bn",)
    rules = RULES
    stat = "fused"
    measure: bool = True

    def judge(self) -> Judge | None:
        return why_match_not_faster if self.measure else None
