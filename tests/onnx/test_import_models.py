"""Round trips: zoo model -> torch.onnx.export -> graphopt import, against ONNX Runtime on the file
and against the torch model; dynamic batch; graphopt.compile at -O1 and -O2 with every pass's
equivalence check passing."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo

MODELS = ["resnet", "mobilenet", "bert", "gpt", "mlp"]


def _export(name: str, folder: Path, dynamo: bool) -> tuple[Path, torch.nn.Module]:
    model, inputs = zoo.get(name, batch=2)
    path = folder / f"{name}_{'dynamo' if dynamo else 'ts'}.onnx"
    names = [f"input_{i}" for i in range(len(inputs))]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            dims = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
            torch.onnx.export(model, inputs, str(path), dynamo=True, dynamic_shapes=dims,
                              input_names=names, verbose=False)  # fmt: skip
        else:
            torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=names,
                              dynamic_axes={n: {0: "batch"} for n in names}, opset_version=17)  # fmt: skip
    return path, model


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[tuple[str, bool], tuple[Path, torch.nn.Module]]:
    folder = tmp_path_factory.mktemp("onnx_zoo")
    return {(name, dyn): _export(name, folder, dyn) for name in MODELS for dyn in (True, False)}


def _flat(out: object) -> list[np.ndarray]:
    return [t.detach().numpy() for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _ort(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)})


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", MODELS)
def test_capture_matches_onnxruntime_and_torch_at_two_batch_sizes(exported, name, dynamo) -> None:
    path, model = exported[(name, dynamo)]
    gm = graphopt.capture(str(path))
    info = gm.meta["graphopt_capture"]
    assert info["source"] == "onnx" and info["dynamic_batch"], info
    assert all(0 in dims for dims in info["dynamic_dims"].values())
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "call_function", "get_attr"):
            assert "val" in node.meta, node.format_node()
    assert any(n.op == "get_attr" for n in gm.graph.nodes)  # weights are get_attr, as in torch
    for batch in (2, 5):  # 5: not the batch the ONNX file or the capture was traced at
        _, inputs = zoo.get(name, batch=batch)
        got = _flat(gm(*inputs))
        ref_ort = _ort(path, inputs)
        with torch.no_grad():
            ref_torch = _flat(model(*inputs))
        assert len(got) == len(ref_ort) == len(ref_torch)
        for g, o, t in zip(got, ref_ort, ref_torch):
            assert g.shape == o.shape == t.shape
            assert _rel(g, o) < 1e-5, (batch, _rel(g, o))
            assert _rel(g, t) < 1e-5, (batch, _rel(g, t))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("pipeline", ["-O1", "-O2"])
@pytest.mark.parametrize("name", MODELS)
def test_compile_onnx_file_every_pass_verified(exported, name, pipeline, dynamo) -> None:
    path, model = exported[(name, dynamo)]  # TorchScript: BN, Shape/Gather/Concat chains
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.EquivalenceWarning)  # a rolled-back pass fails
        compiled = graphopt.compile(str(path), pipeline=pipeline, on_fail="raise")
    statuses = {r.status for r in compiled.report.records}
    assert statuses <= {"ok", "unchanged"}, compiled.report.to_text()
    assert compiled.report.capture["source"] == "onnx"
    _, inputs = zoo.get(name, batch=3)  # example inputs were synthesized at batch 2
    got = _flat(compiled(*inputs))
    for g, o in zip(got, _ort(path, inputs)):
        assert _rel(g, o) < 1e-4


def test_compile_folds_imported_batch_norm(exported) -> None:
    path, _ = exported[("mlp", False)]  # BatchNormalization after Gemm in the file
    compiled = graphopt.compile(path, pipeline="-O1")
    fold = next(r for r in compiled.report.records if r.name == "fold-bn")
    assert fold.status == "ok" and fold.rewrites == 2


def test_capture_of_a_model_proto(exported) -> None:
    path, _ = exported[("resnet", True)]
    proto = onnx.load(str(path))
    before = proto.SerializeToString()
    gm = graphopt.capture(proto)
    assert proto.SerializeToString() == before  # the caller's model is not edited
    _, inputs = zoo.get("resnet", batch=3)
    assert _rel(_flat(gm(*inputs))[0], _ort(path, inputs)[0]) < 1e-5
    assert gm.meta["graphopt_capture"]["file"] == "<onnx.ModelProto>"


def test_compiled_onnx_model_checks_inputs(exported) -> None:
    path, _ = exported[("resnet", True)]
    compiled = graphopt.compile(path, pipeline="-O1")
    with pytest.raises(graphopt.InputMismatchError):
        compiled(torch.randn(2, 3, 16, 16))  # 32x32 images are static dims in the file


def test_imported_bert_reads_like_a_torch_capture_to_the_pattern_passes(exported) -> None:
    # Scalar constants come in as Python numbers (x / 1.4142 + 1 ...), as in a torch capture, so
    # the gelu and attention patterns match the TorchScript exporter's decomposed forms.
    path, _ = exported[("bert", False)]
    compiled = graphopt.compile(path, pipeline="-O2")
    applied = {r.name: r.rewrites for r in compiled.report.records if r.status == "ok"}
    assert applied.get("patterns:fuse-gelu") == 2 and applied.get("patterns:fuse-attention") == 2


def test_compiled_onnx_model_saves_and_loads(exported, tmp_path: Path) -> None:
    path, _ = exported[("gpt", False)]  # Shape/Gather/Concat chains, ConstantOfShape, Where
    compiled = graphopt.compile(path, pipeline="-O1")
    graphopt.save(compiled, tmp_path / "gpt.graphopt")
    loaded = graphopt.load(tmp_path / "gpt.graphopt")
    _, inputs = zoo.get("gpt", batch=3)
    np.testing.assert_array_equal(_flat(loaded(*inputs))[0], _flat(compiled(*inputs))[0])


def test_cli_compiles_an_onnx_file(exported, capsys: pytest.CaptureFixture[str]) -> None:
    from graphopt.tools.cli import main

    path, _ = exported[("mlp", False)]
    assert main(["compile", str(path), "--pipeline", "-O1", "--batch", "4"]) == 0
    assert "fold-bn" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["bert", "mlp", "resnet"])
def test_imported_layers_are_aten_linear_like_a_torch_capture(exported, name) -> None:
    # MatMul(x, W) + b from the exporter becomes aten.linear (onnx_import.fuse_linear), so
    # fold-bn, the epilogues, int8 and pruning see the same layers as in a torch capture.
    path, model = exported[(name, False)]
    _, inputs = zoo.get(name, batch=2)

    def count(gm: torch.fx.GraphModule) -> int:
        return sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)

    assert count(graphopt.capture(str(path))) == count(graphopt.capture(model, inputs)) > 0


class _CausalSelfAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, 2, 8).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return y.transpose(1, 2).reshape(b, s, 16)


def test_opset23_attention_from_sdpa_round_trips(tmp_path: Path) -> None:
    # torch.onnx at opset 23 writes SDPA as one Attention node; it comes back as SDPA
    torch.manual_seed(0)
    model, path = _CausalSelfAttention().eval(), tmp_path / "sdpa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 5, 16),), str(path), dynamo=True, opset_version=23,
                          dynamic_shapes=({0: torch.export.Dim.DYNAMIC},), verbose=False)  # fmt: skip
    assert "Attention" in {n.op_type for n in onnx.load(str(path)).graph.node}
    compiled = graphopt.compile(path, pipeline="-O2", on_fail="raise")
    gm = graphopt.capture(path)
    sdpa = torch.ops.aten.scaled_dot_product_attention.default
    assert any(n.target is sdpa for n in gm.graph.nodes)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel(_flat(compiled(x))[0], ref) < 1e-5
    assert _rel(_flat(compiled(x))[0], _ort(path, (x,))[0]) < 1e-5
