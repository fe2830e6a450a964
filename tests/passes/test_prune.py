"""prune: golden graphs (unstructured, 2:4), exact per-layer sparsity, global scope, the 2:4 mask
as a property, measured revert, the CPU warning, every zoo model, bad options, channel hand-off.

Sparsity rule (see passes/prune.py): a layer (or, with scope=global, all layers together) of n
weights loses exactly floor(amount * n + 0.5) of them, the smallest |w| first, ties in flat order.
Zoo models are random-init, so pruning 30% of their weights costs real accuracy: those runs use a
loose budget (min_cosine=0.5) and check shapes, weights and the report, not accuracy.
"""

from __future__ import annotations

import sys
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.errors import PipelineError
from graphopt.ir.graph import attr_path
from graphopt.passes.prune import CPU_WARNING, ROW_KEYS, apply_mask, mask_2_4
from graphopt.testing import assert_golden, run_pipeline
from graphopt.verification import metrics

GOLDEN = Path(__file__).parent / "golden"
LOOSE = "min_cosine=0.5"


class Mlp(nn.Module):
    def __init__(self, scale_b: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)
        with torch.no_grad():
            self.b.weight.mul_(scale_b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(F.gelu(self.a(x))) + x)


def _weights(gm: torch.fx.GraphModule) -> list[torch.Tensor]:
    """The weight of every linear/conv call, in graph order."""
    return [
        attr_path(gm, str(n.args[1].target))
        for n in gm.graph.nodes
        if n.op == "call_function" and ("linear" in str(n.target) or "conv" in str(n.target))
    ]


def _rows(run: Any) -> list[dict[str, Any]]:
    return run.report.records[-1].stats["layers"]


def _close_enough(run: Any, budget: float) -> None:
    before, after = run.outputs()
    assert min(metrics.cosine(a, b) for a, b in zip(after, before)) >= budget


def test_unstructured_golden_and_exact_sparsity() -> None:
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), f"prune{{amount=0.5,{LOOSE}}}")
    assert_golden(GOLDEN / "prune_unstructured.txt", run.after)
    record = run.report.records[-1]
    assert record.status == "ok" and run.rewrites == 3 and record.rules["prune"].applied == 3
    rows = _rows(run)
    assert [list(row) for row in rows] == [list(ROW_KEYS)] * 3
    assert [row["sparsity"] for row in rows] == [0.5] * 3
    assert [row["params_after"] for row in rows] == [256, 256, 32]
    # 2 * M * nonzero weights, M = 8 rows
    assert [row["flops_after"] for row in rows] == [2 * 8 * 256, 2 * 8 * 256, 2 * 8 * 32]
    assert record.stats["params_before"] == 1088 and record.stats["params_after"] == 544
    for w in _weights(run.after):
        assert int((w == 0).sum()) == w.numel() // 2
    _close_enough(run, 0.5)


def test_layer_scope_rounds_half_up_per_layer() -> None:
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), f"prune{{amount=0.3,{LOOSE}}}")
    zeros = [int((w == 0).sum()) for w in _weights(run.after)]
    assert zeros == [154, 154, 19]  # floor(0.3 * 512 + 0.5), floor(0.3 * 64 + 0.5)
    assert [row["sparsity"] for row in _rows(run)] == [154 / 512, 154 / 512, 19 / 64]


def test_global_scope_prunes_small_weights_more() -> None:
    """One threshold over all layers: b's weights x100 lose almost nothing, a and head lose more."""
    pipeline = f"prune{{amount=0.3,scope=global,{LOOSE}}}"
    run = run_pipeline(Mlp(scale_b=100.0), (torch.randn(8, 16),), pipeline)
    a, b, head = (row["sparsity"] for row in _rows(run))
    assert b < 0.02 and a > 0.4 and head > 0.4
    zeros = sum(int((w == 0).sum()) for w in _weights(run.after))
    assert zeros == int(0.3 * 1088 + 0.5)


def test_2_4_golden_pattern_and_cpu_warning_once() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = run_pipeline(Mlp(), (torch.randn(8, 16),), f"prune{{kind=2:4,measure=false,{LOOSE}}}")
    assert [str(w.message) for w in caught if "2:4" in str(w.message)] == [CPU_WARNING]
    assert_golden(GOLDEN / "prune_2_4.txt", run.after)
    assert run.rewrites == 3
    for w in _weights(run.after):
        assert int((w.reshape(-1, 4) != 0).sum(-1).max()) <= 2
    assert [row["sparsity"] for row in _rows(run)] == [0.5] * 3
    _close_enough(run, 0.5)


def test_2_4_skips_layers_whose_k_is_not_divisible_by_4() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_pipeline(Odd(), (torch.randn(4, 6),), f"prune{{kind=2:4,measure=false,{LOOSE}}}")
    rows = {row["layer"]: row for row in _rows(run)}
    assert rows["linear"]["status"] == "skipped" and "divisible by 4" in rows["linear"]["why"]
    assert rows["linear_1"]["status"] == "pruned"
    log = run.report.records[-1].rules["prune"]
    assert log.applied == 1 and log.misses[0][0] == "linear"


def _expected_keep(group: list[float]) -> set[int]:
    """The documented rule: the 2 largest |w|; on ties the earlier index."""
    return set(sorted(range(4), key=lambda i: (-abs(group[i]), i))[:2])


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    groups=st.integers(1, 4),
    data=st.data(),
)
def test_2_4_mask_keeps_the_2_largest_of_every_4(rows: int, groups: int, data: Any) -> None:
    values = st.one_of(
        st.integers(-2, 2).map(float),  # many ties and zeros
        st.floats(-1e3, 1e3, allow_nan=False, width=32),
    )
    flat = data.draw(st.lists(values, min_size=rows * groups * 4, max_size=rows * groups * 4))
    w = torch.tensor(flat, dtype=torch.float32).reshape(rows, groups * 4)
    keep = mask_2_4(w)
    pruned = apply_mask(w, keep)
    for r in range(rows):
        for g in range(groups):
            cols = slice(4 * g, 4 * g + 4)
            kept = {i for i in range(4) if keep[r, cols][i]}
            assert kept == _expected_keep(w[r, cols].tolist())
            assert int((pruned[r, cols] != 0).sum()) <= 2
            assert all(pruned[r, 4 * g + i] == w[r, 4 * g + i] for i in kept)


def _fake_choose(pruned_s: float, dense_s: float) -> Any:
    def choose(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        times = {"aten": dense_s, "fused": pruned_s}
        return min(times, key=times.__getitem__), times

    return choose


def test_2_4_layer_not_faster_is_reverted_to_its_dense_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from graphopt.ops import autotune

    model = Mlp()
    monkeypatch.setattr(autotune, "choose", _fake_choose(pruned_s=2e-3, dense_s=1e-3))
    run = run_pipeline(model, (torch.randn(8, 16),), f"prune{{kind=2:4,{LOOSE}}}")
    rows = _rows(run)
    assert [row["status"] for row in rows] == ["reverted"] * 3 and run.rewrites == 0
    assert "not faster" in rows[0]["why"] and "pruned 2.000 ms vs dense 1.000 ms" in rows[0]["why"]
    assert all(
        row["sparsity"] == 0.0 and row["params_after"] == row["params_before"] for row in rows
    )
    originals = [model.a.weight, model.b.weight, model.head.weight]
    assert all(torch.equal(w, o) for w, o in zip(_weights(run.after), originals))
    assert run.report.records[-1].rules["prune"].missed == 3

    monkeypatch.setattr(autotune, "choose", _fake_choose(pruned_s=1e-3, dense_s=2e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = run_pipeline(model, (torch.randn(8, 16),), f"prune{{kind=2:4,{LOOSE}}}")
    assert [row["status"] for row in _rows(run)] == ["pruned"] * 3 and run.rewrites == 3


def test_conv_flops_count_nonzero_macs() -> None:
    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(4, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)

    run = run_pipeline(Conv(), (torch.randn(2, 4, 5, 7),), f"prune{{amount=0.25,{LOOSE}}}")
    (row,) = _rows(run)
    positions = 2 * 5 * 7  # N * H_out * W_out
    assert row["params_before"] == 8 * 4 * 9 and row["params_after"] == 8 * 4 * 9 - 72
    assert row["flops_before"] == 2 * positions * 288 and row["flops_after"] == 2 * positions * 216


def _float_leaves(x: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("kind", ["unstructured", "2:4"])
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_every_zoo_model(name: str, kind: str) -> None:
    model, inputs = zoo.get(name, batch=2)[:2]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    want = model(*inputs)
    pipeline = f"prune{{kind={kind},amount=0.3,measure=false,{LOOSE}}}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 2:4 CPU warning
        compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    record = compiled.report.records[-1]
    assert record.name == "prune" and record.status == "ok"
    assert any(row["status"] == "pruned" for row in record.stats["layers"])
    assert record.stats["params_after"] < record.stats["params_before"]
    got = compiled(*inputs)
    assert [t.shape for t in _float_leaves(got)] == [t.shape for t in _float_leaves(want)]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "options, match",
    [
        ("kind=bogus", "kind=bogus.*unstructured, channel, 2:4"),
        ("scope=all", "scope=all.*layer, global"),
        ("kind=channel,importance=grad", "importance=grad.*l1, bn_gamma, taylor"),
        ("amount=1.5", r"amount=1.5.*\[0, 1\)"),
    ],
)
def test_bad_options_are_clear_errors(options: str, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        run_pipeline(Mlp(), (torch.randn(8, 16),), f"prune{{{options}}}")


def test_channel_kind_without_prune_channels_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "graphopt.passes.lib.prune_channels", None)
    with pytest.raises(PipelineError, match="kind=channel.*not available yet"):
        run_pipeline(Mlp(), (torch.randn(8, 16),), "prune{kind=channel}")


def test_channel_rows_are_put_in_report_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """prune's side of the hand-off: the helper's rows come out with the common keys first and
    without callables (a fake prune_channels that edits nothing)."""
    seen: dict[str, Any] = {}

    def prune_channels(gm, rw, *, amount, importance, inputs):  # type: ignore[no-untyped-def]
        seen.update(amount=amount, importance=importance, inputs=len(inputs))
        return [{"why": "", "layer": "linear", "status": "pruned", "revert": lambda: None}]

    fake = types.ModuleType("graphopt.passes.lib.prune_channels")
    fake.prune_channels = prune_channels  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "graphopt.passes.lib.prune_channels", fake)
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "prune{kind=channel,amount=0.25}")
    (row,) = _rows(run)
    assert list(row) == list(ROW_KEYS) and row["kind"] == "channel"
    assert seen == {"amount": 0.25, "importance": "l1", "inputs": 1}


def test_sparse24_linear_is_dense_linear_off_cuda() -> None:
    """The op's reference (and CPU) form is the dense linear; reasons name what CUDA needs."""
    from graphopt.ops.sparse import why_not_sparse

    x, w, b = torch.randn(3, 5, 16), torch.randn(8, 16), torch.randn(8)
    w = apply_mask(w, mask_2_4(w))
    assert torch.equal(torch.ops.graphopt.sparse24_linear(x, w, b), F.linear(x, w, b))
    assert "CUDA-only" in str(why_not_sparse(w))
