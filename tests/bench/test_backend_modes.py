"""The benchmark's backend modes (``graphopt-O2-<backend>``, ``graphopt-O2-int8-auto``, ...): each
compiles through ``graphopt.compile(..., backend=...)``, a backend that cannot run is reported
unavailable with its reason, a rejected one fails the mode, and ``auto``'s backend table, the
engine kept and the int8 layers reach the results and the printed tables. The backends here are
planted (the registry holds aten and them only), so no real Inductor or ONNX Runtime build runs:
these tests are about the plumbing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import graphopt.backends.base as backends_base
from graphopt import zoo
from graphopt.backends.base import Backend, Engine, Handoff, outputs_of, registered_backends
from graphopt.tools.bench.measure import bench_model
from graphopt.tools.bench.modes import (
    BACKENDS,
    EXTERNAL_MODES,
    MODES,
    graphopt_mode,
    int8_mode,
)
from graphopt.tools.bench.tables import backend_table, markdown_table
from graphopt.tools.bench.timing import Settings
from graphopt.tools.cli import main

FAST = Settings(warmup=1, min_reps=2, min_time_s=0.0, rotate=2, rounds=1)
SLOW_S = 0.05  # well above the noise of a busy 2-core machine


class Slow(Backend):
    """Right, and slower than aten by a sleep per call."""

    name = "planted-slow"

    def build(self, handoff: Handoff, target: str) -> Engine:
        graph = handoff.flat()

        def run(*args: Any) -> Any:
            time.sleep(SLOW_S)
            return graph(*args)

        return Engine(self.name, run)


class Wrong(Backend):
    """Fast and wrong: every output scaled by 1.5."""

    name = "planted-wrong"

    def build(self, handoff: Handoff, target: str) -> Engine:
        graph = handoff.flat()
        return Engine(self.name, lambda *a: [o * 1.5 for o in outputs_of(graph(*a))])


class Absent(Backend):
    name = "planted-absent"

    def unavailable(self, target: str) -> str | None:
        return "planted: its package is not installed"


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend registry holds aten and the planted backends only, for this test."""
    registry = {"aten": registered_backends()["aten"]}
    registry.update({cls.name: cls for cls in (Slow, Wrong, Absent)})
    monkeypatch.setattr(backends_base, "_REGISTRY", registry)


def with_modes(monkeypatch: pytest.MonkeyPatch, **modes: Callable[..., Any]) -> None:
    for name, mode in modes.items():
        monkeypatch.setitem(MODES, name, mode)


def test_every_backend_has_a_float_an_int8_and_a_gpu_fp16_mode() -> None:
    assert BACKENDS == ("auto", "aten", "inductor", "onnxruntime")
    for backend in BACKENDS:
        for kind in ("", "int8-", "fp16-"):
            assert f"graphopt-O2-{kind}{backend}" in MODES
    # the full-size models run what the targets compare
    assert EXTERNAL_MODES == [
        "eager",
        "torch.compile",
        "onnxruntime",
        "graphopt-O2-auto",
        "graphopt-O2-int8-auto",
    ]


@pytest.mark.usefixtures("planted")
def test_auto_mode_reports_every_candidate_and_runs_the_kept_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_modes(monkeypatch, auto=graphopt_mode("-O1", backend="auto"))
    eager, auto = bench_model("mlp", ["eager", "auto"], 4, FAST)
    assert auto.status == "ok" and auto.cosine == pytest.approx(1.0, abs=1e-6)
    rows = {row["backend"]: row for row in auto.backends}
    assert {n: r["status"] for n, r in rows.items()} == {
        "aten": "kept",  # faster than planted-slow, which passed
        "planted-slow": "passed",
        "planted-wrong": "rejected",
        "planted-absent": "unavailable",
    }
    assert auto.backend == "aten" and auto.pipeline == "cleanup,fold-bn,cleanup"
    assert rows["planted-slow"]["time_ms"] > max(SLOW_S * 1e3, rows["aten"]["time_ms"])
    assert rows["planted-wrong"]["error"] == pytest.approx(0.5, rel=1e-3)  # 1.5x every output
    assert "planted: its package is not installed" in rows["planted-absent"]["why"]
    table = backend_table([eager, auto])
    head, _, line = table.splitlines()
    assert head == (
        "| model | mode | kept | int8 layers | aten | planted-slow | planted-wrong "
        "| planted-absent |"
    )
    assert line.startswith("| mlp | auto | aten | - | kept: ")
    assert "| rejected: " in line and "| unavailable: planted: its package" in line
    assert "| auto | aten |" in markdown_table([eager, auto])  # the engine column
    assert eager.backend is None and not eager.backends  # not a graphopt mode


@pytest.mark.usefixtures("planted")
def test_a_named_backend_runs_the_mode_or_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    with_modes(
        monkeypatch,
        slow=graphopt_mode("-O1", backend="planted-slow"),
        wrong=graphopt_mode("-O1", backend="planted-wrong"),
        absent=graphopt_mode("-O1", backend="planted-absent"),
        unknown=graphopt_mode("-O1", backend="inductor"),  # not in this registry
    )
    results = bench_model("mlp", ["eager", "slow", "wrong", "absent", "unknown"], 4, FAST)
    by = {r.mode: r for r in results}
    assert by["slow"].status == "ok" and by["slow"].backend == "planted-slow"
    assert by["slow"].latency_ms > SLOW_S * 1e3  # the bench timed the planted engine itself
    assert by["slow"].cosine == pytest.approx(1.0, abs=1e-6)
    assert by["wrong"].status == "failed"
    assert by["wrong"].reason.startswith("RuntimeError: backend 'planted-wrong' rejected: output")
    assert by["absent"].status == "unavailable"
    assert by["absent"].reason == (
        "backend 'planted-absent' unavailable: planted: its package is not installed"
    )
    assert by["unknown"].status == "unavailable"
    assert by["unknown"].reason.startswith("unknown backend 'inductor'; use one of auto, aten")
    table = markdown_table(results)
    assert "| unavailable: unknown backend 'inductor'" in table


@pytest.mark.usefixtures("planted")
def test_int8_under_another_engine_is_planned_without_aten_timing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_modes(monkeypatch, int8_slow=int8_mode("planted-slow"), int8_aten=int8_mode("aten"))
    results = bench_model("mlp", ["eager", "int8_slow", "int8_aten"], 4, FAST)
    by = {r.mode: r for r in results}
    other, aten = by["int8_slow"], by["int8_aten"]
    assert other.status == aten.status == "ok"
    # one pipeline; the int8 pass times graphopt's own int8 ops on aten only (PassContext.engine)
    assert other.pipeline.endswith(",int8,lower-int8")
    assert aten.pipeline == other.pipeline
    kept, total = map(int, other.int8_layers.split("/"))
    assert total == 3 and kept >= 1 and other.cosine >= 0.99  # within the int8 budget
    assert other.backend == "planted-slow"


def test_fp16_backend_modes_are_gpu_only() -> None:
    (result,) = bench_model("mlp", ["graphopt-O2-fp16-auto"], 2, FAST)
    assert result.status == "unavailable" and "GPU only" in result.reason


@pytest.mark.usefixtures("planted")
def test_the_run_prints_and_writes_the_targets_and_the_backend_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bench"
    code = main([
        "bench", "--models", "mlp", "--modes", "eager,graphopt-O2-auto", "--batch", "2",
        "--out", str(out), "--min-time", "0", "--min-reps", "2", "--rounds", "1",
        "--scaling-batches", "", "--depths", "", "--kernels", "no",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    page = (out / "results.md").read_text()
    for text in (printed, page):
        assert "| model | -O2 auto vs eager | -O2 auto vs best of torch.compile, ORT |" in text
        assert "| mlp | graphopt-O2-auto | aten | - | kept: " in text
    assert "| mlp | 2x128 float32 | " in page  # the models table
    data = json.loads((out / "results.json").read_text())
    auto = data["results"][1]
    assert auto["backend"] == "aten" and auto["compile_s"] > 0
    assert [row["backend"] for row in auto["backends"]] == [
        "aten",
        "planted-slow",
        "planted-wrong",
        "planted-absent",
    ]


def test_full_size_models_default_to_the_zoo_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    def tiny_external(batch: int = 3) -> Any:
        return zoo.mlp(batch=batch)

    monkeypatch.setitem(zoo.MODELS, "tiny-external", tiny_external)
    (result,) = bench_model("tiny-external", ["eager"], None, FAST)
    assert (result.batch, result.inputs, result.status) == (3, "3x128 float32", "ok")
    assert result.params_m == pytest.approx(sum(p.numel() for p in zoo.mlp()[0].parameters()) / 1e6)
