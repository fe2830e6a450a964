"""int8: QDQ and lowered golden graphs, rewrite counts, per-layer sensitivity and fallback,
accuracy on every zoo model (cosine and top-1 agreement), the report's per-layer table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.testing import assert_golden, run_pipeline
from graphopt.verification import metrics

GOLDEN = Path(__file__).parents[1] / "passes" / "golden"


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.a(x))
        return self.head(self.b(h) + x)


def _batches(n: int, *shape: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _cosines(want: object, got: object) -> list[float]:
    return [
        metrics.cosine(g, w)
        for w, g in zip(pytree.tree_leaves(want), pytree.tree_leaves(got))
        if isinstance(w, torch.Tensor) and w.is_floating_point()
    ]


def test_qdq_golden() -> None:
    run = run_pipeline(
        Mlp(),
        (torch.randn(8, 16),),
        "fuse-epilogue{measure=false},int8{measure=false,calib=minmax,lower=false}",
    )
    assert_golden(GOLDEN / "int8_qdq.txt", run.after)
    record = run.report.records[-1]
    assert record.rules["int8"].applied == 3
    assert [row["precision"] for row in record.stats["layers"]] == ["int8"] * 3


def test_lowered_golden_and_counts() -> None:
    run = run_pipeline(
        Mlp(),
        (torch.randn(8, 16),),
        "fuse-epilogue{measure=false},int8{measure=false,calib=minmax}",
    )
    assert_golden(GOLDEN / "int8_lowered.txt", run.after)
    targets = [n.target for n in run.after.graph.nodes if n.op == "call_function"]
    # the chain a -> b stays int8: their quantizes fold into the previous GEMM's epilogue
    assert targets.count(torch.ops.graphopt.int8_linear_requant.default) == 2
    assert targets.count(torch.ops.graphopt.int8_linear.default) == 1
    assert targets.count(torch.ops.graphopt.quantize_per_tensor.default) == 1
    assert not any("dequantize" in str(t) for t in targets)
    rules = run.report.records[-1].rules
    assert rules["qdq-linear"].applied == 3 and rules["requant"].applied == 2
    _within_budget(run)


def _within_budget(run) -> None:  # type: ignore[no-untyped-def]
    before, after = run.outputs()
    assert min(metrics.cosine(a, b) for a, b in zip(after, before)) >= 0.99


def test_lower_int8_alone_matches_qdq_within_rounding() -> None:
    qdq = "int8{measure=false,calib=minmax,lower=false}"
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), f"{qdq},lower-int8")
    assert [r.status for r in run.report.records] == ["ok", "ok"]
    assert run.report.records[1].rewrites == 3


@pytest.mark.parametrize("options", ["act=dynamic", "mode=w8a16", "calib=entropy", "calib=mse"])
def test_modes_and_observers_stay_in_budget(options: str) -> None:
    model, x = Mlp(), torch.randn(8, 16)
    compiled = graphopt.compile(
        model, (x,), pipeline=f"int8{{measure=false,{options}}}", on_fail="raise",
        calibration_data=_batches(4, 8, 16),
    )  # fmt: skip
    assert compiled.report.records[-1].status == "ok"
    assert min(_cosines(model(x), compiled(x))) >= 0.99


def test_over_budget_layer_falls_back_to_float() -> None:
    """A layer fed one huge outlier channel loses its small values to the scale: it stays float."""

    class Outlier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
            with torch.no_grad():
                self.b.weight[:, 0] = 0.0  # b ignores the outlier channel it must still quantize

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            spike = torch.zeros(16)
            spike[0] = 1e4
            return self.b(self.a(x) + spike)  # b's input: one channel at 1e4, the rest ~1

    model, x = Outlier(), torch.randn(8, 16)
    compiled = graphopt.compile(
        model, (x,), pipeline="int8{measure=false,calib=minmax}", on_fail="raise"
    )
    rows = {row["layer"]: row for row in compiled.report.records[-1].stats["layers"]}
    assert rows["linear"]["precision"] == "int8"
    assert rows["linear_1"]["precision"] == "float" and "budget" in rows["linear_1"]["why"]
    assert min(_cosines(model(x), compiled(x))) >= 0.99
    text = compiled.report.to_text()
    assert (
        "int8: per layer" in text and "linear_1" in text and "float" in text and "sqnr_db" in text
    )


def test_head_float_option_keeps_the_last_layer_float() -> None:
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=minmax,head=float}")
    layers = run.report.records[-1].stats["layers"]
    assert [row["precision"] for row in layers] == ["int8", "int8", "float"]
    assert layers[-1]["why"] == "head=float"
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=minmax,first=float}")
    layers = run.report.records[-1].stats["layers"]
    assert [row["precision"] for row in layers] == ["float", "int8", "int8"]


def test_bad_option_is_a_clear_error() -> None:
    with pytest.raises(graphopt.GraphoptError, match="calib=bogus.*minmax"):
        run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=bogus}")


def _labelled_set(model: nn.Module, inputs: tuple, n: int = 8) -> list[tuple]:
    """Synthetic labelled data: random inputs like the example, labelled by the float model."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        batch = tuple(
            torch.randn(x.shape, generator=g) if x.is_floating_point() else x for x in inputs
        )
        out.append(batch)
    return out


def _train_on_synthetic_task(model: nn.Module, dim: int, classes: int, steps: int = 150) -> None:
    """A few Adam steps on a labelled synthetic task (labels: argmax of a fixed projection), so
    the classifier has real margins, as a trained model does; random-init logits are near ties."""
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(dim, classes, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(64, dim, generator=g)
        loss = F.cross_entropy(model(x), (x @ proj).argmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_every_zoo_model_within_budget(name: str) -> None:
    model, inputs = zoo.get(name, batch=8)[:2]
    if name == "mlp":
        _train_on_synthetic_task(model, inputs[0].shape[-1], model(inputs[0]).shape[-1])
    calib = _labelled_set(model, inputs, n=4)
    compiled = graphopt.compile(
        model, inputs, pipeline="-O1,int8{measure=false}", on_fail="raise", calibration_data=calib
    )
    record = compiled.report.records[-1]
    assert record.name == "int8" and record.status in ("ok", "unchanged")
    assert any(row["precision"] == "int8" for row in record.stats["layers"])
    if name == "mobilenet":  # its 1x1 convolutions are GEMMs over channels
        targets = {n.target for n in compiled.gm.graph.nodes}
        assert torch.ops.graphopt.int8_conv1x1.default in targets
    held_out = _labelled_set(model, inputs, n=12)[4:]
    agree = total = 0
    for batch in held_out:
        want, got = model(*batch), compiled(*batch)
        assert min(_cosines(want, got)) >= 0.99
        if name in ("resnet", "mobilenet", "mlp"):  # classifiers: top-1 agreement
            agree += int((want.argmax(-1) == got.argmax(-1)).sum())
            total += want.shape[0]
    if total:
        assert agree / total >= 0.99


def test_smoothquant_moves_outliers_into_the_weights() -> None:
    """Outlier input channels: plain static int8 loses the small channels; smooth=0.5 keeps them."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.ln, self.fc = nn.LayerNorm(32), nn.Linear(32, 32)
            with torch.no_grad():
                self.ln.weight[:2] = 60.0  # two outlier channels, as in large transformers

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.ln(x))

    model, x = Block(), torch.randn(16, 32)
    calib = _batches(4, 16, 32)

    def layer_cosine(pipeline: str) -> float:
        run = graphopt.compile(model, (x,), pipeline=pipeline, calibration_data=calib)
        record = next(r for r in run.report.records if r.name == "int8")
        return record.stats["layers"][0]["cosine"]

    plain = layer_cosine("int8{measure=false,calib=minmax,min_cosine=0.5}")
    smooth = layer_cosine("int8{measure=false,calib=minmax,min_cosine=0.5,smooth=0.5}")
    assert smooth > plain
    run = run_pipeline(model, (x,), "int8{measure=false,calib=minmax,smooth=0.5}")
    assert run.report.records[0].rules["smooth"].applied == 1
    assert min(_cosines(model(x), run.after(x))) >= 0.99


def test_quantize_joins_the_norm_before_it() -> None:
    """Pre-norm block: the layer norm's only reader is the quantize of the next linear."""

    class PreNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.ln, self.fc = nn.LayerNorm(16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.ln(x))

    run = run_pipeline(PreNorm(), (torch.randn(6, 16),), "int8{measure=false,calib=minmax}")
    assert_golden(GOLDEN / "int8_norm_quant.txt", run.after)
    assert run.report.records[0].rules["norm+quantize"].applied == 1
    targets = [n.target for n in run.after.graph.nodes if n.op == "call_function"]
    assert torch.ops.graphopt.norm_quant.default in targets
    assert torch.ops.aten.layer_norm.default not in targets
    _within_budget(run)


def test_layer_not_faster_in_int8_stays_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """measure=true (the default): a layer that is slower in int8 on the target stays float."""
    from graphopt.ops import autotune

    def int8_slower(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        return "aten", {"aten": 1e-4, "fused": 3e-4}

    monkeypatch.setattr(autotune, "choose", int8_slower)
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{calib=minmax}")
    layers = run.report.records[-1].stats["layers"]
    assert [row["precision"] for row in layers] == ["float"] * 3
    assert all("not faster" in row["why"] for row in layers)
    assert run.rewrites == 0
