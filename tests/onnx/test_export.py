"""graphopt.export_onnx: the file passes onnx.checker and ONNX Runtime (CPU) runs it within the
contract of graphopt's own outputs, judged against an eager float64 run of the original model."""

from __future__ import annotations

import functools
import operator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from ort_runs import float64_run, ort_run
from torch import nn
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.verification import metrics
from graphopt.verification.interpreter import reference_run

ZOO = ("resnet", "mobilenet", "bert", "gpt", "mlp")
BATCH, OTHER_BATCH = 4, 6
FP32_FLOOR = 1e-5  # graphopt's float32 rounding floor (docs/architecture.md)
INT8 = "-O1,int8{measure=false}"
# every fusion kept whatever it measures, so that each graphopt op kind reaches the exporter
FUSE_ALL = (
    "-O1,patterns,fuse-epilogue{measure=false},fuse-kernels{measure=false},"
    "fuse-pointwise{measure=false}"
)


@functools.cache
def _compiled(name: str, pipeline: str) -> tuple[nn.Module, graphopt.CompiledModule]:
    model, inputs = zoo.get(name, batch=BATCH)
    return model, graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")


@functools.cache
def _exported(name: str, pipeline: str, tmp: Path, custom_ops: bool = False) -> onnx.ModelProto:
    _, compiled = _compiled(name, pipeline)
    tag = pipeline.replace(",", "_").replace("{", "").replace("}", "").replace("=", "")
    path = tmp / f"{name}{tag}{'_custom' if custom_ops else ''}.onnx"
    assert graphopt.export_onnx(compiled, path, custom_ops=custom_ops) == path
    return onnx.load(str(path))


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_export")


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _worst(outs: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    assert len(outs) == len(refs)
    return max(metrics.rel_max(y, r) for y, r in zip(outs, refs))


def _symbolic_batch(model: onnx.ModelProto) -> bool:
    return all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)


@pytest.mark.parametrize("pipeline", ["-O1", "-O2"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_exports_within_rounding_contract(name: str, pipeline: str, tmp: Path) -> None:
    model, compiled = _compiled(name, pipeline)
    exported = _exported(name, pipeline, tmp)
    onnx.checker.check_model(exported, full_check=True)
    assert _symbolic_batch(exported)
    assert all(n.domain in ("", "ai.onnx") for n in exported.graph.node)
    for batch in (BATCH, OTHER_BATCH):  # the other batch size runs on the same file
        _, inputs = zoo.get(name, batch=batch)
        ref = float64_run(model, inputs)
        own = _worst(_leaves(compiled(*inputs)), ref)
        got = ort_run(exported, inputs)
        assert got[0].shape[0] == batch
        # the rounding contract: no worse than twice graphopt's own error, plus the fp32 floor
        assert _worst(got, ref) <= 2 * own + FP32_FLOOR, (batch, own)


@pytest.mark.parametrize("name", ["resnet", "bert", "gpt"])
def test_every_fused_op_exports_as_standard_onnx(name: str, tmp: Path) -> None:
    model, compiled = _compiled(name, FUSE_ALL)
    kinds = {str(n.target) for n in compiled.graph.nodes if str(n.target).startswith("graphopt.")}
    assert kinds, "the pipeline left no graphopt op to export"
    exported = _exported(name, FUSE_ALL, tmp)
    assert all(n.domain in ("", "ai.onnx") for n in exported.graph.node)
    _, inputs = zoo.get(name, batch=OTHER_BATCH)
    ref = float64_run(model, inputs)
    own = _worst(_leaves(compiled(*inputs)), ref)
    assert _worst(ort_run(exported, inputs), ref) <= 2 * own + FP32_FLOOR


class _ScaledSoftmax(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x * 0.125 + mask, dim=-1) * 2.0


def test_softmax_op_exports(tmp: Path) -> None:
    model = _ScaledSoftmax()
    inputs = (torch.randn(3, 4, 8, 8), torch.randn(3, 1, 1, 8))
    compiled = graphopt.compile(model, inputs, pipeline=FUSE_ALL, on_fail="raise")
    assert any(n.target == torch.ops.graphopt.softmax.default for n in compiled.graph.nodes)
    path = graphopt.export_onnx(compiled, tmp / "softmax.onnx")
    exported = onnx.load(str(path))
    other = (torch.randn(5, 4, 8, 8), torch.randn(5, 1, 1, 8))
    ref = float64_run(model, other)
    own = _worst(_leaves(compiled(*other)), ref)
    assert _worst(ort_run(exported, other), ref) <= 2 * own + FP32_FLOOR


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node values by name."""
    values = _initializers(model)
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


@pytest.mark.parametrize("name", ZOO)
def test_int8_exports_as_qdq(name: str, tmp: Path) -> None:
    model, compiled = _compiled(name, INT8)
    n_int8 = sum(str(n.target).startswith("graphopt.int8") for n in compiled.graph.nodes)
    assert n_int8 > 0
    exported = _exported(name, INT8, tmp)
    onnx.checker.check_model(exported, full_check=True)
    consts = _constants(exported)
    producers = {o: n for n in exported.graph.node for o in n.output}
    weight_dq = [
        n
        for n in exported.graph.node
        if n.op_type == "DequantizeLinear" and consts.get(n.input[0], np.float32(0)).ndim >= 2
    ]
    # one per-channel weight DequantizeLinear per int8 layer: int8 initializer, one scale per
    # output channel (axis 1 of a MatMul's [K, N] weight, axis 0 of a Conv's), zero points 0
    assert len(weight_dq) == n_int8
    users = {i: n for n in exported.graph.node for i in n.input}
    for dq in weight_dq:
        w, scales, zp = (consts[i] for i in dq.input)
        assert w.dtype == np.int8 and np.abs(w.astype(np.int32)).max() <= 127
        axis = {"MatMul": 1, "Conv": 0}[users[dq.output[0]].op_type]
        assert [(a.name, onnx.helper.get_attribute_value(a)) for a in dq.attribute] == [
            ("axis", axis)
        ]
        assert scales.shape == (w.shape[axis],) and zp.shape == (w.shape[axis],) and not zp.any()
    # activations: QuantizeLinear -> DequantizeLinear with a per-tensor scale and zero point 0
    quants = [n for n in exported.graph.node if n.op_type == "QuantizeLinear"]
    assert quants
    for q in quants:
        scale, zp = consts[q.input[1]], consts[q.input[2]]
        assert scale.shape == () and zp.shape == () and zp.dtype == np.int8 and zp == 0
    # each GEMM/convolution weight comes straight from a weight DequantizeLinear, each int8
    # layer's activation from a DequantizeLinear fed by a QuantizeLinear (the QDQ node unit);
    # the weight is stored as MatMul takes it, so no Transpose splits it from its
    # DequantizeLinear
    weight_outputs = {dq.output[0] for dq in weight_dq}
    layers = [
        n
        for n in exported.graph.node
        if n.op_type in ("MatMul", "Conv") and n.input[1] in weight_outputs
    ]
    assert len(layers) == n_int8
    for layer in layers:
        act = producers[layer.input[0]]
        assert act.op_type == "DequantizeLinear"
        assert producers[act.input[0]].op_type == "QuantizeLinear"
    # ONNX Runtime runs it, within the int8 budget of float and close to graphopt's int8 model
    for batch in (BATCH, OTHER_BATCH):
        _, inputs = zoo.get(name, batch=batch)
        got = ort_run(exported, inputs)
        ref = float64_run(model, inputs)
        own = _leaves(compiled(*inputs))
        assert min(metrics.cosine(y, r) for y, r in zip(got, ref)) >= 0.99
        assert min(metrics.cosine(y, r) for y, r in zip(got, own)) >= 0.999


class _SharedInput(nn.Module):
    """Three layers reading one normalized input, as attention's Q, K and V do."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.q(h) * self.k(h) + self.v(h)


def test_uint8_activations_run_as_integer_gemms(tmp: Path) -> None:
    """A quantized activation read by three layers: ONNX Runtime's x86 provider runs them as
    integer GEMMs only with uint8 activations (it converts int8 ones itself only where one
    quantized tensor feeds one layer); the numbers are the same, shifted by 128."""
    torch.manual_seed(0)
    model, inputs = _SharedInput().eval(), (torch.randn(4, 8, 32),)
    compiled = graphopt.compile(model, inputs, pipeline=INT8, on_fail="raise")
    n_int8 = sum(str(n.target).startswith("graphopt.int8") for n in compiled.graph.nodes)
    assert n_int8 == 3
    signed = onnx.load(str(graphopt.export_onnx(compiled, tmp / "shared_s8.onnx")))
    path = graphopt.export_onnx(compiled, tmp / "shared_u8.onnx", uint8_activations=True)
    unsigned = onnx.load(str(path))
    consts = _constants(unsigned)
    for node in unsigned.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[0] not in consts:
            assert consts[node.input[2]].dtype == np.uint8 and consts[node.input[2]] == 128
    # MatMulAddFusion would turn the MatMul + bias Add into a float Gemm before the QDQ fuser
    fused = {
        key: _ort_ops(exported, disabled=["MatMulAddFusion"]).count("MatMulIntegerToFloat")
        for key, exported in (("signed", signed), ("unsigned", unsigned))
    }
    assert fused == {"signed": 0, "unsigned": 3}
    other = (torch.randn(6, 8, 32),)
    for got, want in zip(ort_run(unsigned, other), ort_run(signed, other)):
        assert metrics.cosine(got, want) >= 0.9999


def _ort_ops(model: onnx.ModelProto, disabled: list[str]) -> list[str]:
    """The op types of ONNX Runtime's optimized form of ``model`` (CPU, every optimization)."""
    import tempfile

    import onnxruntime as ort

    options = ort.SessionOptions()
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = f"{folder}/optimized.onnx"
        ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=disabled,
        )
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def test_custom_ops_become_graphopt_domain_nodes(tmp: Path) -> None:
    _, compiled = _compiled("bert", FUSE_ALL)
    ops = [n for n in compiled.graph.nodes if str(n.target).startswith("graphopt.")]
    exported = _exported("bert", FUSE_ALL, tmp, custom_ops=True)
    onnx.checker.check_model(exported, full_check=True)
    assert {o.domain: o.version for o in exported.opset_import}.get("graphopt") == 1
    custom = [n for n in exported.graph.node if n.domain == "graphopt"]
    assert sorted(n.op_type for n in custom) == sorted(str(n.target).split(".")[1] for n in ops)
    # the op's parameters travel as attributes: each fused linear's activation, by name
    want_acts = sorted(n.args[4] for n in ops if n.target == torch.ops.graphopt.linear.default)
    attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in custom]
    got_acts = sorted(a["act"].decode() for n, a in zip(custom, attrs) if n.op_type == "linear")
    assert got_acts == want_acts
    norms = [a for n, a in zip(custom, attrs) if n.op_type == "norm"]
    assert norms and all(a["kind"] == b"layer" and a["eps"] == pytest.approx(1e-5) for a in norms)


def test_custom_ops_keep_int8_as_qdq_around_custom_gemms(tmp: Path) -> None:
    _, compiled = _compiled("mlp", INT8)
    exported = _exported("mlp", INT8, tmp, custom_ops=True)
    onnx.checker.check_model(exported, full_check=True)
    types = [(n.domain, n.op_type) for n in exported.graph.node]
    assert types.count(("graphopt", "int8_linear")) == 3
    assert ("", "QuantizeLinear") in types
    linear = next(n for n in exported.graph.node if n.op_type == "int8_linear")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in linear.attribute}
    assert attrs["dtype"] == onnx.TensorProto.FLOAT and attrs["act"] == b"none"
    assert attrs["x_scale"] > 0


def test_pruned_weights_stay_zero(tmp: Path) -> None:
    model, inputs = zoo.get("mlp", batch=BATCH)
    pipeline = "-O1,prune{kind=unstructured,amount=0.5,measure=false,min_cosine=0.5}"
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    path = graphopt.export_onnx(compiled, tmp / "pruned.onnx")
    exported = onnx.load(str(path))
    inits = _initializers(exported)
    pruned = [n.target for n in compiled.graph.nodes if n.op == "get_attr" and "pruned" in n.target]
    assert len(pruned) == 3
    for target in pruned:
        weight = operator.attrgetter(target)(compiled.gm).numpy()
        assert (weight == 0).mean() == pytest.approx(0.5, abs=0.01)
        np.testing.assert_array_equal(inits[target], weight)  # same zeros, same values
    # pruning is lossy; the export itself keeps the rounding contract of the pruned graph
    _, other = zoo.get("mlp", batch=OTHER_BATCH)
    ref = reference_run(compiled.gm, list(other))[0]
    own = _worst(_leaves(compiled(*other)), ref)
    assert _worst(ort_run(exported, other), ref) <= 2 * own + FP32_FLOOR


def test_graph_module_and_static_batch(tmp: Path) -> None:
    model, inputs = zoo.get("mlp", batch=BATCH)
    gm = graphopt.capture(model, inputs)
    path = graphopt.export_onnx(gm, tmp / "captured.onnx")
    exported = onnx.load(str(path))
    assert _symbolic_batch(exported)
    _, other = zoo.get("mlp", batch=OTHER_BATCH)
    ref = float64_run(model, other)
    assert _worst(ort_run(exported, other), ref) <= FP32_FLOOR
    _, compiled = _compiled("mlp", "-O1")
    with pytest.raises(graphopt.OnnxExportError, match="example_inputs"):
        graphopt.export_onnx(compiled, tmp / "static.onnx", dynamic_batch=False)
    path = graphopt.export_onnx(
        compiled, tmp / "static.onnx", dynamic_batch=False, example_inputs=other
    )
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [OTHER_BATCH, 128] and not dims[0].dim_param
    # a model compiled with a static batch exports with that batch
    fixed = graphopt.compile(model, inputs, pipeline="-O1", dynamic_batch=False)
    path = graphopt.export_onnx(fixed, tmp / "fixed.onnx")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [BATCH, 128] and not dims[0].dim_param


@pytest.mark.parametrize("opset", [17, 21])
def test_opset_choice(opset: int, tmp: Path) -> None:
    model, compiled = _compiled("mlp", INT8)
    path = graphopt.export_onnx(compiled, tmp / f"opset{opset}.onnx", opset=opset)
    exported = onnx.load(str(path))
    assert {o.domain: o.version for o in exported.opset_import}[""] == opset
    _, inputs = zoo.get("mlp", batch=OTHER_BATCH)
    got = ort_run(exported, inputs)
    assert metrics.cosine(got[0], float64_run(model, inputs)[0]) >= 0.99


def test_bad_object_is_a_clear_error(tmp: Path) -> None:
    model, _ = zoo.get("mlp", batch=BATCH)
    for bad in (model, "model.onnx", None):
        with pytest.raises(graphopt.GraphoptError, match="CompiledModule.*compile the model first"):
            graphopt.export_onnx(bad, tmp / "x.onnx")  # type: ignore[arg-type]


def test_unwritable_path_is_a_clear_error(tmp: Path) -> None:
    _, compiled = _compiled("mlp", "-O1")
    with pytest.raises(graphopt.OnnxExportError, match="does not exist; create it first"):
        graphopt.export_onnx(compiled, tmp / "no" / "such" / "folder" / "m.onnx")
    blocker = tmp / "a_file"
    blocker.write_text("")
    with pytest.raises(graphopt.OnnxExportError, match="does not exist"):
        graphopt.export_onnx(compiled, blocker / "m.onnx")
    with pytest.raises(graphopt.OnnxExportError, match="is a directory"):
        graphopt.export_onnx(compiled, tmp)
    with pytest.raises(graphopt.OnnxExportError, match="opset 13 or newer"):
        graphopt.export_onnx(compiled, tmp / "m.onnx", opset=11)
    # torch.onnx cannot convert Relu down to opset 13: said, not a silent opset-18 file
    with pytest.raises(graphopt.OnnxExportError, match="could not write opset 13.*wrote opset"):
        graphopt.export_onnx(compiled, tmp / "m.onnx", opset=13)


def test_cli_compile_writes_onnx(tmp: Path) -> None:
    from graphopt.tools.cli import main

    path = tmp / "cli.onnx"
    assert main(["compile", "mlp", "--batch", "3", "--onnx", str(path)]) == 0
    exported = onnx.load(str(path))
    onnx.checker.check_model(exported, full_check=True)
    model, inputs = zoo.get("mlp", batch=OTHER_BATCH)
    assert _worst(ort_run(exported, inputs), float64_run(model, inputs)) <= FP32_FLOOR


def test_cli_onnx_in_onnx_out_keeps_the_file_names_and_says_only_what_it_did(
    tmp: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """``graphopt compile model.onnx --onnx out.onnx``: the output file keeps the input's input
    and output names (not torch.export's args_0), no torchvision noise, no int8 claim for a
    float model."""
    from graphopt.tools.cli import main

    model, inputs = zoo.get("mlp", batch=BATCH)
    source = tmp / "named.onnx"
    torch.onnx.export(
        model, inputs, str(source), input_names=["pixels"], output_names=["logits"],
        dynamic_axes={"pixels": {0: "n"}}, dynamo=False,
    )  # fmt: skip
    out = tmp / "named-out.onnx"
    assert main(["compile", str(source), "--pipeline", "-O2", "--onnx", str(out)]) == 0
    printed = capfd.readouterr()
    exported = onnx.load(str(out))
    assert [i.name for i in exported.graph.input] == ["pixels"]
    assert [o.name for o in exported.graph.output] == ["logits"]
    assert "torchvision" not in printed.out + printed.err
    assert f"exported to {out} (ONNX)" in printed.out and "QuantizeLinear" not in printed.out
    other = (torch.randn(OTHER_BATCH, *inputs[0].shape[1:]),)
    assert _worst(ort_run(exported, other), float64_run(model, other)) <= FP32_FLOOR


@pytest.mark.parametrize(
    "options",
    ["act=dynamic", "mode=w8a16", "lower=false", "smooth=0.5", "calib=minmax", "fp16,lower=false"],
)
def test_int8_variants_export(options: str, tmp: Path) -> None:
    model, inputs = zoo.get("mlp", batch=BATCH)
    fp16 = options.startswith("fp16,")  # the QDQ form in fp16: cast around the float32 QDQ ops
    int8 = f"int8{{measure=false,{options.removeprefix('fp16,')}}}"
    pipeline = f"-O1,precision{{dtype=fp16}},{int8}" if fp16 else f"-O1,{int8}"
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    assert any(str(n.target).startswith("graphopt.") for n in compiled.graph.nodes)
    name = options.replace("=", "_").replace(",", "_")
    path = graphopt.export_onnx(compiled, tmp / f"int8_{name}.onnx")
    exported = onnx.load(str(path))
    types = {n.op_type for n in exported.graph.node}
    assert "DequantizeLinear" in types  # the weights stay int8 behind a DequantizeLinear
    _, other = zoo.get("mlp", batch=OTHER_BATCH)
    got, own = ort_run(exported, other), _leaves(compiled(*other))
    assert metrics.cosine(got[0], float64_run(model, other)[0]) >= 0.99
    assert metrics.cosine(got[0], own[0]) >= 0.9999


def test_fp16_graph_exports_within_its_floor(tmp: Path) -> None:
    model, inputs = zoo.get("mlp", batch=BATCH)
    compiled = graphopt.compile(model, inputs, pipeline="-O1,precision{dtype=fp16}")
    path = graphopt.export_onnx(compiled, tmp / "fp16.onnx")
    _, other = zoo.get("mlp", batch=OTHER_BATCH)
    ref = float64_run(model, other)
    own = _worst(_leaves(compiled(*other)), ref)
    assert own > FP32_FLOOR  # the fp16 graph really computes in fp16
    assert _worst(ort_run(onnx.load(str(path)), other), ref) <= 2 * own + metrics.rounding_floor(
        torch.float16
    )


class _Sparse(nn.Module):
    """A layer written with graphopt's 2:4 op directly (on the CPU prune keeps it dense)."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(16, 32)
        w[:, 1::2] = 0  # two zeros in every four weights
        self.w, self.b = nn.Parameter(w), nn.Parameter(torch.randn(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.sparse24_linear(x, self.w, self.b).relu()


def test_sparse24_linear_exports_as_a_dense_gemm_with_its_zeros(tmp: Path) -> None:
    model = _Sparse().eval()
    compiled = graphopt.compile(model, (torch.randn(4, 32),), pipeline="-O0")
    assert any(n.target == torch.ops.graphopt.sparse24_linear.default for n in compiled.graph.nodes)
    exported = onnx.load(str(graphopt.export_onnx(compiled, tmp / "sparse.onnx")))
    weights = [w for w in _initializers(exported).values() if w.shape == (16, 32)]
    assert len(weights) == 1 and not weights[0][:, 1::2].any()
    x = torch.randn(7, 32)
    assert _worst(ort_run(exported, (x,)), float64_run(model, (x,))) <= FP32_FLOOR


@torch.library.custom_op("graphopt::test_export_unknown", mutates_args=())
def _unknown_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_unknown_op.register_fake
def _unknown_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class _UsesUnknownOp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.graphopt.test_export_unknown(x) + 1


def test_graphopt_op_without_onnx_form_is_named(tmp: Path) -> None:
    compiled = graphopt.compile(_UsesUnknownOp(), (torch.randn(3, 4),), pipeline="-O0")
    with pytest.raises(graphopt.OnnxExportError, match="no ONNX form.*test_export_unknown.*node"):
        graphopt.export_onnx(compiled, tmp / "unknown.onnx")
    assert not (tmp / "unknown.onnx").exists()
