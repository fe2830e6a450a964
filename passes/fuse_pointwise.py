"""fuse-pointwise: merge chains of pointwise ops (and row reductions) into generated kernels.

Fusion analysis (``graphopt.passes.lib.fusion.partition``) groups producer-consumer chains of ops that the
code generator supports (``graphopt.kernels.codegen.SUPPORTED_OPS``): pointwise ops with
broadcasting, and pointwise prologues and epilogues around last-dim reductions (softmax,
layernorm, rmsnorm, mean/sum). A merge is legal when the generator accepts the merged program
for these shapes and dtypes and the merge creates no cycle; every intermediate that escapes the
group becomes one of its outputs. Each group of two or more ops becomes one
``graphopt.fused(inputs, program)`` call whose ``program`` is the group's ATen decomposition.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.program import op_name
from graphopt.ops.autotune import shape_key
from graphopt.ops.fused import DIRECT
from graphopt.passes.lib.fusion import (
    example_like,
    measured_faster,
    no_gain_on,
    partition,
    program_of_nodes,
)
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
        fused = 0
        for members in groups:
            if not rw.allowed():
                break
            if (why := why_not(members)) is not None:  # a group always passes; keep it honest
                rw.missed(RULE, members[-1], why)
                continue
            program, inputs, outs = program_of_nodes(members)
            text = program.to_json()
            device = members[-1].meta["val"].device
            fused_op = torch.ops.graphopt.fused.default
            if self.measure and (why := no_gain_on(fused_op, device)) is not None:
                rw.missed(RULE, members[-1], why)
                continue
            if self.measure:
                ins = [example_like(n.meta["val"], seed=i) for i, n in enumerate(inputs)]
                why = measured_faster(
                    f"fused {program.key} {shape_key(*ins)}",
                    lambda ins=ins, program=program: program.run(ins),
                    lambda ins=ins, text=text: DIRECT[torch.ops.graphopt.fused.default](ins, text),
                    device,
                )
                if why is not None:
                    rw.missed(RULE, members[-1], why)
                    continue
            anchor = members[-1]
            call = rw.call(
                torch.ops.graphopt.fused.default,
                (list(inputs), text),
                before=anchor,
                sources=members,
            )
            items = [
                rw.call(operator.getitem, (call, i), before=anchor, sources=[old])
                for i, old in enumerate(outs)
            ]
            for old, item in reversed(list(zip(outs, items))):
                rw.replace(old, item)
            rw.applied(RULE)
            fused += 1
        return PassResult(fused > 0, {"groups": fused, "ops fused": sum(map(len, groups))})
