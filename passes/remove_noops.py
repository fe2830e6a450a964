"""remove-noops: drop calls that return their input unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from graphopt.ir.graph import escapes_to_output, touches_written
from graphopt.ir.rules import Match, Rule
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten


def _val(node: object) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _same_tensor_type(node: Node, src: Node) -> bool:
    a, b = _val(node), _val(src)
    if a is None or b is None:
        return False
    same_shape = [str(d) for d in a.shape] == [str(d) for d in b.shape]
    return same_shape and a.dtype == b.dtype and a.device == b.device


def _copy_is_removable(node: Node) -> bool:
    """A copy may go only if nothing could tell: its memory never reaches an output (which would
    then alias a graph input, a weight or another output), and neither the copy nor its source
    is written in place anywhere, through any view (``y = clone(x); y[:, 0] = 0`` would write
    into ``x``, and a write into ``x`` after the copy would show through ``y``)."""
    return not escapes_to_output(node) and not touches_written(node)


def _forward(node: Node) -> Match | None:
    """``node`` -> its input, when the two have the same shape, dtype and device."""
    src = node.args[0]
    if not isinstance(src, Node) or not _same_tensor_type(node, src):
        return None
    return Match([node], src)


def _dropout_eval(node: Node) -> Match | None:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return _forward(node) if train is False else None


def _clone(node: Node) -> Match | None:
    fmt = node.kwargs.get("memory_format")
    src = _val(node.args[0])
    keeps_layout = fmt in (None, torch.preserve_format) or (
        fmt == torch.contiguous_format and src is not None and src.is_contiguous()
    )
    return _forward(node) if keeps_layout and _copy_is_removable(node) else None


def _to_dtype(node: Node) -> Match | None:
    copy = node.kwargs.get("copy", node.args[3] if len(node.args) > 3 else False)
    fmt = node.kwargs.get("memory_format", node.args[4] if len(node.args) > 4 else None)
    return _forward(node) if not copy and fmt in (None, torch.preserve_format) else None


def _to_copy(node: Node) -> Match | None:
    fmt = node.kwargs.get("memory_format")
    removable = (
        fmt in (None, torch.preserve_format)
        and not node.kwargs.get("pin_memory", False)
        and _copy_is_removable(node)
    )
    return _forward(node) if removable else None


def _same_shape_view(node: Node) -> Match | None:
    a, b = _val(node), _val(node.args[0])
    same_strides = a is not None and b is not None and str(a.stride()) == str(b.stride())
    return _forward(node) if same_strides else None


def _contiguous(node: Node) -> Match | None:
    src = _val(node.args[0])
    fmt = node.kwargs.get("memory_format", torch.contiguous_format)
    return _forward(node) if src is not None and src.is_contiguous(memory_format=fmt) else None


def _lift_fresh_copy(node: Node) -> Match | None:
    return _forward(node) if _copy_is_removable(node) else None


DROPOUTS = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default)
ALIASES = (aten.alias.default, aten.detach.default)
LIFTS = (aten.lift_fresh_copy.default,)
CLONES = (aten.clone.default,)
TOS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device)
TO_COPIES = (aten._to_copy.default,)
VIEWS = (aten.view.default, aten.reshape.default, aten.expand.default)
CONTIGUOUS = (aten.contiguous.default,)

RULES = [
    Rule("dropout", DROPOUTS, _dropout_eval),  # dropout(x, p, train=False) -> x
    Rule("alias", ALIASES, _forward),  # alias(x) -> x
    Rule("lift-fresh-copy", LIFTS, _lift_fresh_copy),  # lift_fresh_copy(c) -> c, if unwritten
    Rule("clone", CLONES, _clone),  # clone(x) -> x, if no one could tell
    Rule("to", TOS, _to_dtype),  # to(x, x.dtype) -> x
    Rule("to-copy", TO_COPIES, _to_copy),  # _to_copy(x) with x's own dtype/device -> x
    Rule("view", VIEWS, _same_shape_view),  # view(x, x.shape) -> x
    Rule("contiguous", CONTIGUOUS, _contiguous),  # contiguous(x) -> x when x is contiguous
]


@register_pass
@dataclass(frozen=True)
class RemoveNoops(RulePass):
    """Remove identity-like calls: eval-mode dropout, alias/detach, clone, no-op to/contiguous,
    and views or reshapes to the shape the tensor already has.

    before:  %d = dropout(%x, 0.1, False); %c = clone(%d); %y = relu(%c)
    after:   %y = relu(%x)
    """

    name = "remove-noops"
    contract = Contract.exact()
    rules = RULES
    stat = "removed"
    logged = False  # cleanup, not fusion: it stays out of the "why (not) fused" table
