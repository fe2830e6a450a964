"""The onnxruntime backend: every zoo model within its contract, dynamic batch on the file's
symbolic dims, int8 as QDQ that ONNX Runtime runs as integer GEMMs within the int8 budget,
save/load without exporting again, the reason when onnxruntime is missing or the graph has
state, and, when the engine is wrong, the first diverging ONNX node named.

Each model is compiled once per module and the tests share it.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.backends import onnxruntime as backend
from graphopt.backends.base import BackendError, Handoff
from graphopt.backends.select import BackendWarning, budget_of, value_judge
from graphopt.errors import EquivalenceError
from graphopt.export.onnx import fx_values
from graphopt.verification import metrics
from graphopt.verification.contracts import Contract

INT8 = "-O2,int8{measure=false}"  # every layer the plan allows in int8, measured or not
OTHER_BATCH = 6
FP32_FLOOR = 1e-5


def _compile(name: str, pipeline: str = "-O2", **options: Any) -> graphopt.CompiledModule:
    model, inputs = zoo.get(name)
    options.setdefault("on_fail", "raise")
    return graphopt.compile(model, inputs, pipeline=pipeline, backend="onnxruntime", **options)


def _float64(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The original model run eagerly in float64 (a copy; the model is not touched)."""
    wide = copy.deepcopy(model).double().eval()
    args = [t.double() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        return pytree.tree_leaves(wide(*args))


def _model_of(compiled: graphopt.CompiledModule) -> onnx.ModelProto:
    return onnx.load_from_string(compiled.engine.payload()[backend.MODEL_FILE])


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, graphopt.CompiledModule]:
    return {name: _compile(name) for name in zoo.ZOO}


@pytest.fixture(scope="module")
def int8_models() -> dict[str, graphopt.CompiledModule]:
    """BERT (its Q, K and V layers share one quantized input) and the MLP, in static int8."""
    return {name: _compile(name, INT8) for name in ("bert", "mlp")}


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_runs_on_onnxruntime_within_its_contract(zoo_models: Any, name: str) -> None:
    compiled = zoo_models[name]
    # on_fail="raise": the engine's outputs were judged against the float64 reference
    assert compiled.backend == "onnxruntime"
    rows = {row.backend: row for row in compiled.report.backends}
    assert rows["onnxruntime"].status == "kept", rows["onnxruntime"].why
    assert rows["onnxruntime"].error <= max(2 * rows["aten"].error, FP32_FLOOR)
    # the other batch size runs on the same session: the file's batch dim is symbolic
    model, inputs = zoo.get(name, batch=OTHER_BATCH)
    got = pytree.tree_leaves(compiled(*inputs))
    want = _float64(model, inputs)
    assert [g.shape for g in got] == [w.shape for w in want]
    aten = pytree.tree_leaves(graphopt.CompiledModule(compiled.gm, compiled.signature)(*inputs))
    for g, a, w in zip(got, aten, want):
        assert metrics.rel_max(g, w) <= max(2 * metrics.rel_max(a, w), FP32_FLOOR)


def test_dynamic_dims_stay_symbolic_in_the_file(zoo_models: Any) -> None:
    compiled = zoo_models["bert"]  # ids and mask: dim 0 dynamic, the sequence dim fixed
    handoff_dims = [(0,), (0,)]
    for value, dims in zip(_model_of(compiled).graph.input, handoff_dims):
        shape = value.type.tensor_type.shape.dim
        assert [bool(d.dim_param) for d in shape] == [i in dims for i in range(len(shape))]
    _, inputs = zoo.get("bert", batch=1)
    assert pytree.tree_leaves(compiled(*inputs))[0].shape[0] == 1


def test_every_fx_value_is_named_in_the_file(zoo_models: Any) -> None:
    compiled = zoo_models["bert"]
    named = set(fx_values(_model_of(compiled)).values())
    layers = {
        n.name
        for n in compiled.gm.graph.nodes
        if n.target in (torch.ops.aten.linear.default, torch.ops.aten.layer_norm.default)
    }
    assert layers and layers <= named, layers - named


@pytest.mark.parametrize("name", ["bert", "mlp"])
def test_int8_runs_as_integer_gemms_within_budget(int8_models: Any, name: str) -> None:
    compiled = int8_models[name]
    rows = {row.backend: row for row in compiled.report.backends}
    assert compiled.backend == "onnxruntime", rows["onnxruntime"].why
    int8_layers = sum("int8_linear" in str(n.target) for n in compiled.gm.graph.nodes)
    assert int8_layers > 0
    # the budget: the int8 pass's cosine against float64, at another batch size too
    model, inputs = zoo.get(name, batch=OTHER_BATCH)
    got = pytree.tree_leaves(compiled(*inputs))
    assert min(metrics.cosine(g, w) for g, w in zip(got, _float64(model, inputs))) >= 0.99
    # every int8 layer is an integer GEMM in ORT's optimized graph (fusions that would turn it
    # into a float Gemm left out, as the backend does where that measures faster)
    data = compiled.engine.payload()[backend.MODEL_FILE]
    assert _optimized_ops(data, list(backend.OPTIONAL_FUSIONS)).count("MatMulIntegerToFloat") == (
        int8_layers
    )


def _optimized_ops(data: bytes, disabled: list[str]) -> list[str]:
    options = backend.session_options()
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(
            data, options, providers=list(backend.CPU), disabled_optimizers=disabled
        )
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_save_and_load_without_exporting_again(
    zoo_models: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = zoo_models["gpt"]
    path = tmp_path / "gpt.graphopt"
    graphopt.save(compiled, path)
    with zipfile.ZipFile(path) as zf:
        saved = zf.read(f"backend/{backend.MODEL_FILE}")
        session = json.loads(zf.read(f"backend/{backend.SESSION_FILE}"))
    assert saved == compiled.engine.payload()[backend.MODEL_FILE]
    assert session["disabled"] == compiled.engine.run.disabled

    def no_export(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("load exported the graph again")

    monkeypatch.setattr(backend, "export_model", no_export)
    monkeypatch.setattr(backend, "onnx_model", no_export)
    loaded = graphopt.load(path)
    assert loaded.backend == "onnxruntime"
    assert loaded.engine.run.disabled == compiled.engine.run.disabled
    for batch in (4, 5):
        _, inputs = zoo.get("gpt", batch=batch)
        assert torch.equal(loaded(*inputs), compiled(*inputs))


@pytest.mark.parametrize("module", ["onnxruntime", "onnxscript"])
def test_missing_package_is_reported_not_raised(
    module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a)
    )
    why = backend.OnnxRuntime().unavailable("cpu")
    assert why == f"{module} not installed (pip install {module})"
    model, inputs = zoo.get("mlp")
    with pytest.raises(BackendError, match=re.escape(f"'onnxruntime' is unavailable here: {why}")):
        graphopt.compile(model, inputs, pipeline="-O1", backend="onnxruntime")


def test_cuda_target_is_unavailable() -> None:
    why = backend.OnnxRuntime().unavailable("cuda")
    assert why is not None and "CPU provider only" in why


class _Counter(nn.Module):
    """Counts its calls in a buffer: state an ONNX graph cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.add_(1)
        return self.fc(x) * self.calls


def test_stateful_graph_is_unsupported_with_the_reason() -> None:
    with pytest.raises(BackendError, match="unsupported here: the graph updates state"):
        graphopt.compile(_Counter(), (torch.randn(2, 8),), pipeline="-O1", backend="onnxruntime")


def _plant_abs_for_relu(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the exported file compute abs where the graph has relu (one node, local fault)."""
    export = backend.export_model
    planted: list[str] = []

    def wrong(handoff: Handoff) -> onnx.ModelProto:
        model = export(handoff)
        node = next(n for n in model.graph.node if n.op_type == "Relu")
        node.op_type = "Abs"
        planted.append(node.name)
        return model

    monkeypatch.setattr(backend, "export_model", wrong)
    return planted


def test_rejection_names_the_first_diverging_onnx_node(monkeypatch: pytest.MonkeyPatch) -> None:
    planted = _plant_abs_for_relu(monkeypatch)
    model, inputs = zoo.get("mlp")
    with pytest.raises(EquivalenceError) as raised:
        graphopt.compile(model, inputs, pipeline="-O2", backend="onnxruntime", on_fail="raise")
    message = str(raised.value)
    assert f"first diverging ONNX node {planted[0]!r} (Abs" in message
    assert "local error" in message
    # rolled back instead: the model runs on aten, the backend table says why
    with pytest.warns(BackendWarning):
        compiled = graphopt.compile(model, inputs, pipeline="-O2", backend="onnxruntime")
    assert compiled.backend == "aten"
    row = next(r for r in compiled.report.backends if r.backend == "onnxruntime")
    assert row.status == "rejected" and f"first diverging ONNX node {planted[-1]!r}" in row.why
    torch.testing.assert_close(compiled(*inputs), model(*inputs))


def test_a_correct_engine_has_no_diverging_node(zoo_models: Any) -> None:
    compiled = zoo_models["bert"]
    model, inputs = zoo.get("bert")
    handoff = Handoff.of(compiled.gm, pytree.tree_leaves(inputs), compiled.signature)
    changed = [r for r in compiled.report.records if r.status == "ok"]
    budget = budget_of([Contract.parse(r.contract) for r in changed])
    found = backend.OnnxRuntime().diagnose(compiled.engine, handoff, value_judge(budget))
    assert found is not None and found.startswith("no ONNX value diverges"), found
