"""fold-constants: evaluate subgraphs that depend only on weights, once, at compile time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import attr_path, escapes_to_output, is_pure, touches_written
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.verification.contracts import Contract
from graphopt.verification.interpreter import Runner


def _is_creation(node: Node) -> bool:
    """Calls with no tensor input (full, arange, zeros...): cheaper to recompute than to store."""
    return not node.all_input_nodes


@register_pass
@dataclass(frozen=True)
class FoldConstants(Pass):
    """Replace each weight-only subgraph by one precomputed weight (bitwise the same value).

    before:  %wt = permute(%w, [1, 0]); %s = mul(%wt, 0.5); %y = mm(%x, %s)
    after:   %y = mm(%x, %_graphopt_folded_1)      (the dead %wt, %s are left to dce)

    Only the frontier of a constant subgraph (a constant with a non-constant user) is stored,
    and only if it is at most ``max_bytes``; creation ops with no tensor input are not stored.
    A value that some node writes in place (``%c = arange(4); add_(%c, %x)``) is not a constant:
    storing it would let that write land in the stored weight on every call.

    Not a rule table: which values are constant is a forward analysis of the whole graph
    (evaluated once, node by node), and what is stored depends on the users of each value.
    """

    name = "fold-constants"
    contract = Contract.exact()
    max_bytes: int = 64 << 20

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        runner = Runner(gm)
        values: dict[str, Any] = {}
        for node in list(gm.graph.nodes):
            if touches_written(node):  # a value some node writes in place is not a constant
                continue
            if node.op == "get_attr":
                values[node.name] = attr_path(gm, str(node.target))
            elif (
                is_pure(node)
                and all(inp.name in values for inp in node.all_input_nodes)
                and not _uses_symbols(node)
            ):
                values[node.name] = runner.run_one(node, values)
        for node in list(gm.graph.nodes):
            value = values.get(node.name)
            if node.op != "call_function" or node._erased or not isinstance(value, torch.Tensor):
                continue
            if _is_creation(node) or all(u.name in values for u in node.users):
                continue
            if escapes_to_output(node):  # an output must stay a fresh tensor, not a stored one
                continue
            if value.numel() * value.element_size() > self.max_bytes:
                continue
            if not rw.allowed():
                break
            const = rw.constant(value, hint=f"folded_{node.name}", sources=[node])
            rw.replace(node, const)
        return PassResult(rw.rewrites > 0, {"folded": rw.rewrites})


def _uses_symbols(node: Node) -> bool:
    """Anything touching a symbolic size depends on the inputs, even with no tensor input."""
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return any(not isinstance(d, int) for d in val.shape)
    return not isinstance(val, (int, float, bool, type(None)))
