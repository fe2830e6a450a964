"""The benchmark harness: argument parsing, a failing mode reported (not dropped), error maths."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.tools import bench
from graphopt.tools.cli import build_parser, main

FAST = bench.Settings(warmup=1, min_reps=3, min_time_s=0.0, rotate=2)


def test_parse_lists_and_defaults() -> None:
    zoo_models = ["resnet", "mobilenet", "bert", "gpt", "mlp"]
    external = ["resnet50", "mobilenet_v3", "bert-base", "gpt2", "vit-base"]
    assert bench.resolve_models(None) == zoo_models + external  # unavailable ones are reported
    assert bench.resolve_models("mlp, gpt") == ["mlp", "gpt"]
    assert bench.resolve_modes("graphopt-O1", "cpu") == ["eager", "graphopt-O1"]  # baseline added
    assert "torch.compile-max-autotune" in bench.resolve_modes(None, "cuda")
    assert "torch.compile-max-autotune" not in bench.resolve_modes(None, "cpu")
    assert bench.parse_ints("1,4,16") == [1, 4, 16]
    args = build_parser().parse_args(["bench", "--models", "mlp", "--batch", "3", "--depths", ""])
    assert (args.models, args.batch, args.depths, args.device) == ("mlp", 3, "", "cpu")


def test_parse_errors_name_the_valid_choices() -> None:
    with pytest.raises(GraphoptError, match="unknown model.*resnet"):
        bench.resolve_models("resnet,vgg")
    with pytest.raises(GraphoptError, match="unknown mode.*graphopt-O1"):
        bench.resolve_modes("tensorrt", "cpu")
    with pytest.raises(GraphoptError, match="positive integers"):
        bench.parse_ints("0,2")
    with pytest.raises(GraphoptError, match="comma-separated integers"):
        bench.parse_ints("a,b")


def test_error_metrics_against_eager() -> None:
    ref = {"a": torch.tensor([3.0, 4.0]), "b": (torch.tensor([1.0, 0.0]), torch.tensor([7]))}
    same = bench.output_errors(ref, ref)
    assert same == {"max_abs": 0.0, "rel_l2": 0.0, "cosine": 1.0}
    got = {"a": torch.tensor([3.0, 4.5]), "b": (torch.tensor([0.0, 1.0]), torch.tensor([7]))}
    errs = bench.output_errors(got, ref)
    assert errs["max_abs"] == pytest.approx(1.0)  # worst over outputs: |0-1| in "b"
    assert errs["rel_l2"] == pytest.approx(math.sqrt(2))  # ||(-1, 1)|| / ||(1, 0)||
    assert errs["cosine"] == pytest.approx(0.0)  # (0,1) is orthogonal to (1,0)
    with pytest.raises(RuntimeError, match="outputs instead of"):
        bench.output_errors([torch.ones(2)], [torch.ones(2), torch.ones(2)])


def test_random_inputs_are_never_zeros_and_keep_id_ranges() -> None:
    ids = torch.tensor([[5, 9, 7], [6, 5, 8]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    sets = bench.input_sets((torch.zeros(2, 3), ids, mask), 3)
    for floats, new_ids, new_mask in sets:
        assert floats.abs().sum() > 0
        assert new_ids.min() >= 5 and new_ids.max() <= 9
        assert torch.equal(new_mask, mask)
    assert not torch.equal(sets[0][0], sets[1][0])


def test_a_failing_mode_is_reported_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(setup: bench.Setup) -> bench.Runner:
        raise ValueError("exporter exploded\nsecond line")

    monkeypatch.setitem(bench.MODES, "broken", broken)
    results = bench.bench_model("mlp", ["eager", "broken", "eager-fp16"], 4, FAST)
    by_mode = {r.mode: r for r in results}
    assert by_mode["eager"].status == "ok" and by_mode["eager"].latency_ms > 0
    assert by_mode["eager"].speedup == pytest.approx(1.0)
    assert by_mode["broken"].status == "failed"
    assert by_mode["broken"].reason == "ValueError: exporter exploded"
    assert by_mode["eager-fp16"].status == "unavailable" and "GPU" in by_mode["eager-fp16"].reason
    table = bench.markdown_table(results)
    assert "failed: ValueError: exporter exploded" in table and "unavailable" in table


def test_wrong_output_shape_fails_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(bench.MODES, "truncating", lambda s: lambda *a: s.model(*a)[:, :2])
    results = bench.bench_model("mlp", ["eager", "truncating"], 4, FAST)
    assert results[1].status == "failed" and "shape" in results[1].reason


def test_unavailable_external_model_is_reported() -> None:
    results = bench.bench_model("resnet50", ["eager"], 1, FAST)
    try:
        import torchvision  # noqa: F401
    except Exception:
        assert results[0].status == "unavailable" and "torchvision" in results[0].reason
    else:
        assert results[0].status == "ok"


def test_growth_exponent() -> None:
    assert bench.growth_exponent([1, 2, 4, 8], [3, 6, 12, 24]) == pytest.approx(1.0)
    assert bench.growth_exponent([1, 2, 4], [1, 4, 16]) == pytest.approx(2.0)
    assert bench.growth_exponent([1], [1]) is None


def test_end_to_end_cpu_run_writes_json_table_and_plots(tmp_path: Path) -> None:
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
