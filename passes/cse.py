"""cse: merge pure calls that compute the same thing from the same inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import escapes_to_output, is_pure, touches_written
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.verification.contracts import Contract


def _key(value: Any) -> Any:
    """A hashable key for an argument; floats keyed by repr so -0.0, 0.0 and nan stay apart."""
    if isinstance(value, Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, torch.Tensor):
        raise TypeError("tensor literal")
    hash(value)
    return (type(value).__name__, value)


def _would_alias_outputs(dup: Node, first: Node) -> bool:
    """Merging two values that both reach graph outputs would return one memory twice: a new
    alias the user can see."""
    return escapes_to_output(dup) and escapes_to_output(first)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Replace a pure call by an earlier identical one; also merge duplicate get_attr nodes.

    before:  %a = mul(%x, 2); %b = mul(%x, 2); %c = add(%a, %b)
    after:   %a = mul(%x, 2); %c = add(%a, %a)

    Not a rule table: a node's match is any earlier node with the same key, anywhere in the
    graph (a table of everything seen so far), not a pattern around an anchor.
    """

    name = "cse"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        seen: dict[Any, Node] = {}
        for node in list(gm.graph.nodes):
            if node._erased:
                continue
            if node.op == "get_attr":
                key: Any = ("get_attr", node.target)
            elif is_pure(node) and not touches_written(node):  # written: read-time matters
                try:
                    key = (node.target, _key(node.args), _key(node.kwargs))
                except TypeError:
                    continue
            else:
                continue
            first = seen.setdefault(key, node)
            if first is node or _would_alias_outputs(node, first):
                continue
            if not rw.allowed():
                break
            rw.replace(node, first)
        return PassResult(rw.rewrites > 0, {"merged": rw.rewrites})
