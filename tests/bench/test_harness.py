"""The benchmark harness: argument parsing, a failing mode reported (not dropped), error maths."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.tools.bench.command import (
    Plan,
    parse_ints,
    resolve_models,
    resolve_modes,
    sweep_defaults,
)
from graphopt.tools.bench.inputs import input_sets
from graphopt.tools.bench.measure import SKIPPED, bench_model, default_batch, output_errors
from graphopt.tools.bench.mode import Runner, Setup
from graphopt.tools.bench.modes import DEFAULT_MODES, EXTERNAL_MODES, MODES, QUICK_MODES
from graphopt.tools.bench.progress import Steps, clock, progress
from graphopt.tools.bench.scaling import growth_exponent
from graphopt.tools.bench.tables import markdown_table
from graphopt.tools.bench.timing import Settings
from graphopt.tools.cli import build_parser, main

FAST = Settings(warmup=1, min_reps=3, min_time_s=0.0, rotate=2)


def test_parse_lists_and_defaults() -> None:
    zoo_models = ["resnet", "mobilenet", "bert", "gpt", "mlp"]
    external = ["resnet50", "mobilenet_v3", "bert-base", "gpt2", "vit-base"]
    # the bench's models are the zoo's, by name; unavailable ones are reported, not dropped
    assert resolve_models(None) == zoo_models + external == list(zoo.MODELS)
    assert resolve_models("mlp, gpt") == ["mlp", "gpt"]
    assert resolve_modes("graphopt-O1", "cpu") == ["eager", "graphopt-O1"]  # baseline added
    assert "torch.compile-max-autotune" in resolve_modes(None, "cuda")
    assert "torch.compile-max-autotune" not in resolve_modes(None, "cpu")
    assert parse_ints("1,4,16") == [1, 4, 16]
    args = build_parser().parse_args(["bench", "--models", "mlp", "--batch", "3", "--depths", ""])
    assert (args.models, args.batch, args.depths, args.device) == ("mlp", 3, "", "cpu")


def plan(*argv: str) -> Plan:
    return Plan.from_args(build_parser().parse_args(["bench", *argv]))


def test_the_default_sweep_is_quick_and_full_is_the_docs_sweep() -> None:
    quick = plan()
    assert quick.models == list(zoo.ZOO) and quick.modes_for("bert") == QUICK_MODES
    assert (quick.scaling_batches, quick.depths) == ([], [])
    args = sweep_defaults(build_parser().parse_args(["bench"]))
    assert (args.min_time, args.rounds) == (0.2, 3)
    # (model, mode) pairs and 3 timing rounds per model
    assert quick.steps(Settings(rounds=3)) == 5 * (len(QUICK_MODES) + 3)
    full = plan("--full")
    assert full.models == list(zoo.MODELS) and full.modes_for("bert") == DEFAULT_MODES
    assert (full.scaling_batches, full.depths) == ([1, 4, 16, 64, 256], [2, 4, 8, 16, 32, 48])
    # an option given wins over either sweep's default
    assert plan("--depths", "2", "--models", "mlp").depths == [2]
    assert plan("--full", "--scaling-batches", "").scaling_batches == []


def test_full_size_models_run_fewer_modes_at_the_zoo_batch() -> None:
    default = plan("--full")
    assert default.modes_for("bert") == DEFAULT_MODES and default.batch_for("bert") == 8
    for name in ("bert-base", "gpt2", "vit-base"):
        assert default.modes_for(name) == EXTERNAL_MODES and default.batch_for(name) is None
    assert default_batch("bert-base") == 4  # the zoo's: 4 x 128 tokens, read without building
    # (model, mode) pairs and 5 timing rounds per model, 5 scaling batches x 2 models, 6 depths
    rounds = Settings(rounds=5)
    assert default.steps(rounds) == (
        5 * (len(DEFAULT_MODES) + 5) + 5 * (len(EXTERNAL_MODES) + 5) + 5 * 2 + 6
    )
    assert default.steps(Settings(device="cuda")) == default.steps(Settings(rounds=1))
    # --modes applies to every model, unless --external-modes says otherwise
    same = plan("--modes", "graphopt-O1", "--external-batch", "2")
    assert same.modes_for("gpt2") == same.modes_for("gpt") == ["eager", "graphopt-O1"]
    assert same.batch_for("gpt2") == 2
    other = plan("--modes", "graphopt-O1", "--external-modes", "onnxruntime")
    assert other.modes_for("gpt2") == ["eager", "onnxruntime"]
    assert other.time_limit_s is None and plan("--time-limit", "60").time_limit_s == 60.0


def test_no_mode_starts_after_the_time_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    def sleeper(setup: Setup) -> Runner:
        time.sleep(0.3)  # outlasts the deadline while it builds: it still finishes
        return setup.model

    monkeypatch.setitem(MODES, "sleeper", sleeper)
    deadline = time.perf_counter() + 0.2
    results = bench_model("mlp", ["eager", "sleeper", "graphopt-O1"], 4, FAST, deadline=deadline)
    assert [r.status for r in results] == ["ok", "ok", "skipped"]
    assert results[2].reason == SKIPPED and results[2].latency_ms is None
    assert results[1].latency_ms > 0  # the modes built in time are still timed
    assert f"| graphopt-O1 | - | - | - | - | - | - | - | - | skipped: {SKIPPED} |" in (
        markdown_table(results)
    )
    # past the deadline, a model is not even built
    late = bench_model("gpt2", ["eager"], None, FAST, deadline=time.perf_counter() - 1)
    assert [(r.status, r.batch, r.inputs) for r in late] == [("skipped", 4, "")]


def test_parse_errors_name_the_valid_choices() -> None:
    with pytest.raises(GraphoptError, match="unknown model.*resnet"):
        resolve_models("resnet,vgg")
    with pytest.raises(GraphoptError, match="unknown mode.*graphopt-O1"):
        resolve_modes("tensorrt", "cpu")
    with pytest.raises(GraphoptError, match="positive integers"):
        parse_ints("0,2")
    with pytest.raises(GraphoptError, match="comma-separated integers"):
        parse_ints("a,b")


def test_error_metrics_against_eager() -> None:
    ref = {"a": torch.tensor([3.0, 4.0]), "b": (torch.tensor([1.0, 0.0]), torch.tensor([7]))}
    same = output_errors(ref, ref)
    assert same == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    got = {"a": torch.tensor([3.0, 4.5]), "b": (torch.tensor([0.0, 1.0]), torch.tensor([7]))}
    errs = output_errors(got, ref)
    assert errs["max_abs"] == pytest.approx(1.0)  # worst over outputs: |0-1| in "b"
    assert errs["rel_l2"] == pytest.approx(math.sqrt(2))  # ||(-1, 1)|| / ||(1, 0)||
    assert errs["cosine"] == pytest.approx(0.0)  # (0,1) is orthogonal to (1,0)
    with pytest.raises(RuntimeError, match="outputs instead of"):
        output_errors([torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_random_inputs_are_never_zeros_and_keep_id_ranges() -> None:
    ids = torch.tensor([[5, 9, 7], [6, 5, 8]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    sets = input_sets((torch.zeros(2, 3), ids, mask), 3)
    for floats, new_ids, new_mask in sets:
        assert floats.abs().sum() > 0
        assert new_ids.min() >= 5 and new_ids.max() <= 9
        assert torch.equal(new_mask, mask)
    assert not torch.equal(sets[0][0], sets[1][0])


def test_a_failing_mode_is_reported_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(setup: Setup) -> Runner:
        raise ValueError("exporter exploded\nsecond line")

    monkeypatch.setitem(MODES, "broken", broken)
    results = bench_model("mlp", ["eager", "broken", "eager-fp16"], 4, FAST)
    by_mode = {r.mode: r for r in results}
    assert by_mode["eager"].status == "ok" and by_mode["eager"].latency_ms > 0
    assert by_mode["eager"].speedup == pytest.approx(1.0)
    assert by_mode["broken"].status == "failed"
    assert by_mode["broken"].reason == "ValueError: exporter exploded"
    assert by_mode["eager-fp16"].status == "unavailable" and "GPU" in by_mode["eager-fp16"].reason
    table = markdown_table(results)
    assert "failed: ValueError: exporter exploded" in table and "unavailable" in table


def test_wrong_output_shape_fails_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(MODES, "truncating", lambda s: lambda *a: s.model(*a)[:, :2])
    results = bench_model("mlp", ["eager", "truncating"], 4, FAST)
    assert results[1].status == "failed" and "shape" in results[1].reason


def test_a_model_whose_package_is_missing_is_reported_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "torchvision.models", None)
    results = bench_model("resnet50", ["eager", "graphopt-O1"], 1, FAST)
    assert [(r.mode, r.status) for r in results] == [
        ("eager", "unavailable"),
        ("graphopt-O1", "unavailable"),
    ]
    assert results[0].reason.startswith("torchvision unavailable (ModuleNotFoundError: ")
    table = markdown_table(results)  # one row for a model no mode could run
    assert "| resnet50 | 1 | all modes |" in table and table.count("resnet50") == 1


def test_growth_exponent() -> None:
    assert growth_exponent([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert growth_exponent([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    assert growth_exponent([1], [1]) is None


def test_progress_counts_steps_and_estimates_what_is_left() -> None:
    now = iter([0.0, 10.0, 20.0, 30.0, 100.0])
    lines: list[str] = []
    steps = Steps(4, lambda s, text: lines.append(f"{s.done}/{s.total} {text} {s.estimate()}"),
                  lambda: next(now))  # fmt: skip
    steps("mlp: eager")  # t=10: nothing finished yet
    steps("mlp: graphopt-O1")  # t=20: one of 4 done in 20 s -> about 60 s left
    steps.finished(3)  # a model that was unavailable skipped its steps
    steps("gpt: eager")  # t=30: 3 done -> about 10 s left
    assert lines == [
        "0/4 mlp: eager 0:10 spent",
        "1/4 mlp: graphopt-O1 0:20 spent, about 1:00 left",
        "3/4 gpt: eager 0:30 spent, about 0:10 left",
    ]
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00"


def test_progress_prints_a_line_per_step_where_there_is_no_terminal() -> None:
    from rich.console import Console

    console = Console(record=True, force_terminal=False, width=60)
    with progress(console, 2) as step:
        step("mlp: eager")
        step("mlp: timing, round 1/3")
    text = console.export_text()
    assert "[1/2] mlp: eager  (0:00 spent)" in text
    assert "[2/2] mlp: timing, round 1/3  (0:00 spent, about 0:00 left)" in text


def test_end_to_end_cpu_run_writes_json_table_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    docs = tmp_path / "benchmarks.md"
    code = main([
        "bench", "--models", "mlp", "--modes", "eager,graphopt-O1", "--batch", "4",
        "--out", str(out), "--min-time", "0", "--min-reps", "3",
        "--scaling-batches", "1,2", "--scaling-models", "mlp", "--scaling-modes", "eager,graphopt-O1", "--depths", "1,2", "--docs", str(docs),
    ])  # fmt: skip
    assert code == 0
    data = json.loads((out / "results.json").read_text())
    assert data["env"]["torch"] == torch.__version__ and data["env"]["date"]
    modes = [r["mode"] for r in data["results"]]
    assert modes == ["eager", "graphopt-O1"]
    assert all(r["status"] == "ok" and r["latency_ms"] > 0 for r in data["results"])
    assert data["results"][1]["cosine"] > 0.999999
    assert [r["batch"] for r in data["batch_scaling"]] == [1, 1, 2, 2]
    assert [r["layers"] for r in data["compile_scaling"]] == [1, 2]
    for png in ("speedup.png", "latency_vs_batch.png", "compile_vs_depth.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    page = docs.read_text()
    assert "| mlp | 4 | graphopt-O1 |" in page and "graphopt bench" in page
    # each plot under its own section, after the table it draws
    assert page.index("### Latency against batch size") < page.index("latency_vs_batch.png")
    assert page.index("### Compile time against model depth") < page.index("compile_vs_depth.png")
    assert page.index("speedup.png") < page.index("### Latency against batch size")
    # progress: model, mode and timing round, with the time spent and left, a line per step
    printed = capsys.readouterr().out
    assert "] mlp: graphopt-O1  (" in printed and "mlp: timing, round 1/" in printed
    assert "left)" in printed


def test_every_option_is_checked_before_anything_is_measured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    code = main([
        "bench", "--models", "mlp", "--modes", "eager", "--out", str(out),
        "--scaling-batches", "1", "--scaling-models", "mlp", "--scaling-modes", "tensorrt",
    ])  # fmt: skip
    assert code == 2 and "unknown mode(s) tensorrt" in capsys.readouterr().out
    assert not out.exists()  # failed before the main table was measured, not after
