"""dce: delete pure nodes whose value nobody uses."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import GraphModule

from graphopt.ir.graph import is_pure
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.verification.contracts import Contract


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Delete unused pure calls and unused weights (and the module attributes behind them).

    before:  %a = relu(%x); %b = neg(%x); return %a
    after:   %a = relu(%x); return %a

    Not a rule table: a node is dead by what uses it, not by a pattern around it, and erasing
    it can kill its producers, so the walk goes backwards over the whole graph in one sweep.
    """

    name = "dce"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        for node in reversed(list(gm.graph.nodes)):
            if node.users or not (node.op == "get_attr" or is_pure(node)):
                continue
            if not rw.allowed():
                break
            rw.erase(node)
        return PassResult(rw.rewrites > 0, {"erased": rw.rewrites})
