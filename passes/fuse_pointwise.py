"""fuse-pointwise: merge chains of pointwise ops (and row reductions) into generated kernels.

Fusion analysis (``graphopt.passes.lib.fusion.partition``) groups producer-consumer chains of
ops that the code generator supports (``graphopt.kernels.codegen.SUPPORTED_OPS``): pointwise ops
with broadcasting, and pointwise prologues and epilogues around last-dim reductions (softmax,
layernorm, rmsnorm, mean/sum). A merge is legal when the generator accepts the merged program
for these shapes and dtypes and the merge creates no cycle; every intermediate that escapes the
group becomes one of its outputs. Each group of two or more ops becomes one
``graphopt.fused(inputs, program)`` call whose ``program`` is the group's ATen decomposition.

Not a rule table: groups come from an analysis of the whole graph, not from a pattern around
one anchor. Each group is then handed to the rewriter as a match (``rw.apply_match``), so it is
measured, rewritten and recorded exactly as a rule's match is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.program import op_name
from graphopt.ir.rules import Call, Match
from graphopt.passes.lib.fusion import partition, program_of_nodes, why_match_not_faster
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.verification.contracts import Contract

RULE = "pointwise"


def _has_symbolic_args(node: Node) -> bool:
    found = False

    def visit(a: Any) -> Any:
        nonlocal found
        found |= isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool)
        return a

    torch.fx.node.map_aggregate((node.args, node.kwargs), visit)
    return found


@register_pass
@dataclass(frozen=True)
class FusePointwise(Pass):
    """Fuse pointwise chains and pointwise-plus-reduction groups into ``graphopt.fused``.

    before:  %a = add(%x, %b); %s = sigmoid(%a); %y = mul(%a, %s)
    after:   %f = graphopt.fused([%x, %b], '{..add, sigmoid, mul..}'); %y = getitem(%f, 0)

    ``max_ops`` bounds a group's size; ``measure`` (default on) keeps a group only where it
    measures faster than the unfused ATen calls on the target (once per shape, cached).
    """

    name = "fuse-pointwise"
    contract = Contract.rounding()
    runs_after = ("fuse-epilogue", "fuse-kernels")
    max_ops: int = 32
    measure: bool = True

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        from graphopt.kernels import codegen

        rw = ctx.rewriter(gm)

        def fusible(node: Node) -> bool:
            if not isinstance(node.meta.get("val"), torch.Tensor):
                return False
            try:
                name = op_name(node.target)
            except AttributeError:
                return False
            return name in codegen.SUPPORTED_OPS and not _has_symbolic_args(node)

        def why_not(members: list[Node]) -> str | None:
            if len(members) > self.max_ops:
                return f"the group would exceed max_ops={self.max_ops}"
            program, inputs, _ = program_of_nodes(members)
            return codegen.why_not(program, [n.meta["val"] for n in inputs])

        def can_merge(group: list[Node], node: Node) -> str | None:
            why = why_not([*group, node])
            if why is not None:
                rw.missed(RULE, node, f"not merged with %{group[-1].name}: {why}")
            return why

        groups = [g for g in partition(gm, fusible, can_merge) if len(g) > 1]
        keep = why_match_not_faster if self.measure else None
        fused = 0
        for members in groups:
            if not rw.allowed():
                break
            if (why := why_not(members)) is not None:  # a group always passes; keep it honest
                rw.missed(RULE, members[-1], why)
                continue
            if rw.apply_match(RULE, _fusion(members), keep=keep):
                fused += 1
        return PassResult(fused > 0, {"groups": fused, "ops fused": sum(map(len, groups))})


def _fusion(members: list[Node]) -> Match:
    """A group as one ``graphopt.fused`` call; each member whose value escapes the group is
    read from the call's results."""
    program, inputs, outs = program_of_nodes(members)
    call = Call(torch.ops.graphopt.fused.default, (list(inputs), program.to_json()))
    return Match(members, call, replaces=[(old, i) for i, old in enumerate(outs)])
