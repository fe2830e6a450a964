"""``graphopt.export_onnx``: write an optimized graph as an ONNX file that ONNX Runtime runs.

The graph is re-exported with ``torch.export`` (the input dims that are symbolic in the graph stay
symbolic) and translated by ``torch.onnx.export(..., dynamo=True)``. graphopt's own ops are handled
before that, one rule per op:

* default: each op is replaced by its ATen reference decomposition, so the file holds only
  standard ONNX ops. The int8 ops become QDQ, the form ONNX Runtime's and TensorRT's QDQ fusers
  accept::

      int8_linear(q, s, w_int8, w_scales, b, r, act, f32)
      ->  Gemm(DequantizeLinear(q, s, 0), DequantizeLinear(w_int8, w_scales, 0, axis=0), b) ...

  ``quantize_per_tensor`` is ``QuantizeLinear`` (per-tensor scale, zero point 0) and the weights
  stay int8 initializers behind a per-channel ``DequantizeLinear`` (axis 0).
* ``custom_ops=True``: each op is one node of the custom domain ``graphopt`` whose attributes
  carry the op's non-tensor parameters (its inputs in schema order, ``None`` as an omitted
  optional input). The QDQ ops stay the standard QuantizeLinear/DequantizeLinear either way.

One known difference: ONNX's QuantizeLinear saturates to [-128, 127] while graphopt clamps to
[-127, 127], so an activation below ``-127.5 * scale`` (outside the calibrated range) maps to
-128 instead of -127. Pruned weights are ordinary initializers holding exact zeros.
"""

from __future__ import annotations

import inspect
import io
import os
import re
import warnings
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.export import Dim
from torch.fx import GraphModule
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from graphopt.errors import OnnxExportError, first_line
from graphopt.frontends.exported import as_args, export_program, normalize
from graphopt.ir.state import effects, is_stateful
from graphopt.ops.fused import ACTIVATIONS, norm_reference
from graphopt.ops.registry import GRAPHOPT_OPS, IMPLS

aten = torch.ops.aten
G = torch.ops.graphopt
QMAX = 127
MIN_OPSET = 13  # per-channel DequantizeLinear (axis) needs opset 13

# -- default mode: graphopt ops -> ATen (+ the three QDQ ops) ------------------------------------


def _quant(x: Tensor, scale: float) -> Tensor:
    # QuantizeLinear takes float32 in every opset graphopt exports to
    return G.quantize_per_tensor(x if x.dtype == torch.float32 else x.float(), scale)


def _dequant(q: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    y = G.dequantize_per_tensor(q, scale, torch.float32)
    return y if dtype == torch.float32 else y.to(dtype)


def _dequant_channel(q: Tensor, scales: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    scales = scales if scales.dtype == torch.float32 else scales.float()
    w = G.dequantize_per_channel(q, scales, axis, torch.float32)
    return w if dtype == torch.float32 else w.to(dtype)


def _dequant_weight(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return _dequant_channel(q, scales, 0, dtype)  # per output channel


def _epilogue(y: Tensor, b: Tensor | None, r: Tensor | None, act: str) -> Tensor:
    if b is not None:
        y = y + b.to(y.dtype)
    y = ACTIVATIONS[act].in_place(y)
    return y if r is None else y + r


def _float_type(dtype: torch.dtype) -> torch.dtype:
    # int8 ops scale their accumulator in fp32 at least (graphopt/ops/int8.py)
    return torch.promote_types(dtype, torch.float32)


def _gemm(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear`` as one 2-D Gemm (transB=1) whatever the rank of ``x``: torch.onnx writes a
    3-D linear as Transpose(weight) + MatMul, which splits the weight's DequantizeLinear from
    its GEMM. The reshape goes before ``x``'s own DequantizeLinear (see the callers)."""
    if x.dim() == 2:
        return F.linear(x, w, b)
    y = F.linear(x.reshape(-1, x.shape[-1]), w, b)
    return y.reshape(*x.shape[:-1], w.shape[0])


def _rows(q: Tensor) -> Tensor:
    return q if q.dim() == 2 else q.reshape(-1, q.shape[-1])


def _int8_linear(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    # int8_linear(q, s, w8, ws, ..) -> gemm(dq(q, s), dq_axis0(w8, ws), b) ..
    ftype = _float_type(dtype)
    b = None if b is None else b.to(ftype)  # inside the Gemm, where QDQ fusers look for it
    y = _gemm(_dequant(_rows(xq), x_scale, ftype), _dequant_weight(wq, w_scale, ftype), b)
    y = y if xq.dim() == 2 else y.reshape(*xq.shape[:-1], wq.shape[0])
    return _epilogue(y, None, r, act).to(dtype)


def _int8_linear_requant(xq, x_scale, wq, w_scale, b, r, act, out_scale):  # type: ignore[no-untyped-def]
    # int8_linear_requant(.., s_out) -> q(int8_linear(..), s_out)
    return _quant(_int8_linear(xq, x_scale, wq, w_scale, b, r, act, torch.float32), out_scale)


def _int8_conv1x1(xq, x_scale, wq, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    # int8_conv1x1(q, s, w8, ws, ..) -> conv1x1(dq(q, s), dq_axis0(w8, ws), b) ..
    ftype = _float_type(dtype)
    w = _dequant_weight(wq, w_scale, ftype)
    if w.dim() == 2:
        w = w.reshape(w.shape[0], w.shape[1], 1, 1)
    b = None if b is None else b.to(ftype)
    y = aten.convolution.default(
        _dequant(xq, x_scale, ftype), w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1
    )
    y = ACTIVATIONS[act].in_place(y)
    return (y if r is None else y + r).to(dtype)


def _norm_quant(x, w, b, eps, kind, scale):  # type: ignore[no-untyped-def]
    # norm_quant(x, .., s) -> q(norm(x, ..), s)
    return _quant(norm_reference(x, w, b, eps, kind), scale)


def _int8_linear_dynamic(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    # per-token scales have no ONNX QuantizeLinear form: the activation's quantization is
    # written out in float (round, clip), the weight stays a per-channel DequantizeLinear
    xf = x.to(_float_type(x.dtype))
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX
    xq = torch.round(xf / s).clamp(-QMAX, QMAX)
    y = _gemm(xq * s, _dequant_weight(wq, w_scale, xf.dtype), None)
    return _epilogue(y, b, r, act).to(x.dtype)


def _w8a16_linear(x, wq, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    # w8a16_linear(x, w8, ws, ..) -> linear(x, dq_axis0(w8, ws), b) ..
    return _epilogue(_gemm(x, _dequant_weight(wq, w_scale, x.dtype), None), b, r, act)


def _sparse24_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)  # the 2:4 weight is a dense weight with exact zeros


# graphopt op name -> its export form; ops not listed here export as their ATen reference
LOWERINGS: dict[str, Callable[..., Any]] = {
    # the QDQ ops themselves stay, in float32 (the scale's type sets DequantizeLinear's output)
    "quantize_per_tensor": _quant,
    "dequantize_per_tensor": _dequant,
    "dequantize_per_channel": _dequant_channel,
    "int8_linear": _int8_linear,
    "int8_linear_requant": _int8_linear_requant,
    "int8_conv1x1": _int8_conv1x1,
    "norm_quant": _norm_quant,
    "int8_linear_dynamic": _int8_linear_dynamic,
    "w8a16_linear": _w8a16_linear,
    "sparse24_linear": _sparse24_linear,
}
# kept as graphopt ops through torch.export (float32 in and out, see the wrappers above);
# translated to the standard QuantizeLinear/DequantizeLinear below, with custom_ops too
QDQ_OPS = ("quantize_per_tensor", "dequantize_per_tensor", "dequantize_per_channel")


def _all_ops() -> dict[str, Any]:
    return dict(GRAPHOPT_OPS)  # every graphopt op, sparse24_linear included


def _default_form(name: str) -> Callable[..., Any] | None:
    if name in LOWERINGS:
        return LOWERINGS[name]
    if name in IMPLS:
        return IMPLS[name].reference
    return None


# -- the ONNX side: onnxscript functions for torch.onnx's custom_translation_table ---------------


def _onnx_table(overloads: dict[str, Any]) -> dict[Any, Callable[..., Any]]:
    """torch.onnx's translation table for the QDQ ops (the other ops are gone by then)."""
    return {overloads[name]: fn for name, fn in _qdq_functions().items() if name in overloads}


def _qdq_functions() -> dict[str, Callable[..., Any]]:
    """onnxscript forms of the QDQ ops: symmetric int8, zero point 0."""
    import onnx
    from onnxscript import opset18 as op

    def zero_point(n: int | None) -> Any:
        dims = [] if n is None else [n]
        return op.Constant(
            value=onnx.helper.make_tensor("zp", onnx.TensorProto.INT8, dims, [0] * (n or 1))
        )

    def quantize_per_tensor(x: Any, scale: float) -> Any:
        return op.QuantizeLinear(x, op.Constant(value_float=scale), zero_point(None))

    def dequantize_per_tensor(q: Any, scale: float, dtype: Any) -> Any:
        return op.DequantizeLinear(q, op.Constant(value_float=scale), zero_point(None))

    def dequantize_per_channel(q: Any, scales: Any, axis: int, dtype: Any) -> Any:
        n = q.shape[axis]
        return op.DequantizeLinear(q, scales, zero_point(n), axis=axis)

    return {
        "quantize_per_tensor": quantize_per_tensor,
        "dequantize_per_tensor": dequantize_per_tensor,
        "dequantize_per_channel": dequantize_per_channel,
    }


# -- custom_ops=True: one node of the "graphopt" domain per op ----------------------------------

CUSTOM_DOMAIN = "graphopt"
CUSTOM_VERSION = 1


def _onnx_dtype(dtype: torch.dtype) -> int:
    import onnx

    return int(
        {
            torch.float32: onnx.TensorProto.FLOAT,
            torch.float16: onnx.TensorProto.FLOAT16,
            torch.bfloat16: onnx.TensorProto.BFLOAT16,
            torch.float64: onnx.TensorProto.DOUBLE,
            torch.int8: onnx.TensorProto.INT8,
            torch.int32: onnx.TensorProto.INT32,
            torch.int64: onnx.TensorProto.INT64,
            torch.bool: onnx.TensorProto.BOOL,
        }[dtype]
    )


def _custom_node(name: str, overload: Any) -> Callable[..., Any]:
    """A function that, traced by torch.export, emits ``graphopt.<name>(tensors; attributes)``.

    Tensor arguments become the node's inputs in schema order (a tensor list, as in ``fused``,
    contributes its tensors in order; ``None`` is an omitted optional input); every other
    argument becomes an attribute of the same name (a dtype as its ONNX type number; ``None``
    attributes are left out). The graphopt op itself is called only for its output's shape and
    dtype; torch.export drops that call as dead code.
    """
    schema = overload._schema

    def emit(*args: Any, **kwargs: Any) -> Any:
        bound = dict(zip((a.name for a in schema.arguments), args)) | kwargs
        inputs: list[Tensor | None] = []
        attrs: dict[str, Any] = {}
        for arg in schema.arguments:
            value = bound.get(arg.name, arg.default_value if arg.has_default_value() else None)
            kind = str(arg.type)
            if "Tensor" in kind:
                inputs.extend(value if isinstance(value, (list, tuple)) else [value])
            elif isinstance(value, torch.dtype):
                attrs[arg.name] = _onnx_dtype(value)
            elif value is not None:
                attrs[arg.name] = list(value) if isinstance(value, tuple) else value
        out = overload(*args, **kwargs)
        op_name = f"{CUSTOM_DOMAIN}::{name}"
        if isinstance(out, Tensor):
            return torch.onnx.ops.symbolic(
                op_name, inputs, attrs, dtype=out.dtype, shape=out.shape, version=CUSTOM_VERSION
            )
        return torch.onnx.ops.symbolic_multi_out(
            op_name,
            inputs,
            attrs,
            dtypes=[o.dtype for o in out],
            shapes=[o.shape for o in out],
            version=CUSTOM_VERSION,
        )

    emit.__name__ = f"onnx_{name}"
    return emit


# -- inputs, checks, the export itself -----------------------------------------------------------


def _resolve(obj: Any) -> GraphModule:
    """The optimized graph of a compiled model (its ``gm``), or a GraphModule itself."""
    gm = getattr(obj, "gm", obj) if isinstance(obj, torch.nn.Module) else obj
    if isinstance(gm, GraphModule):
        return gm
    raise OnnxExportError(
        f"graphopt.export_onnx takes what graphopt.compile returned (a CompiledModule) or a "
        f"torch.fx.GraphModule, got {type(obj).__name__}; compile the model first: "
        "graphopt.export_onnx(graphopt.compile(model, inputs), 'model.onnx')"
    )


def _size(d: Any) -> int:
    """A symbolic dim's example value (its hint: the size it was traced at), else 2."""
    if isinstance(d, int):
        return d
    hint = getattr(getattr(d, "node", None), "hint", None)
    return int(hint) if isinstance(hint, int) and hint >= 2 else 2


def _symbolic_dims(gm: GraphModule) -> list[dict[int, Any] | None] | None:
    """Per graph input, its symbolic dims (from ``meta["val"]``); None without metadata."""
    dims: list[dict[int, Any] | None] = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, Tensor):
            return None
        symbolic = {j: Dim.DYNAMIC for j, d in enumerate(val.shape) if not isinstance(d, int)}
        dims.append(symbolic or None)
    return dims


def _placeholder_inputs(gm: GraphModule) -> list[Tensor]:
    """Example tensors shaped like the placeholders' ``meta["val"]``, symbolic dims at the
    size they were traced at."""
    tensors = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if not isinstance(val, Tensor):
            raise OnnxExportError(
                f"graphopt.export_onnx: graph input {node.name!r} has no tensor metadata "
                "(meta['val']); pass example_inputs=(...) with one tensor per input"
            )
        shape = [_size(d) for d in val.shape]
        if val.dtype.is_floating_point:
            tensors.append(torch.randn(shape, dtype=val.dtype, device=val.device))
        else:  # token ids and masks: zeros are valid for every embedding and mask
            tensors.append(torch.zeros(shape, dtype=val.dtype, device=val.device))
    return tensors


def _inputs(
    gm: GraphModule, example_inputs: Any, dynamic_batch: bool
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """(args, kwargs, dynamic_shapes) to re-export ``gm`` with. The symbolic dims of the graph's
    inputs stay symbolic, all of them (an imported ONNX model may have more than the batch);
    a graph without metadata gets a symbolic dim 0. ``dynamic_batch=False``: none."""
    dims = _symbolic_dims(gm)
    if example_inputs is None:
        leaves: list[Any] = _placeholder_inputs(gm)
        if dims is not None and any(dims) and not dynamic_batch:
            raise OnnxExportError(
                "graphopt.export_onnx: dynamic_batch=False fixes the batch size, which the "
                "compiled model leaves open; pass example_inputs=(...) with the batch size the "
                "file should have"
            )
    else:
        leaves = pytree.tree_leaves(as_args(example_inputs))
    if dims is None:
        dims = [{0: Dim.DYNAMIC} if isinstance(t, Tensor) and t.dim() else None for t in leaves]
    spec = getattr(gm, "_in_spec", None)
    if spec is None:  # a graph built by hand: its inputs are its placeholders, in order
        spec = pytree.tree_flatten((tuple(leaves), {}))[1]
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    if not dynamic_batch or not any(dims):
        return args, kwargs, None
    dims_args, dims_kwargs = pytree.tree_unflatten(dims, spec)
    if not kwargs:
        return args, kwargs, tuple(dims_args)
    bound = inspect.signature(gm.forward).bind(*dims_args, **dims_kwargs)
    return args, kwargs, dict(bound.arguments)


def _check_path(path: str | os.PathLike[str]) -> Path:
    try:
        out = Path(path)
    except TypeError:
        raise OnnxExportError(
            f"graphopt.export_onnx: path must be a file path (str or os.PathLike), got "
            f"{type(path).__name__}"
        ) from None
    if out.is_dir():
        raise OnnxExportError(f"graphopt.export_onnx: {out} is a directory; name an .onnx file")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise OnnxExportError(
            f"graphopt.export_onnx: cannot write {out}: folder {parent} does not exist; create "
            "it first"
        )
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OnnxExportError(
            f"graphopt.export_onnx: cannot write {out}: no write permission; choose another path"
        )
    return out


def _graph_ops(gm: GraphModule, overloads: dict[str, Any]) -> dict[Any, str]:
    """overload -> name for each graphopt op in ``gm``; unknown ``graphopt::`` ops are an error."""
    names = {v: k for k, v in overloads.items()}
    found: dict[Any, str] = {}
    unknown: list[str] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not str(node.target).startswith("graphopt."):
            continue
        if node.target in names:
            found[node.target] = names[node.target]
        else:
            unknown.append(f"{node.target} (node {node.name})")
    if unknown:
        raise OnnxExportError(
            "graphopt.export_onnx: no ONNX form for these graphopt ops: "
            f"{', '.join(unknown)}; add them to graphopt/export/onnx.py, or compile without "
            "the pass that makes them"
        )
    return found


def _lowered(gm: GraphModule, ops: dict[Any, str], custom_ops: bool) -> GraphModule:
    """A copy of ``gm`` (weights shared) with graphopt ops replaced by their export form."""
    graph = torch.fx.Graph()
    graph.set_codegen(gm.graph._codegen)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if new.op == "call_function" and new.target in ops:
            name = ops[new.target]
            if custom_ops and name not in QDQ_OPS:
                new.target = _custom_node(name, new.target)
            elif (form := _default_form(name)) is not None:
                new.target = form
        env[node] = new
    out = GraphModule(gm, graph)
    _rename_colliding_weights(out)
    normalize(out)
    return out


_GENERATED_NAME = re.compile(r"val_\d+")


def _rename_colliding_weights(gm: GraphModule) -> None:
    """Weights named like the values torch.onnx generates (``val_54``: a graph imported from a
    torch.onnx file has them) collide with those in torch.onnx's optimizer; rename them."""
    for node in gm.graph.find_nodes(op="get_attr"):
        if not _GENERATED_NAME.fullmatch(node.target):
            continue
        new = f"weight_{node.target}"
        while hasattr(gm, new):
            new += "_"
        setattr(gm, new, getattr(gm, node.target))
        node.target = new


def export_onnx(
    compiled_or_graph: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    example_inputs: Any = None,
    opset: int | None = None,
    custom_ops: bool = False,
    dynamic_batch: bool = True,
) -> Path:
    """Write the optimized graph to ``path`` as ONNX and return the path.

    The file holds standard ONNX ops (``custom_ops=False``; graphopt ops through their ATen
    reference, int8 as QuantizeLinear/DequantizeLinear) or one ``graphopt``-domain node per
    graphopt op (``custom_ops=True``, for a runtime that implements them). It passes
    ``onnx.checker.check_model(full_check=True)``. The batch dimension (dim 0 of every input) is
    symbolic when the compiled model's is and ``dynamic_batch`` is true. ``example_inputs`` are
    needed for a GraphModule without ``meta["val"]`` on its inputs, and with
    ``dynamic_batch=False`` (they fix the file's batch size); ``opset`` defaults to torch.onnx's
    (18 or newer; 17 works for most graphs, and an opset torch.onnx cannot write is an error).
    Raises ``OnnxExportError`` on a bad argument, path or translation failure.
    """
    gm = _resolve(compiled_or_graph)
    if is_stateful(gm):
        written = ", ".join(f"{kind} {target}" for kind, target in effects(gm))
        raise OnnxExportError(
            f"graphopt.export_onnx: the model updates state on every call ({written}), and an "
            "ONNX graph has no state; export a model whose forward does not write its buffers "
            "or inputs, or save it with graphopt.save"
        )
    out = _check_path(path)
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise OnnxExportError(
            f"graphopt.export_onnx: opset={opset!r}; per-channel QDQ needs opset {MIN_OPSET} or "
            "newer; pass opset=None for torch.onnx's default"
        )
    _needs("onnx")
    _needs("onnxscript")
    overloads = _all_ops()
    ops = _graph_ops(gm, overloads)
    args, kwargs, dynamic = _inputs(gm, example_inputs, dynamic_batch)
    lowered = _lowered(gm, ops, custom_ops)
    ep = _reexport(lowered, args, kwargs, dynamic)
    table = _onnx_table(_qdq(overloads))
    model = _to_onnx(ep, table, opset)
    _check_opset(model, opset)
    _check(model, out, custom_ops)
    _save(model, out)
    return out


def _qdq(overloads: dict[str, Any]) -> dict[str, Any]:
    return {name: overloads[name] for name in QDQ_OPS}


def _reexport(gm: GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], dims: Any) -> Any:
    try:
        with torch.no_grad():
            return export_program(gm, args, kwargs, dims)
    except Exception as exc:
        raise OnnxExportError(
            f"graphopt.export_onnx: torch.export could not re-export the optimized graph: "
            f"{type(exc).__name__}: {first_line(exc)}. Try dynamic_batch=False, and report "
            "this with the pipeline"
        ) from None


def _needs(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise OnnxExportError(
            f"graphopt.export_onnx needs the {module} package (torch.onnx's exporter uses it); "
            f"install it: pip install {module}  (or pip install 'graphopt[bench]')"
        ) from None


def _to_onnx(ep: Any, table: dict[Any, Callable[..., Any]], opset: int | None) -> Any:
    """The ONNX ModelProto of ``ep`` (torch.onnx's dynamo exporter, its optimizer included)."""
    printed = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(printed):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                ep,
                (),
                dynamo=True,
                custom_translation_table=table,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise OnnxExportError(
            f"graphopt.export_onnx: torch.onnx could not translate the graph: "
            f"{type(exc).__name__}: {first_line(exc)}. Export with custom_ops=True to keep "
            "graphopt ops as custom nodes, or report this with the pipeline"
        ) from None
    assert program is not None
    return program.model_proto


def _check_opset(model: Any, opset: int | None) -> None:
    """torch.onnx falls back to its own opset (with a warning only) where onnx's version
    converter has no adapter down to the one asked for; a file with another opset than asked
    is an error here."""
    wrote = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset is not None and wrote != opset:
        raise OnnxExportError(
            f"graphopt.export_onnx: torch.onnx could not write opset {opset} for this graph (it "
            f"wrote opset {wrote}; onnx's version converter lacks an adapter); use opset 17 or "
            "newer, or opset=None"
        )


def _check(model: Any, out: Path, custom_ops: bool) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise OnnxExportError(
            f"graphopt.export_onnx: the ONNX model for {out} fails onnx.checker: {first_line(exc)}"
            f"{' (custom_ops=True)' if custom_ops else ''}; report this with the pipeline"
        ) from None


def _save(model: Any, out: Path) -> None:
    import onnx

    try:
        onnx.save_model(model, str(out))
    except (OSError, ValueError) as exc:
        raise OnnxExportError(f"graphopt.export_onnx: cannot write {out}: {exc}") from None
