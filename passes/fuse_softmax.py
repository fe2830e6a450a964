"""fuse-softmax: recognize softmax written out as exp / sum(exp) and call ``aten.softmax``."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from graphopt.ir.graph import tensor_val
from graphopt.ir.rules import Call, Match, Rule
from graphopt.passes.lib.patterns import DIVS, SUBS, arg, escaped, is_call, operands, same_type
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten


def _one_dim(dims: Any, rank: int) -> int | None:
    """The single reduced dim of ``dims`` (an int or a one-element list), made non-negative."""
    if isinstance(dims, (list, tuple)) and len(dims) == 1:
        dims = dims[0]
    if not isinstance(dims, int) or not -rank <= dims < rank:
        return None
    return dims % rank


def _row_max(node: Any, x: Node, dim: int, rank: int) -> bool:
    """Is ``node`` ``amax(x, dim, keepdim=True)`` or ``max(x, dim, keepdim=True)[0]``?"""
    if is_call(node, (aten.amax.default,)) and node.args[0] is x:
        return _one_dim(arg(node, 1, "dim", []), rank) == dim and arg(node, 2, "keepdim") is True
    if is_call(node, (operator.getitem,)) and node.args[1] == 0:
        mx = node.args[0]
        return (
            is_call(mx, (aten.max.dim,))
            and mx.args[0] is x
            and _one_dim(mx.args[1], rank) == dim
            and arg(mx, 2, "keepdim") is True
        )
    return False


def _softmax(node: Node) -> Match | str | None:
    ab = operands(node, DIVS)
    if ab is None:
        return None
    e, s = ab
    if not (is_call(e, (aten.exp.default,)) and is_call(s, (aten.sum.dim_IntList,))):
        return None
    if s.args[0] is not e:
        return None
    val = tensor_val(e)
    rank = 0 if val is None else val.dim()
    dim = _one_dim(arg(s, 1, "dim"), rank) if rank else None
    if dim is None or arg(s, 2, "keepdim") is not True or arg(s, 3, "dtype") is not None:
        return f"%{s.name} is not a keepdim sum over one dim"
    x, nodes = e.args[0], [s, e]
    # exp(x - max(x)): the max is only for stability, the fused op does its own
    centered = operands(x, SUBS)
    if centered is not None and _row_max(centered[1], centered[0], dim, rank):
        nodes += [x, centered[1]]
        x = centered[0]
    if (leak := escaped(node, nodes)) is not None:
        return f"intermediate %{leak.name} has other users"
    if not same_type(x, node):
        return f"%{x.name} and the result differ in shape or dtype"
    dim_arg = -1 if dim == rank - 1 else dim
    return Match([*nodes, node], Call(aten.softmax.int, (x, dim_arg)))


RULES = [
    # exp(x - amax(x, d)) / sum(exp(...), d) -> softmax(x, d)
    Rule("softmax", (aten.div.Tensor,), _softmax),
]


@register_pass
@dataclass(frozen=True)
class FuseSoftmax(RulePass):
    """Replace softmax written out in elementary ops by one ``aten.softmax.int`` call (the
    op a captured ``F.softmax`` is, so fuse-attention finds it too).

    Both the stabilized form (``x - amax(x)`` or ``x - max(x)[0]`` before the exp) and the
    plain ``exp(x) / sum(exp(x))`` are recognized; the fused op is the more accurate of the two.

    before:  %m = amax(%x, [-1], True); %d = sub(%x, %m); %e = exp(%d)
             %s = sum(%e, [-1], True); %y = div(%e, %s)
    after:   %y = softmax(%x, -1)
    """

    name = "fuse-softmax"
    contract = Contract.rounding()
    runs_before = ("fuse-pointwise",)
    rules = RULES
    stat = "fused"
