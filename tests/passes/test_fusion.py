"""fuse-epilogue, fuse-kernels and fuse-pointwise: golden IR, rewrite counts, near misses,
numerics through the interpreter, and -O2 on every zoo model with the equivalence check on.

On a machine without a GPU the fused ops run their ATen reference (and generated kernels run
under the Triton interpreter where a test calls them), so ``measure=false`` is used to apply
every fusion the rules find; measuring is tested on its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt import zoo
from graphopt.testing import assert_golden, assert_rounding, run_pipeline

GOLDEN = Path(__file__).parent / "golden"


class ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x))
        return F.relu6(self.b(y) + x)


class LinearBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)
        self.shared = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.gelu(self.up(x), approximate="tanh")
        y = self.down(h) + x
        s = self.shared(y)  # used twice: its activation must not be fused
        return torch.sigmoid(s), s * 0.5


def test_epilogue_conv_golden() -> None:
    run = run_pipeline(ConvBlock(), (torch.randn(2, 4, 5, 7),), "fuse-epilogue{measure=false}")
    assert_golden(GOLDEN / "fuse_epilogue_conv.txt", run.after)
    rules = run.report.records[0].rules
    assert (rules["conv+act"].applied, rules["conv+residual"].applied) == (2, 1)
    assert_rounding(run)


def test_epilogue_linear_golden_and_near_miss() -> None:
    run = run_pipeline(LinearBlock(), (torch.randn(3, 8),), "fuse-epilogue{measure=false}")
    assert_golden(GOLDEN / "fuse_epilogue_linear.txt", run.after)
    rules = run.report.records[0].rules
    assert rules["linear+act"].applied == 1 and rules["linear+residual"].applied == 1
    assert rules["linear+act"].missed == 1
    node, why = rules["linear+act"].misses[0]
    assert node == "sigmoid" and "also used by" in why
    assert "linear+act: applied 1, near misses 1" in run.report.to_text()
    assert_rounding(run)


class NormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(12), nn.LayerNorm(12)

    def forward(
        self, x: torch.Tensor, r: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        s = x + r
        y = self.ln1(s)
        p = torch.softmax(y * 0.25 + m, dim=-1)
        h = y.unsqueeze(1)
        q = F.scaled_dot_product_attention(h, h, h, is_causal=True)
        return self.ln2(p), s, q


def test_kernels_golden() -> None:
    inputs = (torch.randn(2, 5, 12), torch.randn(2, 5, 12), torch.randn(2, 5, 12))
    run = run_pipeline(NormBlock(), inputs, "fuse-kernels{measure=false}")
    assert_golden(GOLDEN / "fuse_kernels.txt", run.after)
    rules = run.report.records[0].rules
    applied = {name: log.applied for name, log in rules.items()}
    assert applied == {"add+norm": 1, "norm": 1, "softmax": 1, "attention": 1}
    assert_rounding(run)


def test_measured_fusion_is_kept_only_when_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion that measures slower than ATen is not applied; the report says why."""
    from graphopt.ops import autotune

    def slow_fused(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        return "aten", {"aten": 1e-3, "fused": 2e-3}

    monkeypatch.setattr(autotune, "choose", slow_fused)
    run = run_pipeline(ConvBlock(), (torch.randn(2, 4, 5, 7),), "fuse-epilogue")
    assert run.rewrites == 0
    log = run.report.records[0].rules["conv+act"]
    assert log.applied == 0 and "not faster" in log.misses[0][1] and "2.000 ms" in log.misses[0][1]

    def fast_fused(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        return "fused", {"aten": 2e-3, "fused": 1e-3}

    monkeypatch.setattr(autotune, "choose", fast_fused)
    assert run_pipeline(ConvBlock(), (torch.randn(2, 4, 5, 7),), "fuse-epilogue").rewrites == 3


def test_choice_is_measured_once_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphopt.ops import autotune

    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    calls = {"a": 0, "b": 0}

    def count(name: str):  # type: ignore[no-untyped-def]
        def fn() -> None:
            calls[name] += 1

        return fn

    first = autotune.choose("k-test", {"a": count("a"), "b": count("b")}, "cpu", reps=3)
    n = dict(calls)
    second = autotune.choose("k-test", {"a": count("a"), "b": count("b")}, "cpu", reps=3)
    assert first == second and calls == n and n["a"] == 5
    assert "k-test" in (tmp_path / "choices.json").read_text()


PIPELINE_ALL = (
    "-O1,patterns,cleanup,fuse-epilogue{measure=false},fuse-kernels{measure=false},"
    "fuse-pointwise{measure=false},cleanup"
)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_o2_fusions_apply_to_every_zoo_model(name: str) -> None:
    model, inputs = zoo.get(name)[:2]
    compiled = graphopt.compile(model, inputs, pipeline=PIPELINE_ALL, on_fail="raise")
    fused = [r for r in compiled.report.records if r.name.startswith("fuse-")]
    assert sum(r.rewrites for r in fused) > 0
    assert all(r.status != "rolled back" for r in compiled.report.records)
    targets = {n.target for n in compiled.gm.graph.nodes if n.op == "call_function"}
    assert any(str(t).startswith("graphopt.") for t in targets)
    expected = model(*inputs)
    got = compiled(*inputs)
    for e, g in zip(
        torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    ):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_fused_graph_saves_and_loads(tmp_path: Path) -> None:
    model, inputs = zoo.get("bert")[:2]
    compiled = graphopt.compile(model, inputs, pipeline=PIPELINE_ALL, on_fail="raise")
    graphopt.save(compiled, tmp_path / "m.graphopt")
    loaded = graphopt.load(tmp_path / "m.graphopt")
    a, b = compiled(*inputs), loaded(*inputs)
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y)


def test_compiled_model_calls_graphopt_ops_without_the_dispatcher() -> None:
    """The saved graph keeps torch.ops.graphopt.*; execution calls the same implementations as
    plain functions (the dispatcher costs 25-50 us a call on the CPU) with the same outputs."""
    from graphopt.ops.fused import DIRECT

    model, inputs = zoo.get("bert")[:2]
    compiled = graphopt.compile(model, inputs, pipeline=PIPELINE_ALL, on_fail="raise")
    saved = {n.target for n in compiled.gm.graph.nodes if n.op == "call_function"}
    run = {n.target for n in compiled._exec.graph.nodes if n.op == "call_function"}
    assert saved & set(DIRECT) and not run & set(DIRECT)
    a, b = compiled.gm(*inputs), compiled(*inputs)
    assert type(a) is type(b) and a.keys() == b.keys()
    for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
        torch.testing.assert_close(x, y)
