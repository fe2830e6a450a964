"""The inductor backend: every zoo model within its contract, dynamic batch, int8 as oneDNN int8
kernels, graphopt ops traced through on the CPU, save/load without compiling, and the CUDA
path's triton_op registration (the CUDA compile itself needs a GPU: tests/core/test_gpu.py).

Compiling is slow (each AOTInductor build compiles C++), so each model is compiled once per
module and the tests share it.
"""

from __future__ import annotations

import io
import zipfile
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.backends import inductor, lowering
from graphopt.backends.base import BackendError, Handoff
from graphopt.ops.registry import GRAPHOPT_OPS, IMPLS, triton_twin
from graphopt.verification import metrics

aten = torch.ops.aten
go = torch.ops.graphopt
# -O2 with every fusion applied, measured faster or not: the graphs hold every kind of graphopt
# op the fusions make (which -O2 keeps depends on timings), and int8 every layer the plan allows
FUSE_ALL = (
    "cleanup,fold-bn,patterns,cleanup,fuse-epilogue{measure=false},fuse-kernels{measure=false},"
    "fuse-pointwise{measure=false},cleanup"
)
INT8 = FUSE_ALL + ",int8{measure=false}"
# the call the generated C++ makes for an op Inductor could not compile (an opaque op)
OPAQUE = "aoti_torch_proxy_executor_call_function"


def _compile(name: str, pipeline: str = FUSE_ALL) -> graphopt.CompiledModule:
    model, inputs = zoo.get(name)
    return graphopt.compile(model, inputs, pipeline=pipeline, backend="inductor", on_fail="raise")


def _generated_code(compiled: Any) -> str:
    """The C++ Inductor generated for the compiled model (from its AOTInductor package)."""
    package = zipfile.ZipFile(io.BytesIO(compiled.engine.payload()[inductor.PACKAGE]))
    return "\n".join(package.read(n).decode() for n in package.namelist() if n.endswith(".cpp"))


def _graphopt_calls(gm: torch.fx.GraphModule) -> list[str]:
    ops = set(GRAPHOPT_OPS.values())
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and n.target in ops]


@pytest.fixture(scope="module")
def zoo_models() -> dict[str, graphopt.CompiledModule]:
    return {name: _compile(name) for name in zoo.ZOO}


@pytest.fixture(scope="module")
def int8_cnn() -> graphopt.CompiledModule:
    """MobileNet in static int8: 1x1 convolutions and the linear head."""
    return _compile("mobilenet", INT8)


def _close_to_eager(compiled: Any, name: str, batch: int) -> None:
    model, inputs = zoo.get(name, batch=batch)
    with torch.no_grad():
        want = pytree.tree_leaves(model(*inputs))
    got = pytree.tree_leaves(compiled(*inputs))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert metrics.rel_max(g, w.double()) < 1e-4, f"{name} batch {batch}"


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_runs_on_inductor_within_its_contract(zoo_models: Any, name: str) -> None:
    compiled = zoo_models[name]
    # on_fail="raise": the engine's outputs were judged against the float64 reference
    assert compiled.backend == "inductor"
    rows = {row.backend: row for row in compiled.report.backends}
    assert rows["inductor"].status == "kept", rows["inductor"].why
    assert rows["inductor"].error <= max(2 * rows["aten"].error, 1e-5)
    _close_to_eager(compiled, name, batch=4)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_dynamic_batch_on_inductor(zoo_models: Any, name: str) -> None:
    for batch in (1, 3):  # one compile serves them (AOTInductor has no recompiles)
        _close_to_eager(zoo_models[name], name, batch)


def test_graphopt_ops_are_traced_through_on_the_cpu(zoo_models: Any) -> None:
    """The optimized graphs hold graphopt ops; what Inductor compiles has none, and its
    generated code calls no opaque op."""
    for name, compiled in zoo_models.items():
        assert _graphopt_calls(compiled.gm), f"{name}: no graphopt op to lower"
        prepared = lowering.prepare(compiled.gm, "cpu").gm
        assert _graphopt_calls(prepared) == [], name
        code = _generated_code(compiled)
        assert OPAQUE not in code and "graphopt::" not in code, name
    # graphopt.linear's epilogue reaches oneDNN as a fused post-op (BERT: the GELU)
    assert "_linear_pointwise" in _generated_code(zoo_models["bert"])


def test_lowered_graph_computes_what_the_graph_does() -> None:
    """The lowering rules alone (no Inductor): the prepared graph, run eagerly, gives the
    outputs of the verified graph, for float, static / dynamic int8 and weight-only int8."""
    cases = [
        ("resnet", FUSE_ALL),
        ("bert", FUSE_ALL),
        ("mobilenet", INT8),
        ("mlp", INT8),
        ("mlp", FUSE_ALL + ",int8{measure=false,act=dynamic}"),
        ("mlp", FUSE_ALL + ",int8{measure=false,mode=w8a16}"),
    ]
    for name, pipeline in cases:
        model, inputs = zoo.get(name)
        compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
        flat = pytree.tree_leaves(inputs)
        handoff = Handoff.of(compiled.gm, flat, compiled.signature)
        prepared = lowering.prepare(handoff.flat(), "cpu")
        assert prepared.lowered, f"{name} {pipeline}: nothing lowered"
        want = handoff.flat()(*flat)
        got = prepared.gm(*flat)
        for g, w in zip(got, want, strict=True):
            # int8: a value on a rounding tie may land one step away; nothing more
            assert metrics.cosine(g, w) > 0.9999 and metrics.rel_max(g, w) < 2e-2, (
                f"{name} {pipeline}: {metrics.rel_max(g, w):.3g}"
            )


def test_int8_runs_as_onednn_int8_kernels(int8_cnn: Any) -> None:
    code = _generated_code(int8_cnn)
    assert "qconv_pointwise" in code, "the 1x1 convolutions are not oneDNN int8"
    assert "qlinear_pointwise" in code, "the linear head is not oneDNN int8"
    assert "_int_mm" not in code  # no int8 layer left to the reference GEMM
    assert "int8 as QDQ" in int8_cnn.engine.detail


def test_dynamic_int8_runs_as_onednn_int8_kernels() -> None:
    """Per-token activation scales: oneDNN's int8 GEMM at unit scale, the token's scale after."""
    compiled = _compile("mlp", FUSE_ALL + ",int8{measure=false,act=dynamic}")
    assert "int8 dynamic as QDQ" in compiled.engine.detail
    code = _generated_code(compiled)
    assert code.count("qlinear_pointwise") >= 3 and "_int_mm" not in code
    model, inputs = zoo.get("mlp", batch=5)
    with torch.no_grad():
        assert metrics.cosine(compiled(*inputs), model(*inputs)) >= 0.99


def test_int8_under_inductor_stays_within_budget(int8_cnn: Any) -> None:
    rows = {row.backend: row for row in int8_cnn.report.backends}
    assert rows["inductor"].status == "kept", rows["inductor"].why  # judged by select.py
    model, inputs = zoo.get("mobilenet", batch=3)
    with torch.no_grad():
        want = model(*inputs)
    assert metrics.cosine(int8_cnn(*inputs), want) >= 0.99


def test_save_and_load_do_not_recompile(
    zoo_models: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = zoo_models["bert"]
    path = tmp_path / "bert.graphopt"
    graphopt.save(compiled, path)

    def no_compiling(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("load compiled the model again")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    monkeypatch.setattr(torch, "compile", no_compiling)
    monkeypatch.setattr(inductor, "compile_package", no_compiling)
    loaded = graphopt.load(path)
    assert loaded.backend == "inductor"
    for batch in (4, 2):
        _, inputs = zoo.get("bert", batch=batch)
        for got, want in zip(
            pytree.tree_leaves(loaded(*inputs)), pytree.tree_leaves(compiled(*inputs))
        ):
            assert torch.equal(got, want)  # the very code that was verified


def test_no_cpp_compiler_makes_inductor_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("no-such-c++",))
    why = inductor.Inductor().unavailable("cpu")
    assert why is not None and "no C++ compiler" in why
    model, inputs = zoo.get("mlp")
    with pytest.raises(BackendError, match="inductor.*unavailable.*no C\\+\\+ compiler"):
        graphopt.compile(model, inputs, pipeline="-O0", backend="inductor")


def test_inputs_that_are_not_tensors_are_unsupported(zoo_models: Any) -> None:
    compiled = zoo_models["mlp"]
    _, (x,) = zoo.get("mlp")
    handoff = Handoff.of(compiled.gm, [x], compiled.signature)
    assert inductor.Inductor().unsupported(handoff, "cpu") is None
    handoff.example.append(3)
    assert "not tensors (int)" in (inductor.Inductor().unsupported(handoff, "cpu") or "")


# -- CUDA: graphopt's Triton kernels as triton_ops -------------------------------------------------


def test_every_triton_kernel_has_a_triton_op_twin() -> None:
    for name, impl in IMPLS.items():
        if impl.kernel is None:
            continue
        twin = triton_twin(name)
        schema = str(twin._schema).replace("graphopt_triton::", "graphopt::")
        assert schema == str(GRAPHOPT_OPS[name]._schema)


def test_triton_twin_runs_the_kernel() -> None:
    """Eager on the CPU (Triton's interpreter, set up by tests/conftest.py), an odd shape."""
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((37, 45), (45,), (45,)))
    got = triton_twin("norm")(x, w, b, 1e-5, "layer")
    torch.testing.assert_close(got, IMPLS["norm"].reference(x, w, b, 1e-5, "layer"))


def _norm_graph() -> tuple[torch.fx.GraphModule, list[torch.Tensor]]:
    """A flat graph holding one graphopt.norm, with its metadata."""
    from graphopt.frontends.capture import capture, signature_for

    class Norm(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return go.norm(x * 2, None, None, 1e-5, "rms") + 1

    x = torch.randn(4, 45)
    gm = capture(Norm(), (x,))
    handoff = Handoff.of(gm, [x], signature_for((x,), {}, gm.meta["graphopt_capture"]))
    return handoff.flat(), [x]


def test_cuda_lowering_uses_the_triton_op_and_cpu_lowering_never_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    flat, inputs = _norm_graph()
    twin = triton_twin("norm")
    # graphopt's kernels launch without torch.library.wrap_triton today: Inductor could not
    # trace into the triton_op, so the CUDA lowering keeps the ATen forms
    fakes = [n.meta["val"] for n in flat.graph.nodes if n.op == "placeholder"]
    assert not lowering.kernel_traces(IMPLS["norm"].kernel, (fakes[0], None, None, 1e-5, "rms"))
    assert twin not in [n.target for n in lowering.prepare(flat, "cuda").gm.graph.nodes]
    # a kernel that traces becomes its triton_op on CUDA, never on the CPU
    monkeypatch.setattr(lowering, "kernel_traces", lambda kernel, args: True)
    cpu = lowering.prepare(flat, "cpu").gm
    cuda = lowering.prepare(flat, "cuda").gm
    assert twin not in [n.target for n in cpu.graph.nodes]
    assert [n.target for n in cuda.graph.nodes].count(twin) == 1
    # both compute the graph's function (the twin: Triton's interpreter here)
    want = flat(*inputs)[0]
    torch.testing.assert_close(cpu(*inputs)[0], want)
    torch.testing.assert_close(cuda(*inputs)[0], want)
