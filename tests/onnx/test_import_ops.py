"""Per-op import tests: small hand-built ONNX graphs (onnx.helper), each imported by graphopt and
compared with ONNX Runtime on the CPU, eagerly and through full capture with dynamic dims."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.frontends.onnx_import import capture_onnx, load_onnx

F32 = TensorProto.FLOAT


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    # outputs are declared without shapes; shape inference fills them in, as exporters do
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(array, name)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _check(
    model: onnx.ModelProto, *arrays: np.ndarray, tol: float = 1e-5, capture: bool = True
) -> Any:
    names = [i.name for i in model.graph.input]
    expected = _ort(model, dict(zip(names, arrays)))
    args = tuple(torch.from_numpy(a.copy()) for a in arrays)
    results = [load_onnx(model)(*args)]
    gm = None
    if capture:
        with warnings.catch_warnings():
            warnings.simplefilter("error", graphopt.StaticShapeWarning)
            gm = capture_onnx(model, args)
        results.append(gm(*args))
    for got in results:
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert g.shape == e.shape and str(g.dtype).endswith(str(e.dtype)), (g.shape, e.shape)
            np.testing.assert_allclose(g.numpy(), e, rtol=tol, atol=tol)
    return gm


def _rand(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_shape_arithmetic_stays_symbolic_under_dynamic_batch() -> None:
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape, ConstantOfShape and Range on a shape:
    # the TorchScript exporter's pattern; it must keep the batch dim symbolic, not bake in 2.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Gather", ["s", "one"], ["c"], axis=0),
        helper.make_node("Range", ["zero", "c", "one"], ["r"]),
        helper.make_node("Cast", ["r"], ["rf"], to=F32),
        helper.make_node("Shape", ["flat"], ["fs"]),
        helper.make_node(
            "ConstantOfShape", ["fs"], ["ones"], value=_init("v", np.array([1.0], np.float32))
        ),
        helper.make_node("Add", ["flat", "ones"], ["y0"]),
        helper.make_node("Reshape", ["y0", "s"], ["y1"]),
        helper.make_node("Add", ["y1", "rf_col"], ["y"]),
        helper.make_node("Unsqueeze", ["rf", "axes1"], ["rf_col"]),
    ]
    nodes = nodes[:-2] + [nodes[-1], nodes[-2]]
    inits = [
        _init("zero", np.array(0, np.int64)),
        _init("one", np.array(1, np.int64)),
        _init("axes0", np.array([0], np.int64)),
        _init("axes1", np.array([1], np.int64)),
        _init("minus1", np.array([-1], np.int64)),
    ]
    x = helper.make_tensor_value_info("x", F32, ["N", 4, 6])
    y = helper.make_tensor_value_info("y", F32, ["N", 4, 6])
    model = _model(nodes, [x], [y], inits, opset=13)
    gm = _check(model, _rand(2, 4, 6))
    assert gm.meta["graphopt_capture"]["dynamic_dims"] == {0: [0]}
    other = _rand(7, 4, 6, seed=1)
    np.testing.assert_allclose(
        gm(torch.from_numpy(other)).numpy(), _ort(model, {"x": other})[0], rtol=1e-6
    )


def test_symbolic_non_batch_dim_is_dynamic_in_compiled_model(tmp_path: Path) -> None:
    # [B, S] ids -> embedding (Gather) -> ReduceMean over S: S is a second symbolic dim.
    table = _rand(16, 8)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], axis=0),
        helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0),
    ]
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])
    y = helper.make_tensor_value_info("y", F32, ["B", 8])
    model = _model(nodes, [ids], [y], [_init("table", table)], opset=17)
    compiled = graphopt.compile(model, pipeline="-O1")  # example inputs synthesized: B=2, S=8
    assert compiled.report.capture["dynamic_dims"] == {0: [0, 1]}
    for b, s in ((2, 8), (3, 5), (1, 11)):
        x = np.random.default_rng(b).integers(0, 16, (b, s))
        np.testing.assert_allclose(
            compiled(torch.from_numpy(x)).numpy(), _ort(model, {"ids": x})[0], rtol=1e-6
        )
    graphopt.save(compiled, tmp_path / "two_dims.graphopt")  # both dims stay dynamic when saved
    loaded = graphopt.load(tmp_path / "two_dims.graphopt")
    x = torch.randint(0, 16, (4, 3))
    np.testing.assert_array_equal(loaded(x).numpy(), compiled(x).numpy())


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
def test_axes_as_attribute_or_input_per_opset(opset: int) -> None:
    # ReduceMean/Max take axes as an attribute before opset 18 and as an input from 18 on;
    # Split takes num_outputs from 18 on; Squeeze/Unsqueeze/ReduceSum axes are inputs from 13.
    axes_in = opset >= 18
    reduce_args = (["x", "ax1"], ["m"]) if axes_in else (["x"], ["m"])
    nodes = [
        helper.make_node("ReduceMean", *reduce_args, **({} if axes_in else {"axes": [1]})),
        helper.make_node("ReduceMax", reduce_args[0], ["mx"], **({} if axes_in else {"axes": [1]})),
        helper.make_node("ReduceSum", ["x", "ax1"], ["s"], keepdims=0),
        helper.make_node("Unsqueeze", ["s", "ax1"], ["su"]),
        helper.make_node("Add", ["m", "su"], ["a"]),
        helper.make_node("Squeeze", ["a", "ax1"], ["sq"]),
        helper.make_node("Add", ["sq", "mx_sq"], ["b"]),
        helper.make_node("Squeeze", ["mx", "ax1"], ["mx_sq"]),
    ]
    nodes = nodes[:6] + [nodes[7], nodes[6]]
    if opset >= 18:
        nodes.append(helper.make_node("Split", ["b"], ["p", "q"], axis=1, num_outputs=2))
    else:
        nodes.append(helper.make_node("Split", ["b", "split"], ["p", "q"], axis=1))
    inits = [_init("ax1", np.array([1], np.int64)), _init("split", np.array([3, 3], np.int64))]
    x = helper.make_tensor_value_info("x", F32, ["N", 5, 6])
    outs = [helper.make_tensor_value_info(n, F32, None) for n in ("p", "q")]
    _check(_model(nodes, [x], outs, inits, opset=opset), _rand(3, 5, 6))


def test_old_opset_is_upgraded() -> None:
    # opset 11: Squeeze axes as an attribute, Softmax over the 2-D coerced input (axis=1)
    nodes = [
        helper.make_node("Softmax", ["x"], ["sm"], axis=1),
        helper.make_node("Unsqueeze", ["sm"], ["u"], axes=[0]),
        helper.make_node("Squeeze", ["u"], ["y"], axes=[0]),
    ]
    x = helper.make_tensor_value_info("x", F32, [2, 3, 4])
    y = helper.make_tensor_value_info("y", F32, None)
    model = _model(nodes, [x], [y], opset=11)
    gm = _check(model, _rand(2, 3, 4))
    info = gm.meta["graphopt_capture"]
    assert info["opset"] == 11 and info["imported_opset"] == 13


CONV_CASES = [
    dict(kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    dict(kernel_shape=[3, 3], pads=[0, 1, 2, 1], strides=[2, 1]),  # asymmetric
    dict(kernel_shape=[3, 3], auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(kernel_shape=[3, 3], auto_pad="SAME_LOWER", strides=[2, 2]),
    dict(kernel_shape=[3, 3], dilations=[2, 2], group=2),
]


@pytest.mark.parametrize(
    "attrs", CONV_CASES, ids=lambda a: ",".join(f"{k}={v}" for k, v in a.items())
)
def test_conv_pool_and_transposed_conv_padding_forms(attrs: dict[str, Any]) -> None:
    group = attrs.get("group", 1)
    w = _rand(4, 4 // group, 3, 3, seed=2)
    wt = _rand(4, 2, 3, 3, seed=3)
    pool_attrs = {k: v for k, v in attrs.items() if k != "group"}
    avg_attrs = {k: v for k, v in pool_attrs.items() if k != "dilations"}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], **attrs),
        helper.make_node("MaxPool", ["x"], ["mp"], **pool_attrs),
        helper.make_node("AveragePool", ["x"], ["ap"], **avg_attrs),
        helper.make_node(
            "ConvTranspose",
            ["x", "wt"],
            ["ct"],
            **{k: v for k, v in attrs.items() if k not in ("group",)},
        ),
    ]
    inits = [_init("w", w), _init("b", _rand(4, seed=4)), _init("wt", wt)]
    x = helper.make_tensor_value_info("x", F32, ["N", 4, 9, 10])
    outs = [helper.make_tensor_value_info(n, F32, None) for n in ("c", "mp", "ap", "ct")]
    _check(_model(nodes, [x], outs, inits, opset=17), _rand(2, 4, 9, 10), tol=1e-4)


@pytest.mark.parametrize(
    "attrs,c_shape",
    [({"transB": 1}, (5,)), ({"transA": 1, "alpha": 0.5, "beta": 2.0}, (3, 5)), ({}, None)],
)
def test_gemm_forms(attrs: dict[str, Any], c_shape: tuple[int, ...] | None) -> None:
    a = _rand(4, 3) if attrs.get("transA") else _rand(3, 4)
    b = _rand(5, 4, seed=1) if attrs.get("transB") else _rand(4, 5, seed=1)
    inputs = ["a", "b"] + (["c"] if c_shape else [])
    inits = [_init("b", b)] + ([_init("c", _rand(*c_shape, seed=2))] if c_shape else [])
    node = helper.make_node("Gemm", inputs, ["y"], **attrs)
    av = helper.make_tensor_value_info("a", F32, list(a.shape))
    gm = _check(
        _model([node], [av], [helper.make_tensor_value_info("y", F32, None)], inits),
        a,
        capture=True,
    )
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert ("aten.linear.default" in targets) == (attrs == {"transB": 1})  # the canonical form


def test_transformer_ops_against_onnxruntime() -> None:
    # LayerNormalization, Gelu (opset 20), Softmax, Where on a Trilu mask, Einsum, Erf, Pow,
    # Sqrt, Expand, Transpose, Slice, Tile, Pad, Clip, HardSwish, HardSigmoid, LeakyRelu
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "bt"], ["ln"], axis=-1, epsilon=1e-5),
        helper.make_node("Gelu", ["ln"], ["ge"], approximate="tanh"),
        helper.make_node("Einsum", ["ge", "ge"], ["sc"], equation="bik,bjk->bij"),
        helper.make_node("Trilu", ["ones"], ["tri"], upper=0),
        helper.make_node("Cast", ["tri"], ["mask"], to=TensorProto.BOOL),
        helper.make_node("Where", ["mask", "sc", "neg"], ["ms"]),
        helper.make_node("Softmax", ["ms"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "x"], ["att"]),
        helper.make_node("Erf", ["att"], ["er"]),
        helper.make_node("Pow", ["er", "two"], ["sq"]),
        helper.make_node("Sqrt", ["sq"], ["ab"]),
        helper.make_node("Transpose", ["ab"], ["tr"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["tr", "st", "en", "ax", "stp"], ["sl"]),
        helper.make_node("Tile", ["sl", "rep"], ["ti"]),
        helper.make_node("Pad", ["ti", "pads", "padv"], ["pd"], mode="constant"),
        helper.make_node("Clip", ["pd", "lo", "hi"], ["cl"]),
        helper.make_node("HardSwish", ["cl"], ["hs"]),
        helper.make_node("HardSigmoid", ["hs"], ["hg"], alpha=0.3, beta=0.4),
        helper.make_node("LeakyRelu", ["hg"], ["y"], alpha=0.1),
    ]
    inits = [
        _init("g", _rand(6, seed=1)), _init("bt", _rand(6, seed=2)),
        _init("ones", np.ones((5, 5), np.float32)), _init("neg", np.array(-1e9, np.float32)),
        _init("two", np.array(2.0, np.float32)),
        _init("st", np.array([1, 0], np.int64)), _init("en", np.array([2**63 - 1, -1], np.int64)),
        _init("ax", np.array([1, 2], np.int64)), _init("stp", np.array([2, 1], np.int64)),
        _init("rep", np.array([1, 2, 1], np.int64)), _init("pads", np.array([0, 1, 0, 0, 2, 1], np.int64)),
        _init("padv", np.array(0.5, np.float32)), _init("lo", np.array(-0.5, np.float32)),
        _init("hi", np.array(0.8, np.float32)),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("x", F32, ["B", 5, 6])
    _check(
        _model(nodes, [x], [helper.make_tensor_value_info("y", F32, None)], inits, opset=20),
        _rand(3, 5, 6),
    )


def test_reductions_comparisons_and_index_ops() -> None:
    nodes = [
        helper.make_node("ArgMax", ["x"], ["am"], axis=2, keepdims=0),
        helper.make_node("TopK", ["x", "k"], ["tv", "ti"], axis=-1),
        helper.make_node("CumSum", ["x", "ax2"], ["cs"], exclusive=1, reverse=1),
        helper.make_node("Greater", ["x", "zero"], ["gt"]),
        helper.make_node("Less", ["x", "zero"], ["lt"]),
        helper.make_node("Equal", ["gt", "lt"], ["eq"]),
        helper.make_node("Not", ["eq"], ["ne"]),
        helper.make_node("Cast", ["ne"], ["nef"], to=F32),
        helper.make_node("ReduceSum", ["nef", "ax2"], ["cnt"], keepdims=1),
        helper.make_node("Mul", ["cs", "cnt"], ["y"]),
    ]
    inits = [_init("k", np.array([2], np.int64)), _init("ax2", np.array([2], np.int64)),
             _init("zero", np.array(0.0, np.float32))]  # fmt: skip
    x = helper.make_tensor_value_info("x", F32, ["B", 3, 4])
    outs = [helper.make_tensor_value_info(n, t, None) for n, t in
            (("am", TensorProto.INT64), ("tv", F32), ("ti", TensorProto.INT64), ("y", F32))]  # fmt: skip
    _check(_model(nodes, [x], outs, inits, opset=17), _rand(2, 3, 4))


def _dead_and_constant_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["w", "w"], ["w2"]),  # constant subgraph: folded by cleanup
        helper.make_node("MatMul", ["x", "w2"], ["y"]),
        helper.make_node("Relu", ["x"], ["dead"]),  # no output uses it
    ]
    x = helper.make_tensor_value_info("x", F32, ["N", 4])
    return _model(
        nodes, [x], [helper.make_tensor_value_info("y", F32, None)], [_init("w", _rand(4, 3))]
    )


def test_cleanup_with_onnx_graphsurgeon_folds_and_removes_dead_nodes() -> None:
    # a declared dependency, but absent on the GPU machine; the fallback is tested below
    pytest.importorskip("onnx_graphsurgeon", reason="onnx-graphsurgeon is not installed here")
    module = load_onnx(_dead_and_constant_model())
    assert module.info["cleanup"] == "onnx-graphsurgeon"
    assert module.info["nodes"] == 1  # Add folded into the weight, Relu removed
    _check(_dead_and_constant_model(), _rand(3, 4))


def test_cleanup_fallback_without_onnx_graphsurgeon(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx_graphsurgeon", None)  # import fails, as on the GPU box
    module = load_onnx(_dead_and_constant_model())
    assert module.info["cleanup"].startswith("fallback")
    assert (
        module.info["nodes"] == 2
    )  # dead Relu removed; the constant Add is left to fold-constants
    _check(_dead_and_constant_model(), _rand(3, 4))
    compiled = graphopt.compile(_dead_and_constant_model(), pipeline="-O1")
    assert any(r.name.endswith("fold-constants") and r.rewrites for r in compiled.report.records)


def test_quantize_dequantize_and_matmul_integer() -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
        helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["dq"]),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["w"], axis=1),
        helper.make_node("MatMul", ["dq", "w"], ["y"]),
        helper.make_node("MatMulInteger", ["q", "wq", "zp", "wzp"], ["yi"]),
    ]
    wq = np.random.default_rng(0).integers(-100, 100, (4, 3)).astype(np.int8)
    inits = [
        _init("s", np.array(0.02, np.float32)), _init("zp", np.array(3, np.int8)),
        _init("wq", wq), _init("ws", np.array([0.1, 0.2, 0.05], np.float32)),
        _init("wzp", np.zeros(3, np.int8)),
    ]  # fmt: skip
    x = helper.make_tensor_value_info("x", F32, ["N", 4])
    outs = [
        helper.make_tensor_value_info("y", F32, None),
        helper.make_tensor_value_info("yi", TensorProto.INT32, None),
    ]
    _check(_model(nodes, [x], outs, inits, opset=13), _rand(5, 4))


@pytest.mark.parametrize(
    "attrs",
    [
        dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        dict(mode="linear", coordinate_transformation_mode="half_pixel"),
        dict(mode="linear", coordinate_transformation_mode="align_corners"),
        dict(mode="cubic", coordinate_transformation_mode="half_pixel"),
    ],
    ids=lambda a: a["mode"] + "-" + a["coordinate_transformation_mode"],
)
def test_resize_with_constant_scales_captures_with_dynamic_batch(attrs: dict[str, Any]) -> None:
    # scales are a float initializer: kept as Python numbers (STATIC_INPUTS), not traced data
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], **attrs)]
    inits = [_init("scales", np.array([1.0, 1.0, 2.0, 1.5], np.float32))]
    x = helper.make_tensor_value_info("x", F32, ["N", 2, 4, 6])
    model = _model(nodes, [x], [helper.make_tensor_value_info("y", F32, None)], inits, opset=19)
    gm = _check(model, _rand(2, 2, 4, 6), tol=1e-4)
    other = _rand(3, 2, 4, 6, seed=5)
    np.testing.assert_allclose(
        gm(torch.from_numpy(other)).numpy(), _ort(model, {"x": other})[0], rtol=1e-4, atol=1e-5
    )


def test_unsupported_resize_mode_is_refused_by_name() -> None:
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="linear",
                              coordinate_transformation_mode="tf_crop_and_resize")]  # fmt: skip
    inits = [_init("scales", np.array([1.0, 1.0, 2.0, 2.0], np.float32))]
    x = helper.make_tensor_value_info("x", F32, [1, 1, 2, 2])
    module = load_onnx(
        _model(nodes, [x], [helper.make_tensor_value_info("y", F32, None)], inits, opset=19)
    )
    with pytest.raises(graphopt.OnnxImportError, match="'up'.*tf_crop_and_resize"):
        module(torch.randn(1, 1, 2, 2))


def test_shape_input_is_specialized_and_guarded(tmp_path: Path) -> None:
    # Reshape(x, shape) with `shape` a graph input: torch.export cannot trace a shape that is
    # data, so the compiled model is specialized to the example's [3, 8] and checks it per call.
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Add", ["r", "r"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", F32, [4, 6])
    shape = helper.make_tensor_value_info("shape", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", F32, None)
    model = _model(nodes, [x, shape], [y])
    data, target = _rand(4, 6), np.array([3, 8], dtype=np.int64)
    args = (torch.from_numpy(data), torch.from_numpy(target))
    compiled = graphopt.compile(model, args, pipeline="-O2")
    assert compiled.report.capture["pinned_inputs"] == {1: {"name": "shape", "values": [3, 8]}}
    got = compiled(*args)
    np.testing.assert_allclose(got.numpy(), _ort(model, {"x": data, "shape": target})[0])
    with pytest.raises(
        graphopt.InputMismatchError, match=r"input 1 \('shape'\).*\[3, 8\].*\[2, 12\]"
    ):
        compiled(args[0], torch.tensor([2, 12]))
    graphopt.save(compiled, tmp_path / "pinned.graphopt")  # the guard survives save/load
    loaded = graphopt.load(tmp_path / "pinned.graphopt")
    np.testing.assert_array_equal(loaded(*args).numpy(), got.numpy())
    with pytest.raises(graphopt.InputMismatchError, match=r"compiled for \[3, 8\]"):
        loaded(args[0], torch.tensor([6, 4]))


def test_input_used_as_data_stays_data() -> None:
    # `k` is both TopK's k (read as a number: specialized) and added to the values (data); `b`
    # is only data: it is not specialized, and other values of it give other results.
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"]),
        helper.make_node("Cast", ["k"], ["kf"], to=F32),
        helper.make_node("Add", ["v", "kf"], ["w"]),
        helper.make_node("Add", ["w", "b"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", F32, [2, 6]),
        helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("b", F32, [1]),
    ]
    model = _model(nodes, inputs, [helper.make_tensor_value_info("y", F32, None)])
    x, k = _rand(2, 6), np.array([3], dtype=np.int64)
    compiled = graphopt.compile(model, tuple(torch.from_numpy(a) for a in (x, k, x[0, :1])))
    assert set(compiled.report.capture["pinned_inputs"]) == {1}
    for b in (np.array([0.5], np.float32), np.array([-2.0], np.float32)):
        feeds = {"x": x, "k": k, "b": b}
        got = compiled(*(torch.from_numpy(a) for a in feeds.values()))
        np.testing.assert_allclose(got.numpy(), _ort(model, feeds)[0], rtol=1e-6)
