"""onnxruntime: the verified graph exported to ONNX and run by an ONNX Runtime session.

    handoff.flat() --onnx_model (int8 as QDQ)--> ONNX bytes --InferenceSession--> engine

The session runs on ORT's CPU provider with every graph optimization ORT has
(``ORT_ENABLE_ALL``) and torch's intra-op thread count. Torch tensors go in and come back
without copies (:class:`SessionRun`). The dims that ``Handoff.dynamic`` names stay symbolic in
the file, so one session serves every batch size.

int8 layers arrive as QDQ node units, ``MatMul(DequantizeLinear(x8), DequantizeLinear(w8.T,
axis=1))``, which ORT's QDQ fuser runs as integer GEMMs (``MatMulIntegerToFloat``; see
docs/onnx.md). Two of ORT's fusions can make a graph slower (``OPTIONAL_FUSIONS``): its
``MatMulAddFusion`` runs before the QDQ fuser and would turn such a MatMul and its bias Add into
a float ``Gemm``, and ``SkipLayerNormalization`` measured slower than Add + LayerNormalization
here. Where the file has their patterns, the session is timed with and without them and the
faster kept (:func:`fastest_fusions`).

``Engine.payload()`` is the ONNX file itself (``model.onnx`` in the ``.graphopt`` zip), and
``load`` builds the session from it without exporting again. When ``auto`` rejects the engine,
``diagnose`` names the first ONNX node whose value diverges (:func:`first_divergence`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from graphopt.backends.base import Backend, BackendError, Engine, Handoff, register_backend
from graphopt.export.onnx import PART_OF, fx_values, onnx_model, unexportable
from graphopt.ir.state import is_stateful
from graphopt.ops.autotune import cache_key, why_not_faster
from graphopt.verification.interpreter import native_run, reference_run

MODEL_FILE = "model.onnx"  # the files of Engine.payload(), under backend/ in a .graphopt file
SESSION_FILE = "session.json"  # how the session was built: the ORT optimizers left out
CPU = ("CPUExecutionProvider",)


@register_backend
class OnnxRuntime(Backend):
    """ONNX Runtime on ``graphopt.export`` 's file of the graph (module docstring)."""

    name = "onnxruntime"
    requires = ("onnxruntime", "onnx", "onnxscript")

    def unavailable(self, target: str) -> str | None:
        if target != "cpu":
            return (
                f"graphopt runs ONNX Runtime with its CPU provider only, not for target={target!r}"
            )
        return super().unavailable(target)

    def unsupported(self, handoff: Handoff, target: str) -> str | None:
        if is_stateful(handoff.gm):
            return (
                "the graph updates state (buffers or inputs written in place), and an ONNX "
                "graph has no state"
            )
        odd = [i for i, x in enumerate(handoff.example) if not isinstance(x, torch.Tensor)]
        if odd:
            return f"inputs {odd} are not tensors; an ONNX graph takes tensors only"
        return unexportable(handoff.gm)

    def build(self, handoff: Handoff, target: str) -> Engine:
        model = export_model(handoff)
        data = model.SerializeToString()
        disabled, session = fastest_fusions(model, data, handoff)
        return make_engine(data, session, disabled, handoff)

    def load(self, handoff: Handoff, payload: dict[str, bytes], target: str) -> Engine:
        if MODEL_FILE not in payload:
            raise BackendError(f"the saved onnxruntime engine has no {MODEL_FILE}")
        data = payload[MODEL_FILE]
        disabled = json.loads(payload.get(SESSION_FILE, b"{}")).get("disabled", [])
        return make_engine(data, make_session(data, disabled), disabled, handoff)

    def diagnose(self, engine: Engine, handoff: Handoff, judge: Any) -> str | None:
        import onnx

        assert engine.payload is not None and isinstance(engine.run, SessionRun)
        model = onnx.load_from_string(engine.payload()[MODEL_FILE])
        return first_divergence(model, handoff, judge, engine.run.disabled)


def export_model(handoff: Handoff) -> Any:
    """The ONNX model (``onnx.ModelProto``) of the handoff's graph: flat inputs and outputs, the
    dims ``handoff.dynamic`` names symbolic, int8 activations as uint8 (the form ORT's x86
    integer GEMMs take; the same numbers shifted by 128)."""
    model = onnx_model(handoff.flat(), dynamic=handoff.dynamic, uint8_activations=True)
    _check_dynamic(model, handoff)
    return model


def _check_dynamic(model: Any, handoff: Handoff) -> None:
    """The exporter may specialize a dim it was asked to keep symbolic (a graph that only works
    at the traced size); such a file would fail at the next batch size, so it is refused now."""
    for i, (value, dims) in enumerate(zip(model.graph.input, handoff.dynamic)):
        shape = value.type.tensor_type.shape.dim
        fixed = [d for d in dims if d < len(shape) and not shape[d].dim_param]
        if fixed:
            raise BackendError(
                f"the ONNX export fixed dims {fixed} of input {i} ({value.name}), which the "
                "compiled model leaves dynamic"
            )


# -- the session ----------------------------------------------------------------------------------


def session_options() -> Any:
    """The SessionOptions of an engine: every graph optimization, torch's intra-op thread count,
    no spinning (idle ORT threads would otherwise spin and take the cores from whatever runs
    next: torch, or the other candidates of ``auto``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # warnings about the file's own shapes are not the user's
    return options


def _int8_matmul(model: Any) -> bool:
    dq = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return any(n.op_type == "MatMul" and set(n.input) <= dq for n in model.graph.node)


def _add_then_norm(model: Any) -> bool:
    adds = {n.output[0] for n in model.graph.node if n.op_type == "Add"}
    return any(n.op_type == "LayerNormalization" and n.input[0] in adds for n in model.graph.node)


# ORT optimizers that can make a graph slower, each with the pattern it rewrites; where the
# pattern is in the file, the session is timed with and without them and the faster kept
OPTIONAL_FUSIONS = {
    # MatMul + Add -> Gemm: runs before the QDQ fuser, so an int8 MatMul and its bias Add
    # become a float Gemm instead of MatMulIntegerToFloat
    "MatMulAddFusion": _int8_matmul,
    # Add + LayerNormalization -> SkipLayerNormalization: slower than the pair on the CPUs
    # measured (docs/backends.md)
    "SkipLayerNormFusion": _add_then_norm,
}


def optional_fusions(model: Any) -> list[str]:
    """The optional ORT fusions (``OPTIONAL_FUSIONS``) whose pattern ``model`` holds."""
    return [name for name, applies in OPTIONAL_FUSIONS.items() if applies(model)]


def make_session(data: bytes, disabled: Sequence[str] = (), providers: Sequence[str] = CPU) -> Any:
    """An InferenceSession of the ONNX model ``data`` without the optimizers ``disabled``."""
    import onnxruntime as ort

    return ort.InferenceSession(
        data, session_options(), providers=list(providers), disabled_optimizers=list(disabled)
    )


def fastest_fusions(model: Any, data: bytes, handoff: Handoff) -> tuple[list[str], Any]:
    """(optimizers to leave out, the session built that way): without the optional fusions
    ``model`` has a pattern for where that measures faster on the example inputs (the one
    "keep only what measures faster" policy, cached per graph and input shapes), else with
    all of them."""
    optional = optional_fusions(model)
    sessions: dict[tuple[str, ...], Any] = {}

    def run(disabled: tuple[str, ...]) -> Any:
        if disabled not in sessions:
            sessions[disabled] = SessionRun(make_session(data, disabled), _input_names(handoff))
        return sessions[disabled](*handoff.example)

    if not optional:
        return [], _built(sessions, (), data)
    import onnxruntime as ort

    structure = [(n.op_type, tuple(n.input)) for n in model.graph.node]
    key = cache_key(
        "onnxruntime-fusions",
        structure,
        *handoff.example,
        off="+".join(optional),
        ort=ort.__version__,
        threads=torch.get_num_threads(),
    )
    off = tuple(optional)
    why = why_not_faster(
        key,
        lambda: run(()),
        lambda: run(off),
        "cpu",
        names=("all fusions", f"without {'+'.join(off)}"),
        reps=3,
    )
    chosen = () if why else off
    return list(chosen), _built(sessions, chosen, data)


def _built(sessions: dict[tuple[str, ...], Any], disabled: tuple[str, ...], data: bytes) -> Any:
    run = sessions.get(disabled)
    return run.session if run is not None else make_session(data, disabled)


def _input_names(handoff: Handoff) -> list[str]:
    """The ONNX input name of each flat input: its placeholder's, which torch.onnx keeps."""
    return [str(p.name) for p in handoff.flat().graph.find_nodes(op="placeholder")]


def make_engine(data: bytes, session: Any, disabled: list[str], handoff: Handoff) -> Engine:
    """The engine of the ONNX model ``data`` on ``session`` (built without ``disabled``)."""
    payload = {MODEL_FILE: data, SESSION_FILE: json.dumps({"disabled": disabled}).encode()}
    without = f", without {', '.join(disabled)}" if disabled else ""
    return Engine(
        OnnxRuntime.name,
        SessionRun(session, _input_names(handoff), disabled),
        payload=lambda: payload,
        detail=f"CPU provider, {torch.get_num_threads()} threads{without}",
    )


@dataclass
class SessionRun:
    """``run(*flat_inputs) -> flat outputs`` on a CPU session, torch tensors in and out, with
    no copies: ``session.run`` gets numpy views of the (contiguous) torch inputs, which ORT
    reads where they lie, and returns numpy arrays over the memory ORT wrote, which
    ``torch.from_numpy`` wraps. Measured on the zoo models, this is faster than I/O binding
    (docs/backends.md), which costs a Python call per input and output and saves no copy here."""

    session: Any
    input_names: list[str]
    disabled: list[str] = field(default_factory=list)  # ORT optimizers it was built without

    def __post_init__(self) -> None:
        onnx_inputs = {i.name for i in self.session.get_inputs()}
        # an input the graph never reads may be dropped from the file: it is not fed
        self.fed = [(i, n) for i, n in enumerate(self.input_names) if n in onnx_inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        feeds = {name: inputs[i].detach().contiguous().numpy() for i, name in self.fed}
        return [torch.from_numpy(y) for y in self.session.run(self.output_names, feeds)]


# -- diagnosis: the first ONNX node that diverges -------------------------------------------------


def first_divergence(model: Any, handoff: Handoff, judge: Any, disabled: Sequence[str] = ()) -> str:
    """Where the ONNX model first departs from the graph it was exported from, as Polygraphy
    finds it: every ONNX value that stands for an FX node (``graphopt.value``) becomes an extra
    output of a diagnostic session; each, in topological order, is judged against the float64
    value of its FX node with ``judge(value, aten value, float64 value) -> (ok, why)``. The
    first that breaks it is named, with whether its own computation is wrong (**local**: the
    ONNX nodes of that FX node, fed the float64 values of their inputs, still break it) or its
    inputs already were (**inherited**; then the first local one is named too)."""
    values = fx_values(model)
    graph = handoff.flat()
    ref = reference_run(graph, handoff.example)[1]
    aten = native_run(graph, handoff.example, record=True)[1]
    inputs = _feeds(model, handoff)
    groups = _groups(model)
    watched = [v for v in values if isinstance(ref.get(values[v]), torch.Tensor)]
    needed = {e for fx in {values[v] for v in watched} for e in _outer_inputs(model, groups[fx])}
    got = _run_exposing(model, sorted(set(watched) | needed), inputs, disabled)
    first: str | None = None
    for name in watched:
        fx = values[name]
        value, want, before = _signed(got.get(name), ref[fx]), ref[fx], aten.get(fx)
        if value is None or value.shape != want.shape:
            continue
        ok, why = judge(value, before, want)
        if ok:
            continue
        local = _local_value(model, groups[fx], name, values, ref, got, inputs, disabled)
        if local is None:  # an input of its nodes was not at hand
            first = first or _describe(model, name, fx, graph, "an", why)
            continue
        local_ok, local_why = judge(local, before, want)
        if not local_ok:
            line = _describe(model, name, fx, graph, "local", local_why)
            return line if first is None else f"{first}; first with local error: {line}"
        first = first or _describe(model, name, fx, graph, "inherited", why)
    if first is not None:
        return first
    return (
        "no ONNX value diverges in a diagnostic session (each FX node's value exposed as an "
        "output, which keeps ONNX Runtime from fusing across them): the error comes from a "
        f"fusion ORT makes ({', '.join(_fusions(model, disabled)) or 'none found'})"
    )


def _describe(model: Any, value: str, fx: str, graph: Any, kind: str, why: str) -> str:
    node = next(n for n in model.graph.node if value in n.output)
    target = next((str(n.target) for n in graph.graph.nodes if n.name == fx), "?")
    return (
        f"first diverging ONNX node {node.name!r} ({node.op_type}, the value of %{fx}, "
        f"{target}): {kind} error: {why}"
    )


def _groups(model: Any) -> dict[str, list[Any]]:
    """FX node -> the ONNX nodes that compute it (``graphopt.node``), in order."""
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == PART_OF:
                groups.setdefault(prop.value, []).append(node)
    return groups


def _outer_inputs(model: Any, nodes: list[Any]) -> list[str]:
    """Values a group of nodes reads from outside it, initializers and constants left out."""
    made = {o for n in nodes for o in n.output}
    fixed = {i.name for i in model.graph.initializer}
    fixed |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    return [i for n in nodes for i in n.input if i and i not in made and i not in fixed]


def _feeds(model: Any, handoff: Handoff) -> dict[str, Any]:
    names = {
        str(p.name): i for i, p in enumerate(handoff.flat().graph.find_nodes(op="placeholder"))
    }
    return {
        v.name: handoff.example[names[v.name]].detach().cpu().contiguous().numpy()
        for v in model.graph.input
    }


def _run_exposing(
    model: Any, names: Sequence[str], feeds: dict[str, Any], disabled: Sequence[str]
) -> dict[str, torch.Tensor]:
    """The values ``names`` of one run of ``model``, each exposed as an extra graph output."""
    import onnx

    typed = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type for v in [*typed.graph.value_info, *typed.graph.output]}
    diag = onnx.ModelProto()
    diag.CopyFrom(model)
    present = {o.name for o in diag.graph.output}
    for name in names:
        if name not in present and name in types:
            diag.graph.output.append(onnx.helper.make_value_info(name, types[name]))
    session = make_session(diag.SerializeToString(), disabled)
    outs = [o.name for o in session.get_outputs()]
    return {n: torch.from_numpy(v) for n, v in zip(outs, session.run(outs, feeds))}


def _local_value(
    model: Any,
    nodes: list[Any],
    output: str,
    values: dict[str, str],
    ref: dict[str, Any],
    got: dict[str, torch.Tensor],
    feeds: dict[str, Any],
    disabled: Sequence[str],
) -> torch.Tensor | None:
    """``output`` of the ONNX nodes of one FX node run alone, on the float64 values of their
    inputs (in the dtype the file has there) where those are known, else on what the
    diagnostic run gave them."""
    import onnx

    outer = list(dict.fromkeys(_outer_inputs(model, nodes)))
    inputs: dict[str, Any] = {}
    for name in outer:
        if name in feeds:
            inputs[name] = feeds[name]
            continue
        seen = got.get(name)
        if seen is None:
            return None
        want = ref.get(values.get(name, ""))
        if isinstance(want, torch.Tensor) and want.shape == seen.shape:
            seen = _unsigned(want, seen.dtype)
        inputs[name] = seen.contiguous().numpy()
    used = {i for n in nodes for i in n.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    consts = [n for n in model.graph.node if n.op_type == "Constant" and n.output[0] in used]
    graph = onnx.helper.make_graph(
        [*consts, *nodes],
        "local",
        [onnx.helper.make_tensor_value_info(n, _elem_type(inputs[n]), None) for n in outer],
        [onnx.helper.make_empty_tensor_value_info(output)],
        inits,
    )
    sub = onnx.helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    session = make_session(sub.SerializeToString(), disabled)
    return torch.from_numpy(session.run([output], inputs)[0])


def _signed(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """An ONNX value in its FX node's terms: a uint8 activation (zero point 128) as the int8 one
    graphopt computes."""
    if value is not None and value.dtype == torch.uint8 and like.dtype == torch.int8:
        return (value.to(torch.int16) - 128).to(torch.int8)
    return value


def _unsigned(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A reference value in the dtype the ONNX file has there (int8 shifted into uint8)."""
    if value.dtype == torch.int8 and dtype == torch.uint8:
        return (value.to(torch.int16) + 128).to(torch.uint8)
    return value.to(dtype)


def _elem_type(array: Any) -> int:
    import onnx

    return int(onnx.helper.np_dtype_to_tensor_dtype(array.dtype))


def _fusions(model: Any, disabled: Sequence[str]) -> list[str]:
    """Op types ORT's optimized form of ``model`` has and the file does not (its fusions)."""
    import onnx
    import onnxruntime as ort

    options = session_options()
    with tempfile.TemporaryDirectory() as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(
            model.SerializeToString(),
            options,
            providers=list(CPU),
            disabled_optimizers=list(disabled),
        )
        optimized = onnx.load(options.optimized_model_filepath)
    before = {n.op_type for n in model.graph.node}
    return sorted({n.op_type for n in optimized.graph.node} - before)
