"""The rule engine (graphopt.ir.rules, Rewriter.apply) and the "keep only what measures faster"
policy (graphopt.ops.autotune): what a table of rules does to a graph, what it records, what
the rewrite budget and a judge stop, and the near-miss text of a measured decision."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Node

from graphopt.frontends.capture import capture
from graphopt.ir.graph import format_graph
from graphopt.ir.rewriter import RewriteBudget, Rewriter, apply_rules
from graphopt.ir.rules import Call, Const, Match, Rule
from graphopt.ops import autotune
from graphopt.passes.lib.fusion import why_graph_not_faster
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.testing import PassRun, assert_exact, assert_rounding, run_pipeline

aten = torch.ops.aten


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = torch.relu(x).clone()  # a clone of a relu: removable
        b = x.clone() * 2.0  # a clone of an input: a near miss below
        c = torch.neg(torch.neg(x)) + 1.0  # neg(neg(x)) -> x
        return a + self.w, b, c


def _graph() -> GraphModule:
    return capture(Model(), (torch.randn(3, 5),))


def _calls(gm: GraphModule, target: Any) -> list[Node]:
    return [n for n in gm.graph.nodes if n.target == target]


def _clone_of_relu(node: Node) -> Match | str | None:
    src = node.args[0]
    if not isinstance(src, Node) or src.op == "placeholder":
        return f"%{node.name} copies an input"
    return Match([node], src)


def _double_neg(node: Node) -> Match | str | None:
    inner = node.args[0]
    if not (isinstance(inner, Node) and inner.target == aten.neg.default):
        return None  # not this pattern: nothing recorded
    return Match([inner, node], inner.args[0])


RULES = [
    Rule("clone", (aten.clone.default,), _clone_of_relu),  # clone(relu(x)) -> relu(x)
    Rule("neg-neg", (aten.neg.default,), _double_neg),  # neg(neg(x)) -> x
]


def test_rules_rewrite_count_and_record_near_misses() -> None:
    gm = _graph()
    rw = Rewriter(gm, "test")
    assert rw.apply(RULES) == 2
    rw.finish()
    assert not _calls(gm, aten.neg.default) and len(_calls(gm, aten.clone.default)) == 1
    assert rw.rewrites == 2  # one replace per match; the orphaned neg goes with it, uncounted
    assert (rw.rules["clone"].applied, rw.rules["clone"].missed) == (1, 1)
    assert rw.rules["clone"].misses == [("clone_1", "%clone_1 copies an input")]
    assert (rw.rules["neg-neg"].applied, rw.rules["neg-neg"].missed) == (1, 0)


def test_the_budget_stops_the_walk_and_log_false_records_nothing() -> None:
    gm = _graph()
    rw = Rewriter(gm, "test", RewriteBudget(limit=1))
    assert rw.apply(RULES, log=False) == 1
    assert rw.rewrites == 1 and rw.budget.used == 1 and not rw.rules


def test_a_judge_turns_a_match_into_a_near_miss() -> None:
    gm = _graph()
    rw = Rewriter(gm, "test")
    seen: list[tuple[str, list[str]]] = []

    def judge(rule: str, match: Match) -> str | None:
        seen.append((rule, [n.name for n in match.nodes]))
        return "too slow" if rule == "neg-neg" else None

    assert rw.apply(RULES, keep=judge) == 1
    assert seen == [("clone", ["clone"]), ("neg-neg", ["neg", "neg_1"])]
    assert rw.rules["neg-neg"].misses == [("neg_1", "too slow")]  # recorded at the anchor
    assert len(_calls(gm, aten.neg.default)) == 2


def test_calls_and_consts_are_built_with_metadata_and_provenance() -> None:
    gm = _graph()
    rw = Rewriter(gm, "test")
    add = next(n for n in gm.graph.nodes if n.target == aten.add.Tensor)
    x, w = add.args
    offset = Const(torch.ones(5), "offset")
    value = Call(
        aten.add.Tensor, (Call(aten.mul.Tensor, (x, 1.0)), Call(aten.add.Tensor, (w, offset)))
    )
    assert rw.apply_match("shift", Match([add], value))
    rw.finish()
    text = format_graph(gm)
    assert "%_graphopt_offset_1 = get_attr[_graphopt_offset_1] : f32[5]" in text
    new = next(n for n in gm.graph.nodes if n.meta.get("graphopt", {}).get("replaces") == "add")
    mul, plus = new.args
    assert mul.target == aten.mul.Tensor and plus.target == aten.add.Tensor
    assert plus.args[1].op == "get_attr" and torch.equal(gm._graphopt_offset_1, torch.ones(5))
    for n in (new, mul, plus, plus.args[1]):
        assert n.meta["graphopt"]["pass"] == "test" and n.meta["graphopt"]["from"] == ["add"]
        assert tuple(n.meta["val"].shape)[-1] == 5
    assert rw.rewrites == 1 and rw.rules["shift"].applied == 1


class TwoReductions(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.amax(x, 1), torch.argmax(x, 1)


def _max_dim(node: Node) -> Match | str | None:
    x = node.args[0]
    amax = next((u for u in x.users if u.target == aten.amax.default), None)
    if amax is None:
        return "no amax beside it"
    return Match([amax, node], Call(aten.max.dim, (x, 1)), replaces=[(amax, 0), (node, 1)])


def test_a_tuple_result_replaces_each_member_through_getitem() -> None:
    gm = capture(TwoReductions(), (torch.randn(3, 5),))
    x = torch.randn(4, 5)
    want = gm(x)
    rw = Rewriter(gm, "test")
    assert rw.apply([Rule("max", (aten.argmax.default,), _max_dim)]) == 1
    rw.finish()
    assert rw.rewrites == 2  # two members replaced: two rewrites, one application
    lines = format_graph(gm).splitlines()
    assert any("aten.max.dim(%x, 1)" in line for line in lines)
    assert sum(line.startswith("%getitem") for line in lines) == 2
    got = gm(x)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_edit_rules_of_hand_written_passes_still_run() -> None:
    gm = _graph()
    rw = Rewriter(gm, "test")

    def drop_clone(node: Node, rw: Rewriter) -> bool:
        rw.replace(node, node.args[0])
        return True

    apply_rules(gm, [((aten.clone.default,), drop_clone)], rw)
    assert not _calls(gm, aten.clone.default) and rw.rewrites == 2 and not rw.rules


# -- a rule pass through the pass manager -----------------------------------------------------


@register_pass
@dataclass(frozen=True)
class DropNegNeg(RulePass):
    """neg(neg(x)) -> x (a test pass)."""

    name = "test-drop-neg-neg"
    contract = "exact"
    rules = RULES[1:]
    stat = "dropped"


def test_a_rule_pass_is_its_table() -> None:
    run = run_pipeline(Model(), (torch.randn(3, 5),), "test-drop-neg-neg")
    record = run.report.records[0]
    assert record.stats == {"dropped": 1} and record.rewrites == 1
    assert record.rules["neg-neg"].applied == 1
    assert "test-drop-neg-neg: neg-neg: applied 1, near misses 0" in run.report.to_text()
    assert_exact(run)


# -- keep only what measures faster ------------------------------------------------------------


def test_cache_key_names_what_options_and_shapes() -> None:
    x, w = torch.randn(8, 16), torch.randn(4, 16).t()
    key = autotune.cache_key("int8", x, w, None, act="static", mode="w8a8")
    assert key == "int8 act=static mode=w8a8 float32[8,16] float32[16,4]:n None"
    assert autotune.cache_key("fused", [x, x]) == "fused [float32[8,16] float32[8,16]]"
    long = autotune.cache_key("fused", "x" * 100)
    assert long.startswith("fused #") and len(long) == len("fused #") + 16
    assert long != autotune.cache_key("fused", "y" * 100)


def _times(aten_s: float, fused_s: float) -> Callable[..., Any]:
    def choose(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        assert list(candidates) == ["aten", "fused"]
        times = {"aten": aten_s, "fused": fused_s}
        return min(times, key=times.__getitem__), times

    return choose


@pytest.mark.parametrize(
    ("fused_s", "kept"), [(0.5e-3, True), (0.969e-3, True), (0.98e-3, False), (2e-3, False)]
)
def test_a_candidate_must_win_by_the_margin(
    monkeypatch: pytest.MonkeyPatch, fused_s: float, kept: bool
) -> None:
    monkeypatch.setattr(autotune, "choose", _times(1e-3, fused_s))
    why = autotune.why_not_faster("k", lambda: None, lambda: None, "cpu")
    assert (why is None) == kept
    if not kept:
        name = autotune.device_name("cpu")
        both = f"fused {fused_s * 1e3:.3f} ms vs ATen 1.000 ms"
        if fused_s < 1e-3:  # faster, not by the margin: the text says what it had to beat
            assert why == f"not faster by the 3% margin on {name}: {both} (needed under 0.970 ms)"
        else:
            assert why == f"not faster on {name}: {both}"


def test_names_and_uncached_measurement(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def measure_all(fns, device, reps=15):  # type: ignore[no-untyped-def]
        calls.append(reps)
        return {"aten": 1e-3, "fused": 2e-3}

    monkeypatch.setattr(autotune, "measure_all", measure_all)
    monkeypatch.setattr(autotune, "choose", None)  # key=None never reads the cache
    why = autotune.why_not_faster(None, int, int, "cpu", names=("dense", "pruned"), reps=3)
    assert why is not None and why.endswith(": pruned 2.000 ms vs dense 1.000 ms")
    assert calls == [3]


def test_whole_graphs_are_timed_as_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    gm = _graph()
    ran: list[str] = []

    def measure_all(fns, device, reps=15):  # type: ignore[no-untyped-def]
        outs = {name: fn() for name, fn in fns.items()}
        ran.extend(outs)
        assert all(len(out) == 3 for out in outs.values())  # each graph ran on the inputs
        return {"aten": 2e-3, "fused": 1e-3}

    monkeypatch.setattr(autotune, "measure_all", measure_all)
    assert why_graph_not_faster(gm, gm, [torch.randn(3, 5)]) is None
    assert ran == ["aten", "fused"]


def test_assert_rounding_and_exact_judge_the_run() -> None:
    """The shared test helpers fail a run whose outputs drifted past the contract."""
    model = Model()
    run = run_pipeline(model, (torch.randn(3, 5),), "test-drop-neg-neg")
    assert_rounding(run)
    drifted = copy.deepcopy(model)
    with torch.no_grad():
        drifted.w.add_(1e-2)  # far beyond the fp32 floor
    bad = PassRun(run.before, capture(drifted, (torch.randn(3, 5),)), run.report, run.inputs)
    with pytest.raises(AssertionError, match="output 0: error"):
        assert_rounding(bad)
    with pytest.raises(AssertionError, match="output 0 differs"):
        assert_exact(bad)
