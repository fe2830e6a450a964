"""Import an ONNX model into the graphopt IR (see docs/onnx.md, "Import").

load -> check -> upgrade (opset < 13) -> clean (onnx-graphsurgeon, or a fallback) -> ``OnnxModule``
(an eager ``nn.Module`` that evaluates the ONNX graph with torch ops through ``onnx_ops.OPS``;
initializers are its parameters and buffers) -> ``torch.export`` with every symbolic ONNX input dim
dynamic -> the same FX GraphModule of ATen ops a torch capture gives.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.errors import OnnxImportError, UnsupportedOpError, first_line
from graphopt.frontends.exported import StaticShapeWarning, as_args, export_program, graph_of
from graphopt.frontends.onnx_ops import (
    DTYPES,
    OPS,
    SHAPE_VAL_MAX,
    STATIC_INPUTS,
    OnnxNode,
    ShapeVal,
    T,
    recording_value_reads,
)
from graphopt.frontends.signature import InputSignature, TensorSpec

if TYPE_CHECKING:
    import onnx

MIN_OPSET = 13  # older models are upgraded to this with onnx.version_converter
SOURCE_TYPES = (str, os.PathLike)


def is_onnx_source(model: Any) -> bool:
    """True for what ``load_onnx`` takes: a path (str/PathLike) or an ``onnx.ModelProto``."""
    if isinstance(model, SOURCE_TYPES):
        return True
    return type(model).__name__ == "ModelProto" and hasattr(model, "graph")


@dataclass(frozen=True)
class InputInfo:
    """A graph input: name, torch dtype and dims (int, or the dim_param name / None if unknown)."""

    name: str
    dtype: torch.dtype
    dims: tuple[int | str | None, ...]


# -- loading and cleanup -------------------------------------------------------------------------


def _read(source: Any) -> tuple[onnx.ModelProto, str]:
    import onnx

    if not isinstance(source, SOURCE_TYPES):
        return source, "<onnx.ModelProto>"
    path = Path(source)
    where = str(path)
    if not path.is_file():
        raise OnnxImportError(f"ONNX file {where} not found; pass the path of a .onnx file")
    try:
        model = onnx.load(where)
    except Exception as exc:
        raise OnnxImportError(
            f"{where} is not a readable ONNX model ({type(exc).__name__}: {first_line(exc)}); "
            "the file is truncated, corrupt or not ONNX: re-export or re-download it"
        ) from None
    return model, where


def _check(model: onnx.ModelProto, where: str) -> None:
    import onnx

    if model.ir_version == 0 or not model.HasField("graph"):
        raise OnnxImportError(
            f"{where} parses but is not an ONNX model (no ir_version or graph); the file is "
            "corrupt or not ONNX: re-export or re-download it"
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise OnnxImportError(
            f"{where} fails onnx.checker: {first_line(exc).rstrip('.')}. Fix the model (re-export it with "
            "a current exporter) or repair it with onnx-graphsurgeon"
        ) from None


def opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return MIN_OPSET


def _upgrade(model: onnx.ModelProto, where: str) -> onnx.ModelProto:
    from onnx import version_converter

    if opset_of(model) >= MIN_OPSET:
        return model
    try:
        return version_converter.convert_version(model, MIN_OPSET)
    except Exception as exc:
        raise OnnxImportError(
            f"{where}: opset {opset_of(model)} could not be upgraded to {MIN_OPSET} "
            f"({type(exc).__name__}: {first_line(exc)}); re-export the model at opset "
            f">= {MIN_OPSET}"
        ) from None


def _clean(model: onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    """Fold constants, drop dead nodes and sort, with onnx-graphsurgeon when it is installed."""
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        return _clean_fallback(model), "fallback (onnx-graphsurgeon not installed)"
    from onnx_graphsurgeon.logger import G_LOGGER

    try:
        level = G_LOGGER.severity
        G_LOGGER.severity = G_LOGGER.ERROR  # its per-node folding notes are not the user's concern
        try:
            graph = gs.import_onnx(model)
            graph.fold_constants(error_ok=True).cleanup().toposort()
            cleaned = gs.export_onnx(graph)
        finally:
            G_LOGGER.severity = level
    except Exception as exc:  # a model graphsurgeon cannot handle still imports without it
        return _clean_fallback(model), f"fallback (onnx-graphsurgeon failed: {first_line(exc)})"
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    return cleaned, "onnx-graphsurgeon"


def _clean_fallback(model: onnx.ModelProto) -> onnx.ModelProto:
    """Dead-node removal and a topological sort (no constant folding: graphopt's fold-constants
    pass folds weight-only subgraphs after capture)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    needed = {o.name for o in graph.output}
    live = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(i for i in node.input if i)
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    ordered, pending = [], list(reversed(live))
    while pending:  # Kahn's sort, stable in the file's order
        ready = [n for n in pending if all((not i) or i in produced for i in n.input)]
        if not ready:
            ordered += pending  # a cycle or a missing input: let the converter report it
            break
        for n in ready:
            ordered.append(n)
            produced.update(n.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def fuse_linear(model: onnx.ModelProto) -> int:
    """MatMul(x, W) [+ b] -> graphopt::Linear(x, W^T, b) in place, where W is a 2-D float
    initializer used only there and b a 1-D initializer: the exporters write a torch Linear that
    way, and graphopt's passes (fold-bn, epilogues, int8, pruning) look for ``aten.linear``.
    Returns the number of MatMuls rewritten."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    uses: dict[str, list[Any]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            uses[name].append(node)
    for out in graph.output:
        uses[out.name].append(None)
    fused, drop = 0, set()
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        w = inits.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in (1, 10, 11, 16):
            continue
        if len(uses[w.name]) != 1:
            continue
        bias, consumer = "", uses[node.output[0]]
        if len(consumer) == 1 and consumer[0] is not None and consumer[0].op_type == "Add":
            add = consumer[0]
            other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
            b = inits.get(other)
            if b is not None and list(b.dims) == [w.dims[1]] and b.data_type == w.data_type:
                bias = other
                node.output[0] = add.output[0]
                drop.add(id(add))
        array = numpy_helper.to_array(w).T.copy()
        w.CopyFrom(numpy_helper.from_array(array, w.name))
        node.op_type, node.domain = "Linear", "graphopt"
        node.input.append(bias)
        fused += 1
    if drop:
        kept = [n for n in graph.node if id(n) not in drop]
        del graph.node[:]
        graph.node.extend(kept)
    return fused


def check_supported(model: onnx.ModelProto, where: str) -> None:
    """Raise one UnsupportedOpError listing every unsupported op type, its count and node names."""
    missing: dict[str, list[str]] = collections.defaultdict(list)
    for i, node in enumerate(model.graph.node):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if key not in OPS:
            missing[key].append(node.name or f"#{i}")
    if missing:
        raise UnsupportedOpError(missing, where)


# -- the eager module ----------------------------------------------------------------------------


def _to_torch(proto: Any) -> torch.Tensor:
    from onnx import numpy_helper

    if proto.data_type == 16:  # bfloat16: numpy has no such type; reinterpret the raw bits
        raw = numpy_helper.to_array(proto).view("uint16").astype("int16")
        return torch.from_numpy(raw.copy()).view(torch.bfloat16)
    if proto.data_type not in DTYPES:
        raise OnnxImportError(
            f"initializer {proto.name!r} has ONNX data type {proto.data_type}, which graphopt "
            "does not import (string, complex and 4/8-bit float types); convert it first"
        )
    return torch.from_numpy(numpy_helper.to_array(proto).copy())


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper

    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif hasattr(v, "data_type") and hasattr(v, "dims"):
            v = _to_torch(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


def _constant_value(node: Any, attrs: dict[str, Any]) -> torch.Tensor:
    if "value" in attrs:
        return attrs["value"]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):  # fmt: skip
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    raise OnnxImportError(
        f"Constant node {node.name!r}: only tensor, float(s) and int(s) values are supported"
    )


def _is_shape_like(t: torch.Tensor) -> bool:
    """Small integer constants (shapes, axes, indices) and scalar constants of any type (pad
    values, bounds, eps) are kept as Python values: ops that need numbers read them without
    touching a traced tensor; ops that need tensors make constants of them."""
    if t.dim() > 1 or t.dtype in (torch.bfloat16, torch.float16):
        return False
    small_int = t.dtype in (torch.int64, torch.int32) and t.numel() <= SHAPE_VAL_MAX
    return small_int or t.numel() == 1


def _attr_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dim() <= 1 and v.numel() <= SHAPE_VAL_MAX:
        return ShapeVal(v.reshape(-1).tolist(), v.dim() == 0, v.dtype)
    return v


@dataclass
class _Op:
    node: OnnxNode
    outputs: list[str]


class OnnxModule(torch.nn.Module):
    """An ONNX graph as an eager module: ``forward(*inputs)`` evaluates it with torch ops.

    Inputs are the ONNX graph inputs in order (initializers excluded); the result is one tensor,
    or a tuple in the ONNX output order. ``example_inputs()`` synthesizes inputs from the ONNX
    input types; ``dynamic_shapes(args)`` marks every symbolic dim as dynamic for torch.export.
    """

    def __init__(self, model: onnx.ModelProto, info: dict[str, Any]) -> None:
        super().__init__()
        self.info = info
        self.opset = opset_of(model)
        graph = model.graph
        self._attr_of: dict[str, str] = {}
        self._static: dict[str, ShapeVal] = {}
        self._static_attr: dict[str, str] = {}
        static = {
            node.input[i]
            for node in graph.node
            for i in STATIC_INPUTS.get(node.op_type, ())
            if i < len(node.input)
        }
        for init in graph.initializer:
            self._add_constant(init.name, _to_torch(init), init.name in static)
        init_names = {i.name for i in graph.initializer}
        self.inputs = tuple(_input_info(i) for i in graph.input if i.name not in init_names)
        self.output_names = tuple(o.name for o in graph.output)
        self._ops: list[_Op] = []
        self._pinned: dict[int, ShapeVal] = {}  # input index -> its compile-time value
        for i, node in enumerate(graph.node):
            attrs = _attrs(node)
            if node.op_type == "Constant":
                value = _constant_value(node, attrs)
                self._add_constant(node.output[0], value, node.output[0] in static)
                continue
            # tensor attributes (ConstantOfShape's value) as Python values: torch.export would
            # trace reading a number out of a tensor as a data-dependent .item()
            attrs = {k: _attr_value(v) for k, v in attrs.items()}
            key = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            )
            onnx_node = OnnxNode(key, node.name or f"{key}_{i}", list(node.input), attrs,
                                 self.opset, len(node.output))  # fmt: skip
            self._ops.append(_Op(onnx_node, list(node.output)))

    def _add_constant(self, name: str, value: torch.Tensor, static: bool = False) -> None:
        shape_like = _is_shape_like(value) or (static and value.dim() <= 1)
        attr = re.sub(r"\W", "_", name) or "const"
        attr = attr if not attr[0].isdigit() else f"c_{attr}"
        base, k = attr, 1
        while hasattr(self, attr):
            attr, k = f"{base}_{k}", k + 1
        if shape_like:  # read as Python values (see onnx_ops.ShapeVal); the buffer backs T()
            self._static[name] = ShapeVal(value.reshape(-1).tolist(), value.dim() == 0, value.dtype)
            self.register_buffer(attr, value)
            self._static_attr[name] = attr
            return
        if value.is_floating_point() and value.dim() >= 1:
            self.register_parameter(attr, torch.nn.Parameter(value, requires_grad=False))
        else:
            self.register_buffer(attr, value)
        self._attr_of[name] = attr

    def forward(self, *args: Any) -> Any:
        env = self._run(args)
        results = tuple(T(env[name]) for name in self.output_names)
        return results[0] if len(results) == 1 else results

    def _run(self, args: tuple[Any, ...]) -> dict[str, Any]:
        """Every value of the graph, by ONNX name, on ``args``."""
        if len(args) != len(self.inputs):
            raise OnnxImportError(
                f"the ONNX model takes {len(self.inputs)} input(s) "
                f"({', '.join(i.name for i in self.inputs)}), got {len(args)}"
            )
        env: dict[str, Any] = {
            name: dataclasses.replace(v, const=getattr(self, self._static_attr[name]))
            for name, v in self._static.items()
        }
        env.update({name: getattr(self, attr) for name, attr in self._attr_of.items()})
        env.update({i.name: a for i, a in zip(self.inputs, args)})
        for index, value in self._pinned.items():  # numbers as compiled, the tensor as passed
            env[self.inputs[index].name] = dataclasses.replace(value, const=args[index])
        for op in self._ops:
            n = op.node
            call = OnnxNode(n.op, n.name, [env[x] if x else None for x in n.inputs], n.attrs,
                            n.opset, n.n_outputs)  # fmt: skip
            out = OPS[n.op](call)
            outs = out if isinstance(out, tuple) else (out,)
            for name, value in zip(op.outputs, outs):
                if name:
                    env[name] = value
        return env

    def inputs_read_as_numbers(self, args: tuple[Any, ...]) -> dict[int, ShapeVal]:
        """The inputs whose numbers an op reads on ``args`` (a Reshape's shape, a TopK's k),
        directly or through shape arithmetic (``Max(Shape(x), shape)`` into a Pad's pads), as
        the ShapeVals to specialize them to. Through other values, only inputs of at most
        SHAPE_VAL_MAX elements and rank <= 1 count: ``x`` in ``Shape(x)`` stays data."""
        with recording_value_reads() as read:
            env = self._run(args)
        read_names = [k for k, v in env.items() if isinstance(v, torch.Tensor) and id(v) in read]
        index = {info.name: i for i, info in enumerate(self.inputs)}
        deps: dict[str, set[int]] = {name: {i} for name, i in index.items()}
        for op in self._ops:
            d = set().union(*(deps.get(x, set()) for x in op.node.inputs if x))
            for out in op.outputs:
                deps[out] = d
        pinned: set[int] = set()
        for name in read_names:
            if name in index:
                pinned.add(index[name])
                continue
            pinned |= {
                i
                for i in deps.get(name, ())
                if args[i].dim() <= 1 and args[i].numel() <= SHAPE_VAL_MAX
            }
        return {
            i: ShapeVal(args[i].reshape(-1).tolist(), args[i].dim() == 0, args[i].dtype)
            for i in sorted(pinned)
            if isinstance(args[i], torch.Tensor)
        }

    @contextlib.contextmanager
    def pinned(self, values: dict[int, ShapeVal]) -> Iterator[None]:
        """Within the block, ops that read inputs ``values`` as numbers (a Reshape's shape, a
        TopK's k) get these Python values, so torch.export sees constants, not data."""
        before, self._pinned = self._pinned, dict(values)
        try:
            yield
        finally:
            self._pinned = before

    def example_inputs(self, seed: int = 0, batch: int | None = None) -> tuple[torch.Tensor, ...]:
        """Seeded inputs from the ONNX input types: symbolic dims get small sizes (dim 0:
        ``batch`` or 2, other dims: 8), floats are standard normal, integers are in [0, 16)
        (valid token ids for any vocabulary of 16 or more), bools random."""
        g = torch.Generator().manual_seed(seed)
        first = 2 if batch is None else batch
        out = []
        for spec in self.inputs:
            shape = [
                d if isinstance(d, int) else (first if i == 0 else 8)
                for i, d in enumerate(spec.dims)
            ]
            if spec.dtype.is_floating_point:
                out.append(torch.randn(shape, generator=g).to(spec.dtype))
            elif spec.dtype == torch.bool:
                out.append(torch.randint(0, 2, shape, generator=g).bool())
            else:
                out.append(torch.randint(0, 16, shape, generator=g).to(spec.dtype))
        return tuple(out)

    def dynamic_shapes(self, args: tuple[Any, ...]) -> list[dict[int, Any] | None]:
        """Per input, its symbolic (dim_param or unknown) dims, each ``Dim.DYNAMIC``."""
        spec = []
        for info, a in zip(self.inputs, args):
            dims = {i: Dim.DYNAMIC for i, d in enumerate(info.dims) if not isinstance(d, int)}
            spec.append(dims if (dims and isinstance(a, torch.Tensor)) else None)
        return spec


def _input_info(value_info: Any) -> InputInfo:
    t = value_info.type.tensor_type
    if not value_info.type.HasField("tensor_type") or t.elem_type not in DTYPES:
        raise OnnxImportError(
            f"graph input {value_info.name!r}: only tensor inputs of the standard numeric types "
            "are supported (not sequences, maps, strings or optional values)"
        )
    dims: list[int | str | None] = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return InputInfo(value_info.name, DTYPES[t.elem_type], tuple(dims))


def load_onnx(source: Any, *, cleanup: bool = True) -> OnnxModule:
    """Load, check, upgrade, clean and convert an ONNX model into an eager ``OnnxModule``.

    ``source``: a path or an ``onnx.ModelProto``. Raises ``OnnxImportError`` for a missing,
    corrupt or invalid file and ``UnsupportedOpError`` (listing every unsupported op) before
    anything runs.
    """
    import onnx

    model, where = _read(source)
    _check(model, where)
    original_opset = opset_of(model)
    model = _upgrade(model, where)
    if len(model.functions):  # model-local functions: their bodies are ordinary ops
        try:
            from onnx import inliner
        except ImportError:  # onnx < 1.16: the function ops are then reported as unsupported
            inliner = None
        if inliner is not None:
            model = inliner.inline_local_functions(model)
    how = "none"
    if cleanup:
        model, how = _clean(model)
    check_supported(model, where)
    if not cleanup:
        model = onnx.ModelProto.FromString(model.SerializeToString())  # never edit the caller's
    linear = fuse_linear(model)
    info = {
        "source": "onnx",
        "file": where,
        "opset": original_opset,
        "imported_opset": opset_of(model),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "cleanup": how,
        "nodes": len(model.graph.node),
        "linear_fused": linear,
    }
    return OnnxModule(model, info)


# -- capture -------------------------------------------------------------------------------------


def capture_onnx(
    source: Any,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_batch: bool = True,
) -> GraphModule:
    """``graphopt.capture`` for ONNX: the standard IR, with every symbolic ONNX dim dynamic.

    Falls back to static shapes (``StaticShapeWarning``) where export cannot keep them dynamic;
    ``gm.meta["graphopt_capture"]`` records the source file, opsets, cleanup and dynamic dims.
    """

    module = source if isinstance(source, OnnxModule) else load_onnx(source)
    if example_kwargs:
        raise OnnxImportError(
            f"{module.info['file']}: an ONNX model takes its inputs positionally, in graph order "
            f"({', '.join(i.name for i in module.inputs)}); got keyword inputs "
            f"{sorted(example_kwargs)}"
        )
    args = module.example_inputs() if example_inputs is None else as_args(example_inputs)
    info: dict[str, Any] = dict(module.info, dynamic_batch=False, static_reason=None,
                                torch=torch.__version__)  # fmt: skip
    # the file's own names, which an export of the compiled model keeps
    info["input_names"] = [i.name for i in module.inputs]
    info["output_names"] = list(module.output_names)
    with torch.no_grad():
        try:
            pinned = module.inputs_read_as_numbers(args)
        except Exception as exc:
            raise OnnxImportError(
                f"{info['file']}: running the imported graph on the example inputs failed: "
                f"{type(exc).__name__}: {first_line(exc)}. Check the inputs' shapes and dtypes "
                f"against the ONNX inputs {[(i.name, str(i.dtype), i.dims) for i in module.inputs]}"
            ) from exc
        info["pinned_inputs"] = {
            i: {"name": module.inputs[i].name, "values": v.values} for i, v in pinned.items()
        }
        ep = None
        dynamic = module.dynamic_shapes(args) if dynamic_batch else None
        if dynamic is not None:
            dynamic = [None if i in pinned else d for i, d in enumerate(dynamic)]
        if dynamic is not None and any(d for d in dynamic):
            wide = tuple(_widen(a, d) for a, d in zip(args, dynamic))
            try:
                with module.pinned(pinned):
                    ep = export_program(module, wide, {}, {"args": tuple(dynamic)})
            except Exception as exc:
                info["static_reason"] = f"{type(exc).__name__}: {first_line(exc)}"
        elif dynamic_batch:
            info["static_reason"] = "the ONNX inputs have no symbolic dims"
        else:
            info["static_reason"] = "dynamic_batch=False"
        if ep is None:
            args = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, args)
            try:
                with module.pinned(pinned):
                    ep = export_program(module, args, {}, None)
            except Exception as exc:
                raise OnnxImportError(
                    f"{info['file']}: torch.export could not capture the imported graph: "
                    f"{type(exc).__name__}: {first_line(exc)}"
                ) from None
            if dynamic_batch and dynamic is not None and any(d for d in dynamic):
                warnings.warn(
                    f"{info['file']}: the symbolic ONNX dims cannot stay dynamic "
                    f"({info['static_reason']}); captured with static shapes",
                    StaticShapeWarning,
                    stacklevel=3,
                )
    gm = graph_of(ep, module.info["file"])
    info["dynamic_dims"] = _dynamic_dims(gm)
    info["dynamic_batch"] = any(0 in dims for dims in info["dynamic_dims"].values())
    gm.meta["graphopt_capture"] = info
    return gm


def _widen(x: Any, dims: dict[int, Any] | None) -> Any:
    """export specializes size-1 dims, so such a dynamic dim is traced at size 2."""
    if not isinstance(x, torch.Tensor) or not dims:
        return x
    for d in dims:
        if x.shape[d] == 1:
            x = torch.cat([x, x], d)
    return x


def _dynamic_dims(gm: GraphModule) -> dict[int, list[int]]:
    """Input index -> the dims that stayed symbolic in the captured graph."""
    out: dict[int, list[int]] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [j for j, d in enumerate(val.shape) if not isinstance(d, int)]
            if dims:
                out[i] = dims
    return out


def input_signature(args: tuple[Any, ...], info: dict[str, Any]) -> Any:
    """The compiled model's InputSignature: every dim that stayed symbolic may vary."""

    leaves: list[Any] = []
    dyn = info.get("dynamic_dims", {})
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            shape = tuple(None if j in dyn.get(i, ()) else int(d) for j, d in enumerate(a.shape))
            leaves.append(TensorSpec(str(a.dtype), shape, a.device.type))
        else:
            leaves.append(None)
    pinned = tuple(
        (int(i), p["name"], tuple(p["values"])) for i, p in info.get("pinned_inputs", {}).items()
    )
    return InputSignature(
        len(args), (), tuple(leaves), bool(info.get("dynamic_batch")), False, pinned
    )
