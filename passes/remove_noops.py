"""remove-noops: drop calls that return their input unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import escapes_to_output, touches_written
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
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


def _forward(node: Node, rw: Rewriter) -> bool:
    src = node.args[0]
    if not isinstance(src, Node) or not _same_tensor_type(node, src):
        return False
    rw.replace(node, src)
    return True


def _dropout_eval(node: Node, rw: Rewriter) -> bool:
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
    return train is False and _forward(node, rw)


def _clone(node: Node, rw: Rewriter) -> bool:
    fmt = node.kwargs.get("memory_format")
    src = _val(node.args[0])
    keeps_layout = fmt in (None, torch.preserve_format) or (
        fmt == torch.contiguous_format and src is not None and src.is_contiguous()
    )
    return keeps_layout and _copy_is_removable(node) and _forward(node, rw)


def _to_dtype(node: Node, rw: Rewriter) -> bool:
    copy = node.kwargs.get("copy", node.args[3] if len(node.args) > 3 else False)
    fmt = node.kwargs.get("memory_format", node.args[4] if len(node.args) > 4 else None)
    return not copy and fmt in (None, torch.preserve_format) and _forward(node, rw)


def _to_copy(node: Node, rw: Rewriter) -> bool:
    fmt = node.kwargs.get("memory_format")
    return (
        fmt in (None, torch.preserve_format)
        and not node.kwargs.get("pin_memory", False)
        and _copy_is_removable(node)
        and _forward(node, rw)
    )


def _same_shape_view(node: Node, rw: Rewriter) -> bool:
    a, b = _val(node), _val(node.args[0])
    same_strides = a is not None and b is not None and str(a.stride()) == str(b.stride())
    return same_strides and _forward(node, rw)


def _contiguous(node: Node, rw: Rewriter) -> bool:
    src = _val(node.args[0])
    fmt = node.kwargs.get("memory_format", torch.contiguous_format)
    return src is not None and src.is_contiguous(memory_format=fmt) and _forward(node, rw)


def _lift_fresh_copy(node: Node, rw: Rewriter) -> bool:
    return _copy_is_removable(node) and _forward(node, rw)


RULES = [
    (
        (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default),
        _dropout_eval,
    ),  # dropout(x, p, train=False) -> x
    ((aten.alias.default, aten.detach.default), _forward),  # alias(x) -> x
    ((aten.lift_fresh_copy.default,), _lift_fresh_copy),  # lift_fresh_copy(c) -> c, if unwritten
    ((aten.clone.default,), _clone),  # clone(x) -> x, if no one could tell
    ((aten.to.dtype, aten.to.dtype_layout, aten.to.device), _to_dtype),  # to(x, x.dtype) -> x
    ((aten._to_copy.default,), _to_copy),  # _to_copy(x) with x's own dtype/device -> x
    (
        (aten.view.default, aten.reshape.default, aten.expand.default),
        _same_shape_view,
    ),  # view(x, x.shape) -> x
    ((aten.contiguous.default,), _contiguous),  # contiguous(x) -> x when x is contiguous
]


@register_pass
@dataclass(frozen=True)
class RemoveNoops(Pass):
    """Remove identity-like calls: eval-mode dropout, alias/detach, clone, no-op to/contiguous,
    and views or reshapes to the shape the tensor already has.

    before:  %d = dropout(%x, 0.1, False); %c = clone(%d); %y = relu(%c)
    after:   %y = relu(%x)
    """

    name = "remove-noops"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, RULES, rw)
        return PassResult(rw.rewrites > 0, {"removed": rw.rewrites})
