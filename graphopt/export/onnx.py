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
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.export import Dim
from torch.fx import GraphModule
from torch.nn import functional as F
from torch.utils import _pytree as pytree

from graphopt.errors import OnnxExportError, first_line
from graphopt.frontends.exported import as_args, export_program, normalize
from graphopt.ir.graph import attr_path
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


def _matmul_kn(x: Tensor, wq_kn: Tensor, w_scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``x @ DequantizeLinear(w8 [K, N], scales, axis=1)``, one ``MatMul`` whatever the rank of
    ``x``. The weight arrives transposed (``_kn_weights`` stores ``w8.T``), so no Transpose
    splits it from its DequantizeLinear: with ``x`` a DequantizeLinear too this is the node unit
    ONNX Runtime's QDQ fuser runs as an integer GEMM (MatMulIntegerToFloat, or QLinearMatMul
    where a QuantizeLinear follows)."""
    return torch.matmul(x, _dequant_channel(wq_kn, w_scale, 1, dtype))


def _int8_linear(xq, x_scale, wq_kn, w_scale, b, r, act, dtype):  # type: ignore[no-untyped-def]
    # int8_linear(q, s, w8, ws, ..) -> dq(q, s) @ dq_axis1(w8.T, ws) + b ..
    ftype = _float_type(dtype)
    y = _matmul_kn(_dequant(xq, x_scale, ftype), wq_kn, w_scale, ftype)
    return _epilogue(y, None if b is None else b.to(ftype), r, act).to(dtype)


def _int8_linear_requant(xq, x_scale, wq_kn, w_scale, b, r, act, out_scale):  # type: ignore[no-untyped-def]
    # int8_linear_requant(.., s_out) -> q(int8_linear(..), s_out)
    y = _int8_linear(xq, x_scale, wq_kn, w_scale, b, r, act, torch.float32)
    return _quant(y, out_scale)


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


def _int8_linear_dynamic(x, wq_kn, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    # per-token scales have no ONNX QuantizeLinear form: the activation's quantization is
    # written out in float (round, clip), the weight stays a per-channel DequantizeLinear
    xf = x.to(_float_type(x.dtype))
    s = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / QMAX
    xq = torch.round(xf / s).clamp(-QMAX, QMAX)
    y = _matmul_kn(xq * s, wq_kn, w_scale, xf.dtype)
    return _epilogue(y, b, r, act).to(x.dtype)


def _w8a16_linear(x, wq_kn, w_scale, b, r, act):  # type: ignore[no-untyped-def]
    # w8a16_linear(x, w8, ws, ..) -> x @ dq_axis1(w8.T, ws) + b ..
    return _epilogue(_matmul_kn(x, wq_kn, w_scale, x.dtype), b, r, act)


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
# forms that take their int8 weight as w8.T [K, N] (``_kn_weights``): op name -> its position
KN_WEIGHT = {
    "int8_linear": 2,
    "int8_linear_requant": 2,
    "int8_linear_dynamic": 1,
    "w8a16_linear": 1,
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
    gm: GraphModule,
    example_inputs: Any,
    dynamic_batch: bool,
    dynamic: Sequence[Sequence[int]] | None = None,
) -> tuple[tuple[Any, ...], dict[str, Any], Any]:
    """(args, kwargs, dynamic_shapes) to re-export ``gm`` with. The symbolic dims of the graph's
    inputs stay symbolic, all of them (an imported ONNX model may have more than the batch);
    a graph without metadata gets a symbolic dim 0. ``dynamic_batch=False``: none. ``dynamic``
    (dims per input) replaces what the metadata says."""
    dims = _symbolic_dims(gm)
    if dynamic is not None:
        dims = [{d: Dim.DYNAMIC for d in ds} or None for ds in dynamic]
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
    kn: list[tuple[torch.fx.Node, int]] = []
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if new.op == "call_function" and new.target in ops:
            name = ops[new.target]
            if custom_ops and name not in QDQ_OPS:
                new.target = _custom_node(name, new.target)
            elif (form := _default_form(name)) is not None:
                new.target = form
                if name in KN_WEIGHT:
                    kn.append((new, KN_WEIGHT[name]))
        env[node] = new
    out = GraphModule(gm, graph)
    _kn_weights(out, kn)
    _rename_colliding_weights(out)
    normalize(out)
    return out


def _kn_weights(gm: GraphModule, uses: list[tuple[torch.fx.Node, int]]) -> None:
    """Hand each int8 GEMM form in ``uses`` (node, position of its weight) the weight
    transposed, ``w8.T`` [K, N], as a weight of its own (one per weight, shared by the nodes
    that share it): the file then holds it as an int8 initializer that feeds its
    DequantizeLinear (axis=1) and the MatMul directly, with no Transpose in between."""
    made: dict[str, str] = {}
    for node, index in uses:
        w = node.args[index]
        with gm.graph.inserting_before(node):
            if isinstance(w, torch.fx.Node) and w.op == "get_attr":
                if w.target not in made:
                    name = f"{str(w.target).replace('.', '_')}_kn"
                    while hasattr(gm, name):
                        name += "_"
                    gm.register_buffer(name, attr_path(gm, str(w.target)).t().contiguous())
                    made[str(w.target)] = name
                new = gm.graph.get_attr(made[str(w.target)])
            else:  # a weight computed in the graph: transposed there
                new = gm.graph.call_function(aten.t.default, (w,))
        node.update_arg(index, new)
        if isinstance(w, torch.fx.Node) and w.op == "get_attr" and not w.users:
            gm.graph.erase_node(w)
    if uses:
        gm.recompile()


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
    uint8_activations: bool = False,
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
    ``uint8_activations=True`` writes the int8 activations as uint8 with zero point 128 (the
    same numbers, shifted): ONNX Runtime's x86 CPU provider runs its integer GEMMs on uint8
    activations, and converts int8 ones itself only where one quantized tensor feeds one
    layer. A model imported from ONNX keeps its file's input and output names. Raises
    ``OnnxExportError`` on a bad argument, path or translation failure.
    """
    gm = _resolve(compiled_or_graph)
    _check_stateless(gm)
    out = _check_path(path)
    model = onnx_model(
        gm,
        example_inputs=example_inputs,
        opset=opset,
        custom_ops=custom_ops,
        dynamic_batch=dynamic_batch,
        uint8_activations=uint8_activations,
    )
    _keep_source_names(model, gm.meta.get("graphopt_capture") or {})
    _save(model, out)
    return out


def _keep_source_names(model: Any, info: dict[str, Any]) -> None:
    """An imported ONNX model's own input and output names (``info`` is the capture's record)
    in place of torch.export's (``args_0``, ...), where the counts agree and the name is free."""
    graph = model.graph
    for values, names in ((graph.input, info.get("input_names")), (graph.output, info.get("output_names"))):  # fmt: skip
        if not names or len(names) != len(values):
            continue
        for value, name in zip(values, names):
            _rename_value(graph, value.name, name)


def _rename_value(graph: Any, old: str, new: str) -> None:
    """Rename the value ``old`` to ``new`` throughout ``graph`` (not if ``new`` is taken)."""
    taken = {i.name for i in graph.initializer} | {v.name for v in graph.input}
    taken |= {o for n in graph.node for o in n.output} | {v.name for v in graph.output}
    if old == new or new in taken:
        return
    for node in graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name == old:
            value.name = new


def onnx_model(
    compiled_or_graph: torch.nn.Module,
    *,
    example_inputs: Any = None,
    opset: int | None = None,
    custom_ops: bool = False,
    dynamic_batch: bool = True,
    dynamic: Sequence[Sequence[int]] | None = None,
    uint8_activations: bool = False,
) -> Any:
    """The ``onnx.ModelProto`` that :func:`export_onnx` writes, in memory, with the same
    arguments and checks (it passes ``onnx.checker``; ``OnnxExportError`` otherwise).

    ``dynamic`` (one tuple of dims per graph input, as ``graphopt.backends.Handoff.dynamic``)
    names the dims that stay symbolic, instead of those that are symbolic in the graph's
    metadata. Every node the exporter writes carries, in its ``metadata_props``, the FX node of
    the graph it computes (part of) under ``graphopt.node``; the node whose first output *is*
    that FX node's value also carries ``graphopt.value`` (see :func:`fx_values`).
    ``uint8_activations``: see :func:`export_onnx`.
    """
    gm = _resolve(compiled_or_graph)
    _check_stateless(gm)
    if opset is not None and (not isinstance(opset, int) or opset < MIN_OPSET):
        raise OnnxExportError(
            f"graphopt.export_onnx: opset={opset!r}; per-channel QDQ needs opset {MIN_OPSET} or "
            "newer; pass opset=None for torch.onnx's default"
        )
    _needs("onnx")
    _needs("onnxscript")
    overloads = _all_ops()
    ops = _graph_ops(gm, overloads)
    args, kwargs, dims = _inputs(gm, example_inputs, dynamic_batch, dynamic)
    lowered = _lowered(gm, ops, custom_ops)
    ep = _reexport(lowered, args, kwargs, dims)
    table = _onnx_table(_qdq(overloads))
    program = _to_onnx(ep, table, opset)
    model = program.model_proto
    _check_opset(model, opset)
    if uint8_activations:
        _uint8_activations(model)
    _check(model, custom_ops)
    _name_values(model, program.exported_program, lowered)
    return model


def unexportable(gm: GraphModule) -> str | None:
    """Why ``gm`` cannot be exported to ONNX (state, or graphopt ops without an ONNX form),
    without exporting it; None if nothing stands in the way."""
    try:
        _check_stateless(gm)
        _graph_ops(gm, _all_ops())
    except OnnxExportError as exc:
        return str(exc).removeprefix("graphopt.export_onnx: ")
    return None


def _check_stateless(gm: GraphModule) -> None:
    if is_stateful(gm):
        written = ", ".join(f"{kind} {target}" for kind, target in effects(gm))
        raise OnnxExportError(
            f"graphopt.export_onnx: the model updates state on every call ({written}), and an "
            "ONNX graph has no state; export a model whose forward does not write its buffers "
            "or inputs, or save it with graphopt.save"
        )


# -- uint8 activations ----------------------------------------------------------------------------

U8_ZERO_POINT = "graphopt_uint8_zero_point"  # the initializer: uint8 128
# ops an activation's int8 tensor may pass through between its QuantizeLinear and DequantizeLinear
_INT8_MOVES = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity")


def _uint8_activations(model: Any) -> None:
    """QuantizeLinear(x, s, int8 0) -> QuantizeLinear(x, s, uint8 128), and the same on every
    DequantizeLinear that reads an activation: each quantized value shifted by 128, so
    DequantizeLinear gives the same floats. Left as it is where a quantized activation reaches
    anything but a data move or a DequantizeLinear (a graph output, say)."""
    from onnx import numpy_helper

    users: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    starts = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    todo = [n.output[0] for n in starts]
    reached: list[Any] = []
    values = set(todo)
    while todo:
        name = todo.pop()
        if name in outputs:
            return
        for user in users.get(name, []):
            if user.op_type == "DequantizeLinear":
                reached.append(user)
            elif user.op_type in _INT8_MOVES and user.input[0] == name:
                todo.append(user.output[0])
                values.add(user.output[0])
            else:
                return
    zero = numpy_helper.from_array(np.array(128, dtype=np.uint8), U8_ZERO_POINT)
    model.graph.initializer.append(zero)
    for node in [*starts, *reached]:
        node.input[2] = U8_ZERO_POINT
    kept = [v for v in model.graph.value_info if v.name not in values]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


# -- ONNX values named after the FX nodes they stand for ------------------------------------------

PART_OF = "graphopt.node"  # on every node: the FX node it computes, or part of it
VALUE_OF = "graphopt.value"  # on the node whose first output is that FX node's value
_TORCH_FX_NODE = "pkg.torch.onnx.fx_node"  # torch.onnx's own: the exported program's node
_FX_NAME = re.compile(r"^%(\S+) :")
# ops that pass their input's value on unchanged when dtype and shape stay (the ONNX optimizer
# drops them, so the value of the FX node they end lives in the node before them)
_PASS_ON = ("to", "_to_copy", "clone", "contiguous", "alias", "view", "reshape", "_unsafe_view")


def fx_values(model: Any) -> dict[str, str]:
    """ONNX value name -> the name of the FX node whose value it is, for a model made by
    :func:`onnx_model` (from the ``graphopt.value`` marks; values without one are left out)."""
    values = {}
    for node in model.graph.node:
        for prop in node.metadata_props:
            if prop.key == VALUE_OF and node.output:
                values[node.output[0]] = prop.value
    return values


def _name_values(model: Any, ep: Any, graph: GraphModule) -> None:
    """Mark the ONNX nodes with the node of ``graph`` each computes (``PART_OF``) and, on the
    node whose first output is that node's value, ``VALUE_OF``. torch.export records which node
    each node it traces comes from (``meta["from_node"]``, back to ``graph``'s), and torch.onnx
    which node of the program ``ep`` it translated each ONNX node from
    (``pkg.torch.onnx.fx_node``). ``graph``'s nodes have the names of the exported graph."""
    source = {n.name: _traced_from(n, id(graph.graph)) for n in ep.graph.nodes}
    finals = _final_nodes(ep, source)
    onnx_of: dict[str, Any] = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        match = _FX_NAME.match(props.get(_TORCH_FX_NODE, ""))
        traced = match.group(1) if match else None
        if traced is None or source.get(traced) is None:
            continue
        _set_prop(node, PART_OF, str(source[traced]))
        onnx_of[traced] = node  # an op written as several ONNX nodes: its result is the last
    for fx_name, chain in finals.items():
        node = next((onnx_of[e] for e in chain if e in onnx_of), None)
        if node is not None:
            _set_prop(node, VALUE_OF, fx_name)


def _traced_from(node: torch.fx.Node, graph_id: int) -> str | None:
    """The name of the node of the graph ``graph_id`` that ``node`` was traced from, if any."""
    todo = list(node.meta.get("from_node") or [])
    while todo:
        src = todo.pop(0)
        if getattr(src, "graph_id", None) == graph_id:
            return str(src.name)
        todo += list(getattr(src, "from_node", None) or [])
    return None


def _final_nodes(ep: Any, source: dict[str, str | None]) -> dict[str, list[str]]:
    """FX node -> the exported nodes that may hold its value, best first: the one whose users
    lie outside the nodes traced from it, then, through ops that pass a value on unchanged,
    the ones before it."""
    finals: dict[str, list[str]] = {}
    for node in ep.graph.nodes:
        fx_name = source.get(node.name)
        if fx_name is None or not any(source.get(u.name) != fx_name for u in node.users):
            continue
        chain = [node.name]
        while _passes_on(node) and source.get(node.args[0].name) == fx_name:
            node = node.args[0]
            chain.append(node.name)
        finals.setdefault(fx_name, chain)
    return finals


def _passes_on(node: torch.fx.Node) -> bool:
    first = node.args[0] if node.args else None
    if not isinstance(first, torch.fx.Node) or node.target is None:
        return False
    if getattr(node.target, "__name__", "").split(".")[0] not in _PASS_ON:
        return False
    a, b = node.meta.get("val"), first.meta.get("val")
    return (
        isinstance(a, Tensor)
        and isinstance(b, Tensor)
        and a.dtype == b.dtype
        and a.shape == b.shape
    )


def _set_prop(node: Any, key: str, value: str) -> None:
    for prop in node.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    prop = node.metadata_props.add()
    prop.key, prop.value = key, value


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
    """torch.onnx's ``ONNXProgram`` of ``ep`` (the dynamo exporter, its optimizer included):
    ``.model_proto`` is the model, ``.exported_program`` the program it translated."""
    printed = io.StringIO()
    # torch.onnx logs "torchvision is not installed. Skipping torchvision::nms" (and three more)
    # while it builds its op table: noise about ops no graphopt graph holds
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
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
    finally:
        registration.setLevel(level)
    assert program is not None
    return program


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


def _check(model: Any, custom_ops: bool) -> None:
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise OnnxExportError(
            f"graphopt.export_onnx: the ONNX model fails onnx.checker: {first_line(exc)}"
            f"{' (custom_ops=True)' if custom_ops else ''}; report this with the pipeline"
        ) from None


def _save(model: Any, out: Path) -> None:
    import onnx

    try:
        onnx.save_model(model, str(out))
    except (OSError, ValueError) as exc:
        raise OnnxExportError(f"graphopt.export_onnx: cannot write {out}: {exc}") from None
