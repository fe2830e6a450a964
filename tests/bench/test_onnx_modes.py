"""The harness's ONNX modes on a tiny model: ORT on the original torch.onnx file, graphopt on the
graph imported from it, ORT on graphopt's export, ORT on graphopt's int8 (QDQ) export."""

from __future__ import annotations

import pytest

from graphopt import zoo
from graphopt.tools.bench.measure import bench_model
from graphopt.tools.bench.mode import ModeUnavailable, Setup
from graphopt.tools.bench.modes import MODES, ONNX_MODES
from graphopt.tools.bench.tables import markdown_table
from graphopt.tools.bench.timing import Settings

FAST = Settings(warmup=1, min_reps=3, min_time_s=0.0, rotate=2, rounds=1)


def test_onnx_modes_run_and_agree_with_eager() -> None:
    modes = ["eager", *ONNX_MODES]
    results = {r.mode: r for r in bench_model("mlp", modes, 3, FAST)}
    for mode in modes:
        r = results[mode]
        assert r.status == "ok", (mode, r.reason)
        assert r.latency_ms is not None and r.latency_ms > 0 and r.reps >= 3
    for mode in ("onnxruntime", "onnx-graphopt-O2", "onnxruntime-graphopt-O2"):
        # float paths: the same function as eager fp32, to float32 rounding
        assert results[mode].cosine == pytest.approx(1.0, abs=1e-6), mode
        assert results[mode].max_abs < 1e-4, mode
    # int8: within the int8 pass's default budget
    assert results["onnxruntime-graphopt-O2-int8"].cosine >= 0.99
    table = markdown_table(list(results.values()))
    assert all(f"| {mode} |" in table for mode in ONNX_MODES)


def test_onnx_modes_are_cpu_only() -> None:
    setup = Setup(*zoo.get("mlp", batch=2), device="cuda")
    for mode in ONNX_MODES:
        with pytest.raises(ModeUnavailable, match="CPU only"):
            MODES[mode](setup)
