"""int8: QDQ and lowered golden graphs, rewrite counts, per-layer sensitivity and fallback,
accuracy on every zoo model (cosine and top-1 agreement), the report's per-layer table;
lower-int8 scheduled by the pipeline as a pass of its own; calibration data as a stream."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.errors import PipelineError
from graphopt.pipeline.parse import parse_pipeline
from graphopt.pipeline.report import PassRecord, Report
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


def int8_record(report: Report) -> PassRecord:
    """The int8 pass's row of the report (lower-int8 has the next one)."""
    return next(r for r in report.records if r.name == "int8")


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
    # two rows: int8 rewrites to the QDQ form, lower-int8 lowers it, each held to its contract
    int8, lowered = run.report.records[-2:]
    assert (int8.name, int8.contract, int8.rewrites) == ("int8", "lossy(cosine=0.99)", 3)
    assert (lowered.name, lowered.contract) == ("lower-int8", "rounding")
    assert int8.status == lowered.status == "ok" and lowered.error is not None
    assert lowered.rules["qdq-linear"].applied == 3 and lowered.rules["requant"].applied == 2
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
    assert int8_record(compiled.report).status == "ok"
    # the dynamic and weight-only forms have no QDQ to lower
    lowered = compiled.report.records[-1]
    assert lowered.name == "lower-int8"
    assert lowered.status == ("ok" if options.startswith("calib") else "unchanged")
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
    rows = {row["layer"]: row for row in int8_record(compiled.report).stats["layers"]}
    assert rows["linear"]["precision"] == "int8"
    assert rows["linear_1"]["precision"] == "float" and "budget" in rows["linear_1"]["why"]
    assert min(_cosines(model(x), compiled(x))) >= 0.99
    text = compiled.report.to_text()
    assert (
        "int8: per layer" in text and "linear_1" in text and "float" in text and "sqnr_db" in text
    )


def test_head_float_option_keeps_the_last_layer_float() -> None:
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=minmax,head=float}")
    layers = int8_record(run.report).stats["layers"]
    assert [row["precision"] for row in layers] == ["int8", "int8", "float"]
    assert layers[-1]["why"] == "head=float"
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=minmax,first=float}")
    layers = int8_record(run.report).stats["layers"]
    assert [row["precision"] for row in layers] == ["float", "int8", "int8"]


def test_bad_option_is_a_clear_error() -> None:
    with pytest.raises(graphopt.GraphoptError, match="calib=bogus.*minmax"):
        run_pipeline(Mlp(), (torch.randn(8, 16),), "int8{measure=false,calib=bogus}")
    # checked when the pipeline is parsed, naming the option and the values it allows
    with pytest.raises(PipelineError, match=r"int8\{calib=typo\}: 'typo' is not one of "
                       "minmax, percentile, mse, entropy"):  # fmt: skip
        parse_pipeline("-O1,int8{calib=typo}")


def test_the_pipeline_schedules_lower_int8_after_int8() -> None:
    def names(pipeline: str) -> list[str]:
        return [item.spec() for item in parse_pipeline(pipeline)]

    assert names("int8{calib=minmax},dce") == ["int8{calib=minmax}", "lower-int8", "dce"]
    assert names("int8,lower-int8") == ["int8", "lower-int8"]  # spelled out: not twice
    assert names("int8{lower=false}") == ["int8{lower=False}"]
    compiled = graphopt.compile(Mlp(), (torch.randn(8, 16),), pipeline="int8{measure=false}")
    assert compiled.pipeline == "int8{measure=False},lower-int8"
    assert names(compiled.pipeline) == ["int8{measure=False}", "lower-int8"]


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
    record = int8_record(compiled.report)
    assert record.status in ("ok", "unchanged")
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
    assert run.report.records[1].rules["norm+quantize"].applied == 1  # lower-int8's rule
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
    layers = int8_record(run.report).stats["layers"]
    assert [row["precision"] for row in layers] == ["float"] * 3
    assert all("not faster" in row["why"] for row in layers)
    assert run.rewrites == 0


def test_measure_times_int8_only_on_the_aten_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under another engine graphopt's own int8 ops are not what runs: measure=true does not
    time them (the engine is timed whole), so every layer within budget is int8."""
    from graphopt.ops import autotune
    from graphopt.pipeline.manager import PassManager

    def int8_slower(key, candidates, device, reps=15):  # type: ignore[no-untyped-def]
        return "aten", {"aten": 1e-4, "fused": 3e-4}

    monkeypatch.setattr(autotune, "choose", int8_slower)
    gm = graphopt.capture(Mlp(), (torch.randn(8, 16),))
    manager = PassManager("int8{calib=minmax}", on_fail="raise", engine="onnxruntime")
    _, report = manager.run(gm, [torch.randn(8, 16)])
    layers = int8_record(report).stats["layers"]
    assert [row["precision"] for row in layers] == ["int8"] * 3


# -- calibration data: an argument of the pass manager, read once as a stream --------------------


class Counted:
    """An iterable of batches that counts how often it is started and how many batches it gave."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches, self.starts, self.given = batches, 0, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.starts += 1
        for batch in self.batches:
            self.given += 1
            yield batch


@pytest.mark.parametrize("options", ["calib=percentile", "calib=entropy,smooth=0.5"])
def test_compile_reads_calibration_data_once(options: str) -> None:
    model, x = Mlp(), torch.randn(8, 16)
    pipeline = f"int8{{measure=false,{options}}}"
    batches = _batches(5, 8, 16)
    counted = Counted(batches)
    compiled = graphopt.compile(model, (x,), pipeline=pipeline, calibration_data=counted)
    assert (counted.starts, counted.given) == (1, 5)
    # a one-shot generator gives the model a list gives
    one_shot = graphopt.compile(model, (x,), pipeline=pipeline, calibration_data=iter(batches))
    listed = graphopt.compile(model, (x,), pipeline=pipeline, calibration_data=batches)
    assert torch.equal(one_shot(x), listed(x)) and torch.equal(compiled(x), listed(x))
    assert int8_record(one_shot.report).stats == int8_record(listed.report).stats


def _quantize_scales(gm: torch.fx.GraphModule) -> list[float]:
    target = torch.ops.graphopt.quantize_per_tensor.default
    return [n.args[1] for n in gm.graph.nodes if n.target == target]


def test_pass_manager_calibrates_on_its_calibration_argument() -> None:
    """minmax: the first layer's scale is max |x| over the calibration batches / 127."""
    batches = _batches(3, 8, 16)
    batches[2][5, 7] = 40.0
    pipeline = "int8{measure=false,calib=minmax,lower=false,min_cosine=0}"
    run = run_pipeline(Mlp(), (torch.randn(8, 16),), pipeline, calibration=[[b] for b in batches])
    assert _quantize_scales(run.after)[0] == pytest.approx(40.0 / 127)
    run = run_pipeline(Mlp(), (batches[0],), pipeline)  # without: the example inputs
    assert _quantize_scales(run.after)[0] == pytest.approx(float(batches[0].abs().max()) / 127)


def test_sensitivity_is_judged_on_the_first_batch() -> None:
    """The observers do not depend on the order of the batches (exact streaming histograms);
    the per-layer check runs on the first: the rest may come in any order."""
    model, x = Mlp(), torch.randn(8, 16)
    b = _batches(4, 8, 16)
    b[3] = b[3] * 4

    def layers(batches: list[torch.Tensor]) -> list[dict]:  # type: ignore[type-arg]
        compiled = graphopt.compile(
            model, (x,), pipeline="int8{measure=false}", calibration_data=batches
        )
        return int8_record(compiled.report).stats["layers"]

    assert layers([b[0], b[1], b[2], b[3]]) == layers([b[0], b[3], b[2], b[1]])
    assert layers([b[0], b[1], b[2], b[3]]) != layers([b[3], b[1], b[2], b[0]])


@dataclass(frozen=True)
class ReadsCalibration(graphopt.Pass):
    """Reads the calibration data and changes nothing (for the tests of the stream)."""

    name = "reads-calibration"

    def run(self, gm, ctx):  # type: ignore[no-untyped-def]
        for _ in ctx.calibration:
            pass
        return graphopt.PassResult(False)


def test_calibration_data_errors_are_the_users_not_the_pass() -> None:
    """Raised as they are, even with on_fail="rollback": never rolled back as a pass bug."""
    model, x = Mlp(), torch.randn(8, 16)
    pipeline = "int8{measure=false}"

    def compile_with(data: object) -> None:
        graphopt.compile(model, (x,), pipeline=pipeline, calibration_data=data)

    with pytest.raises(graphopt.GraphoptError, match="batch 1 has 2 inputs; the model takes 1"):
        compile_with([x, (x, x)])
    with pytest.raises(graphopt.GraphoptError, match="batch 0: input 0 is a 1-d float32 tensor"):
        compile_with([x[0]])
    with pytest.raises(graphopt.GraphoptError, match="batch 0 is a dict; give each batch as"):
        compile_with([{"x": x}])

    def broken():  # type: ignore[no-untyped-def]
        yield x
        raise ValueError("the data loader broke")

    with pytest.raises(graphopt.GraphoptError, match="batch 1 raised ValueError: the data loader"):
        compile_with(broken())
    manager = graphopt.PassManager(pipeline, calibration=3)  # type: ignore[arg-type]
    with pytest.raises(graphopt.GraphoptError, match="int, not an iterable of batches"):
        manager.run(graphopt.capture(model, (x,)), [x])


def test_the_stream_is_read_once() -> None:
    model, x = Mlp(), torch.randn(8, 16)
    gm = graphopt.capture(model, (x,))
    twice = graphopt.PassManager([ReadsCalibration(), ReadsCalibration()], calibration=[[x]])
    with pytest.raises(graphopt.GraphoptError, match="'reads-calibration' has already read"):
        twice.run(gm, [x])
    once = graphopt.PassManager([ReadsCalibration()], calibration=iter([[x]]))
    once.run(gm, [x])
    with pytest.raises(graphopt.GraphoptError, match="one-shot iterator that an earlier run"):
        once.run(gm, [x])
    listed = graphopt.PassManager([ReadsCalibration()], calibration=[[x]])
    listed.run(gm, [x])
    listed.run(gm, [x])  # a list serves every run
