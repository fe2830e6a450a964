"""The ONNX round trip: torch model -> torch.onnx.export -> graphopt.compile(file) ->
graphopt.export_onnx -> ONNX Runtime, judged against an eager float64 run of the torch model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from ort_runs import float64_run, ort_run
from torch import nn
from torch.export import Dim
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.verification import metrics

ZOO = ("resnet", "mobilenet", "bert", "gpt", "mlp")
BATCH, OTHER_BATCH = 4, 6
FP32_FLOOR = 1e-5  # graphopt's float32 rounding floor (docs/architecture.md)


def _torch_onnx(model: nn.Module, inputs: tuple[Any, ...], path: Path) -> Path:
    """The file a user would bring: torch.onnx's exporter, batch dimension symbolic."""
    dims = tuple({0: Dim.DYNAMIC} for _ in inputs)
    torch.onnx.export(
        model, inputs, str(path), dynamo=True, dynamic_shapes=dims, external_data=False
    )
    return path


def _worst(outs: list[Any], refs: list[torch.Tensor]) -> float:
    outs = [t for t in pytree.tree_leaves(outs) if isinstance(t, torch.Tensor)]
    assert len(outs) == len(refs)
    return max(metrics.rel_max(y, r) for y, r in zip(outs, refs))


@pytest.mark.parametrize("name", ZOO)
def test_zoo_round_trip_within_contract(name: str, tmp_path: Path) -> None:
    model, inputs = zoo.get(name, batch=BATCH)
    original = _torch_onnx(model, inputs, tmp_path / "original.onnx")
    compiled = graphopt.compile(str(original), inputs, pipeline="-O2", on_fail="raise")
    exported = graphopt.export_onnx(compiled, tmp_path / "graphopt.onnx")
    onnx.checker.check_model(onnx.load(str(exported)), full_check=True)
    for batch in (BATCH, OTHER_BATCH):
        _, batch_inputs = zoo.get(name, batch=batch)
        ref = float64_run(model, batch_inputs)
        own = _worst(compiled(*batch_inputs), ref)
        ort_original = _worst(ort_run(original, batch_inputs), ref)
        got = _worst(ort_run(exported, batch_inputs), ref)
        # graphopt's contract, against the torch model: at most twice graphopt's own error on
        # the imported graph, plus the fp32 floor; and no worse than that next to ONNX
        # Runtime's own run of the original file
        assert got <= 2 * own + FP32_FLOOR, (batch, own, ort_original)
        assert got <= 2 * ort_original + FP32_FLOOR, (batch, own, ort_original)


@pytest.mark.parametrize("name", ["mlp", "bert"])
def test_imported_int8_export_loads_in_onnx_runtime(name: str, tmp_path: Path) -> None:
    model, inputs = zoo.get(name, batch=BATCH)
    original = _torch_onnx(model, inputs, tmp_path / "original.onnx")
    compiled = graphopt.compile(
        str(original), inputs, pipeline="-O2,int8{measure=false}", on_fail="raise"
    )
    assert any(str(n.target).startswith("graphopt.int8") for n in compiled.graph.nodes)
    exported = graphopt.export_onnx(compiled, tmp_path / "int8.onnx")
    types = [n.op_type for n in onnx.load(str(exported)).graph.node]
    assert "QuantizeLinear" in types and "DequantizeLinear" in types
    _, other = zoo.get(name, batch=OTHER_BATCH)
    got = ort_run(exported, other)
    ref = float64_run(model, other)
    assert min(metrics.cosine(y, r) for y, r in zip(got, ref)) >= 0.99
