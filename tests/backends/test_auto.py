"""The backend choice (graphopt/backends/select.py) through ``graphopt.compile`` and the CLI, with
planted backends (the registry holds aten and them only, for each test): ``auto`` verifies every
candidate and keeps the fastest that passes; a backend that returns wrong numbers is rejected,
never returned; a backend that cannot run is reported with its reason; a backend asked for by
name that breaks the budget falls back to aten with a warning, or raises; a user's backend is
registered like a pass and its saved payload is loaded without building again."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

import graphopt
import graphopt.backends.base as backends_base
from graphopt import zoo
from graphopt.backends import BackendError
from graphopt.backends.base import Backend, Engine, Handoff, outputs_of, registered_backends
from graphopt.backends.select import BackendWarning, budget_of
from graphopt.errors import EquivalenceError
from graphopt.tools.cli import main
from graphopt.verification.contracts import Contract

ATEN = registered_backends()["aten"]
SLOW_S = 0.02  # a sleep per call: far above the noise of a busy 2-core machine


class SlowAten(Backend):
    """aten, slowed down by a sleep per call (so that a right planted engine is the fastest)."""

    name = "aten"

    def build(self, handoff: Handoff, target: str) -> Engine:
        engine = ATEN().build(handoff, target)

        def run(*args: Any) -> Any:
            time.sleep(SLOW_S)
            return engine.run(*args)

        return Engine(self.name, run)


class Right(Backend):
    """The graph itself, no sleep; saves a payload and counts builds and loads."""

    name = "planted-right"
    builds = 0
    loads = 0

    def build(self, handoff: Handoff, target: str) -> Engine:
        type(self).builds += 1
        return Engine(self.name, handoff.flat(), payload=lambda: {"engine.txt": b"planted"})

    def load(self, handoff: Handoff, payload: dict[str, bytes], target: str) -> Engine:
        assert payload == {"engine.txt": b"planted"}
        type(self).loads += 1
        return Engine(self.name, handoff.flat())


class Wrong(Backend):
    """The fastest and wrong: every output scaled by 1.01."""

    name = "planted-wrong"

    def build(self, handoff: Handoff, target: str) -> Engine:
        graph = handoff.flat()
        return Engine(self.name, lambda *a: [o * 1.01 for o in outputs_of(graph(*a))])

    def diagnose(self, engine: Engine, handoff: Handoff, judge: Any) -> str | None:
        return "planted: every value scaled"


class Absent(Backend):
    name = "planted-absent"
    requires = ("graphopt_no_such_package",)


class Broken(Backend):
    name = "planted-broken"

    def build(self, handoff: Handoff, target: str) -> Engine:
        raise RuntimeError("planted: the engine's compiler crashed")


@pytest.fixture
def planted(monkeypatch: pytest.MonkeyPatch) -> type[Right]:
    """The registry holds the slowed aten and the planted backends only, for this test."""
    registry = {cls.name: cls for cls in (SlowAten, Right, Wrong, Absent, Broken)}
    monkeypatch.setattr(backends_base, "_REGISTRY", registry)
    Right.builds = Right.loads = 0
    return Right


def mlp() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    model, inputs = zoo.get("mlp", batch=4)
    return model.eval(), inputs


@pytest.mark.usefixtures("planted")
def test_auto_rejects_the_wrong_backend_and_keeps_the_fastest_right_one() -> None:
    model, inputs = mlp()
    compiled = graphopt.compile(model, inputs, pipeline="-O1", backend="auto")
    assert compiled.backend == "planted-right"
    rows = {r.backend: r for r in compiled.report.backends}
    assert {n: r.status for n, r in rows.items()} == {
        "aten": "passed",
        "planted-right": "kept",
        "planted-wrong": "rejected",
        "planted-absent": "unavailable",
        "planted-broken": "failed",
    }
    wrong = rows["planted-wrong"]
    assert wrong.error == pytest.approx(0.01, rel=1e-3)
    assert wrong.time_ms is None  # never timed: a rejected engine is not a candidate
    assert wrong.why.startswith("output 0 ") and wrong.why.endswith("; planted: every value scaled")
    assert "graphopt_no_such_package not installed (pip install" in rows["planted-absent"].why
    assert rows["planted-broken"].why == "RuntimeError: planted: the engine's compiler crashed"
    assert rows["aten"].time_ms > SLOW_S * 1e3 > rows["planted-right"].time_ms
    x = torch.randn(7, *inputs[0].shape[1:])  # another batch size
    torch.testing.assert_close(compiled(x), model(x))
    text = compiled.report.backend_text()
    assert "planted-wrong" in text and "rejected" in text and "kept" in text


def test_the_budget_is_the_lossy_contracts_and_the_widest_rounding_floor() -> None:
    contracts = [
        Contract.rounding("float32"),
        Contract.lossy("cosine", 0.99),
        Contract.rounding("float16"),
        Contract.lossy("cosine", 0.99),
    ]
    assert budget_of(contracts) == [Contract.lossy("cosine", 0.99), Contract.rounding("float16")]
    assert budget_of([]) == [Contract.rounding(None)]


@pytest.mark.usefixtures("planted")
def test_a_named_backend_that_breaks_the_budget_falls_back_or_raises() -> None:
    model, inputs = mlp()
    with pytest.warns(BackendWarning, match="'planted-wrong' broke the pipeline's budget"):
        compiled = graphopt.compile(model, inputs, pipeline="-O1", backend="planted-wrong")
    assert compiled.backend == "aten"
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    with pytest.raises(EquivalenceError, match="planted: every value scaled"):
        graphopt.compile(model, inputs, pipeline="-O1", backend="planted-wrong", on_fail="raise")


@pytest.mark.usefixtures("planted")
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("planted-absent", "is unavailable here: graphopt_no_such_package not installed"),
        ("planted-broken", "is failed here: RuntimeError: planted: the engine's compiler"),
        ("no-such-engine", "unknown backend 'no-such-engine'; use one of auto, aten, planted"),
    ],
)
def test_a_named_backend_that_cannot_run_is_a_clear_error(name: str, message: str) -> None:
    model, inputs = mlp()
    with pytest.raises(BackendError, match=message):
        graphopt.compile(model, inputs, pipeline="-O1", backend=name)


def test_register_backend_refuses_what_is_not_a_backend() -> None:
    class Nameless(Backend):
        name = "Not Kebab"

    with pytest.raises(BackendError, match="kebab-case"):
        graphopt.register_backend(Nameless)
    with pytest.raises(BackendError, match="subclass of graphopt.Backend"):
        graphopt.register_backend(object)  # type: ignore[arg-type]


def test_the_real_backends_are_registered() -> None:
    assert {"aten", "inductor", "onnxruntime"} <= set(registered_backends())


def test_save_and_load_keep_the_backend_without_building(planted: type[Right], tmp_path: Path):
    model, inputs = mlp()
    compiled = graphopt.compile(model, inputs, pipeline="-O1", backend="planted-right")
    assert (planted.builds, compiled.backend) == (1, "planted-right")
    path = tmp_path / "m.graphopt"
    graphopt.save(compiled, path)
    loaded = graphopt.load(path)
    assert (planted.builds, planted.loads, loaded.backend) == (1, 1, "planted-right")
    x = torch.randn(3, *inputs[0].shape[1:])
    torch.testing.assert_close(loaded(x), compiled(x), rtol=0, atol=0)


def test_loading_a_model_whose_backend_is_missing_says_what_to_do(
    planted: type[Right], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, inputs = mlp()
    path = tmp_path / "m.graphopt"
    graphopt.save(graphopt.compile(model, inputs, pipeline="-O1", backend="planted-right"), path)
    monkeypatch.setattr(Right, "requires", ("graphopt_no_such_package",))
    with pytest.raises(graphopt.GraphoptError, match="runs on backend 'planted-right', which is"):
        graphopt.load(path)


@pytest.mark.usefixtures("planted")
def test_cli_compile_takes_backend_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.graphopt"
    code = main(["compile", "mlp", "--pipeline", "-O1", "--backend", "auto", "--save", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "backends" in text and "planted-right" in text and "kept" in text
    assert graphopt.load(out).backend == "planted-right"
