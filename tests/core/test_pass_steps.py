"""The pass manager's ``on_step`` hook: what the debugger, the bisector and the report see."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.fx import GraphModule

import graphopt
from graphopt import Contract, Pass, PassResult
from graphopt.pipeline.manager import PassManager, PassStep
from graphopt.pipeline.passes import PassContext

aten = torch.ops.aten


@dataclass(frozen=True)
class ReluToNeg(Pass):
    """relu(x) -> neg(x): wrong on purpose, so the manager rolls it back."""

    name = "test-relu-to-neg"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        for node in list(gm.graph.nodes):
            if node.target == aten.relu.default and rw.allowed():
                new = rw.call(aten.neg.default, (node.args[0],), before=node, sources=[node])
                rw.replace(node, new)
        return PassResult(rw.rewrites > 0, {})


def _steps(pipeline: list[object], **options: object) -> tuple[list[tuple[str, PassStep]], object]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.ReLU()).eval()
    x = torch.randn(3, 4)
    gm = graphopt.capture(model, (x,))
    events: list[tuple[str, PassStep]] = []
    manager = PassManager(
        pipeline, on_step=lambda kind, step: events.append((kind, step)), **options
    )  # type: ignore[arg-type]
    out, _ = manager.run(gm, [x])
    return events, out


def test_steps_number_passes_and_hand_over_kept_and_rolled_back_graphs() -> None:
    with pytest.warns(graphopt.EquivalenceWarning):
        events, out = _steps(["remove-noops", ReluToNeg(), "dce"])
    ends = [step for kind, step in events if kind == "end"]
    assert [kind for kind, _ in events] == ["start", "end"] * 3
    assert [(s.index, s.pass_.name, s.round) for s in ends] == [
        (1, "remove-noops", 1),
        (2, "test-relu-to-neg", 1),
        (3, "dce", 1),
    ]
    noops, wrong, _ = ends
    assert noops.kept and noops.after is noops.candidate and noops.rewrites_before == 0
    assert wrong.rolled_back and not wrong.kept and wrong.after is wrong.before
    assert wrong.before is noops.after  # the graph the pipeline went on with
    targets = [n.target for n in wrong.candidate.graph.nodes]  # the rejected rewrite is kept
    assert aten.neg.default in targets and aten.relu.default not in targets
    assert wrong.rewrites_before == noops.rewrites_before + noops.record.rewrites
    assert aten.neg.default not in [n.target for n in out.graph.nodes]  # type: ignore[attr-defined]


def test_failing_step_is_complete_when_the_manager_raises() -> None:
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(3, 4)
    seen: list[PassStep] = []
    manager = PassManager([ReluToNeg()], on_fail="raise", on_step=lambda _, s: seen.append(s))
    with pytest.raises(graphopt.EquivalenceError):
        manager.run(graphopt.capture(model, (x,)), [x])
    step = seen[-1]  # only "start" was sent: the observer holds the object the manager filled
    assert len(seen) == 1 and step.result is not None and step.result.changed
    assert not step.kept and step.candidate is not None and manager.verifier is not None


def test_skipped_passes_count_in_the_index_but_send_no_steps() -> None:
    events, _ = _steps(["remove-noops", "dce", "cse"], max_rewrites=0)
    assert events == []
