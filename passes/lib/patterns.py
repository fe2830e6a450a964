"""The matching helpers the rule tables of the passes share (the rule passes themselves are
``graphopt.RulePass`` tables of :mod:`graphopt.ir.rules` rules).

The pattern passes walk up from the last op of a decomposed pattern to its producers. The
helpers here read an operand as a constant, compare shapes structurally (``str(dim)``, so a
symbolic batch dimension adds no guard), and check that no node inside a pattern is used
outside it: replacing such a pattern would lose that value, so it is a near miss instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import attr_path, is_pure, tensor_val
from graphopt.ir.rules import graph_order

aten = torch.ops.aten

MULS = (aten.mul.Tensor, aten.mul.Scalar)
DIVS = (aten.div.Tensor, aten.div.Scalar)
ADDS = (aten.add.Tensor, aten.add.Scalar)
SUBS = (aten.sub.Tensor, aten.sub.Scalar)
POWS = (aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor)


def module_of(node: Node) -> GraphModule:
    """The module whose graph holds ``node``: where its weights live."""
    gm = node.graph.owning_module
    assert gm is not None, f"%{node.name} is in a graph without a module"
    return gm


def is_call(node: Any, targets: Sequence[Any]) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def arg(node: Node, index: int, name: str, default: Any = None) -> Any:
    """An argument given either positionally or by keyword."""
    if index < len(node.args):
        return node.args[index]
    return node.kwargs.get(name, default)


def operands(node: Any, targets: Sequence[Any]) -> tuple[Any, Any] | None:
    """The two operands of a binary ``targets`` call (add/sub only with alpha 1), else None."""
    if not is_call(node, targets) or arg(node, 2, "alpha", 1) != 1:
        return None
    return node.args[0], node.args[1]


def scalar(gm: GraphModule, value: Any) -> float | None:
    """A Python number, or a one-element weight (an ONNX-style constant), as a float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Node) and value.op == "get_attr":
        t = attr_path(gm, str(value.target))
        if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.dtype.is_complex:
            return float(t.item())
    return None


def close(value: float | None, want: float, rel: float = 1e-6) -> bool:
    """Constants match to about fp32 precision: 0.70710678 is 1/sqrt(2), 0.7071 is not."""
    return value is not None and math.isclose(value, want, rel_tol=rel)


def shape(node: Any) -> list[str] | None:
    val = tensor_val(node)
    return None if val is None else [str(d) for d in val.shape]


def same_type(a: Any, b: Any) -> bool:
    """Same shape (structurally), dtype and device."""
    va, vb = tensor_val(a), tensor_val(b)
    if va is None or vb is None:
        return False
    return shape(a) == shape(b) and va.dtype == vb.dtype and va.device == vb.device


def broadcasts_to(small: list[str], big: list[str]) -> bool:
    """Can a tensor of shape ``small`` be broadcast to ``big`` without growing it?"""
    if len(small) > len(big):
        return False
    return all(s in ("1", b) for s, b in zip(reversed(small), reversed(big)))


def last_dim_only(dims: Any, rank: int) -> bool:
    """``dims`` (an int or a list of ints) names only the last of ``rank`` dims."""
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return False
    return dims[0] in (-1, rank - 1)


def escaped(anchor: Node, nodes: Sequence[Node]) -> Node | None:
    """The first node of a pattern (other than its anchor) used by a node outside it."""
    inside = set(nodes) | {anchor}
    for node in nodes:
        if node is not anchor and any(user not in inside and _live(user) for user in node.users):
            return node
    return None


def _live(node: Node) -> bool:
    """Dead code (a pure call nobody uses, left for dce) does not hold a value back."""
    return bool(node.users) or not is_pure(node)


def constant_value(gm: GraphModule, node: Any, max_nodes: int = 64) -> Any:
    """The value of ``node`` when it depends on no graph input (a mask built from ``ones`` and
    ``tril``, or sliced from a registered buffer), computed now from at most ``max_nodes``
    small static-shaped pure nodes; None otherwise."""
    if not isinstance(node, Node):
        return node
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if len(seen) > max_nodes:
            return None
        if n.op == "get_attr":
            continue
        val = tensor_val(n)
        if not is_pure(n) or val is None or val.numel() > 1 << 24:
            return None
        if not all(isinstance(d, int) for d in val.shape):
            return None
        stack += n.all_input_nodes
    values: dict[Node, Any] = {}

    def value(a: Any) -> Any:
        return values[a] if isinstance(a, Node) else a

    for n in graph_order(list(seen)):
        if n.op == "get_attr":
            values[n] = attr_path(gm, str(n.target))
        else:
            args = torch.fx.node.map_aggregate(n.args, value)
            values[n] = n.target(*args, **torch.fx.node.map_aggregate(n.kwargs, value))
    return values[node]
