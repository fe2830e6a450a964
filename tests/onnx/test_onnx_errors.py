"""Bad ONNX input gives one clear GraphoptError: what, where, what to do; never a raw protobuf or
onnx traceback as the whole message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt.frontends.onnx_import import load_onnx


def _good_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w"
    )
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 64])],
        initializer=[w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _unsupported_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Unique", ["x"], ["nz"], name="nz_a"),
        helper.make_node("Unique", ["x"], ["nz2"], name="nz_b"),
        helper.make_node("Cast", ["nz"], ["nzf"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["nz2"], ["nzf2"], to=TensorProto.FLOAT),
        helper.make_node("FusedGemm", ["x", "x"], ["fg"], name="ms_gemm", domain="com.microsoft"),
        helper.make_node("Det", ["fg"], ["det"], name="the_det"),
        helper.make_node("Relu", ["x"], ["r"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [
            helper.make_tensor_value_info(n, TensorProto.FLOAT, ["d"])
            for n in ("nzf", "nzf2", "det", "r")
        ],
    )
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )


def _assert_clear(exc: pytest.ExceptionInfo, *needles: str) -> None:
    assert isinstance(exc.value, graphopt.GraphoptError)
    text = str(exc.value)
    for needle in needles:
        assert needle in text, text
    assert "Traceback" not in text and len(text) < 1000, text
    assert exc.value.__suppress_context__ or exc.value.__cause__ is None  # raised from None


def test_unsupported_ops_are_all_listed_once_with_counts_and_names(tmp_path: Path) -> None:
    path = tmp_path / "unsupported.onnx"
    onnx.save(_unsupported_model(), str(path))
    with pytest.raises(graphopt.UnsupportedOpError) as exc:
        graphopt.capture(str(path))
    _assert_clear(exc, str(path), "3 unsupported ONNX op type(s)", "Unique x2 (nz_a, nz_b)",
                  "com.microsoft::FusedGemm x1 (ms_gemm)", "Det x1 (the_det)", "OPS[")  # fmt: skip
    assert exc.value.ops == {
        "Unique": ["nz_a", "nz_b"],
        "com.microsoft::FusedGemm": ["ms_gemm"],
        "Det": ["the_det"],
    }
    assert isinstance(exc.value, graphopt.OnnxImportError)
    with pytest.raises(graphopt.UnsupportedOpError):
        graphopt.compile(_unsupported_model())  # the same through compile and a ModelProto


def test_truncated_file(tmp_path: Path) -> None:
    data = _good_model().SerializeToString()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(graphopt.OnnxImportError) as exc:
        graphopt.compile(str(path))
    _assert_clear(exc, str(path), "truncated, corrupt or not ONNX")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(graphopt.OnnxImportError) as exc:
        load_onnx(path)
    _assert_clear(exc, str(path), "corrupt or not ONNX")


def test_text_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("this is a README, not a model\n" * 20)
    with pytest.raises(graphopt.OnnxImportError) as exc:
        graphopt.capture(path)
    _assert_clear(exc, str(path), "not ONNX")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.onnx"
    with pytest.raises(graphopt.OnnxImportError) as exc:
        graphopt.compile(str(path))
    _assert_clear(exc, str(path), "not found")


def test_model_failing_the_checker(tmp_path: Path) -> None:
    model = _good_model()
    model.graph.node[1].input[0] = "undefined_tensor"  # Relu reads a value nothing produces
    path = tmp_path / "invalid.onnx"
    onnx.save(model, str(path))
    with pytest.raises(graphopt.OnnxImportError) as exc:
        graphopt.capture(str(path))
    _assert_clear(exc, str(path), "fails onnx.checker", "undefined_tensor")


def test_unsupported_attribute_value_names_the_node() -> None:
    model = _good_model()
    model.graph.node.append(
        helper.make_node("Pad", ["y", "pads"], ["padded"], name="the_pad", mode="bogus")
    )
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(4, np.int64), "pads"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("padded", TensorProto.FLOAT, ["N", 64]))
    module = load_onnx(model, cleanup=False)  # the checker does not validate attribute values
    import torch

    with pytest.raises(graphopt.OnnxImportError) as exc:
        module(torch.randn(2, 64))
    _assert_clear(exc, "the_pad", "Pad mode 'bogus'")


def test_wrong_number_of_inputs() -> None:
    import torch

    module = load_onnx(_good_model())
    with pytest.raises(graphopt.OnnxImportError) as exc:
        module(torch.randn(2, 64), torch.randn(2, 64))
    _assert_clear(exc, "takes 1 input(s) (x), got 2")


def test_keyword_inputs_are_refused() -> None:
    import torch

    with pytest.raises(graphopt.OnnxImportError) as exc:
        graphopt.compile(_good_model(), example_kwargs={"x": torch.randn(2, 64)})
    _assert_clear(exc, "positionally, in graph order (x)", "['x']")
