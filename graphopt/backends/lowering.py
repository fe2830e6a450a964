"""Preparing a verified graph for Inductor: every ``graphopt::`` op in the form Inductor
optimizes best on the target, as rules (one per op) that the rewriter applies to a copy.

An opaque custom op is a wall for Inductor: it cannot fuse across it, and on the CPU it would
run the op's ATen reference one call at a time. So on the CPU every op becomes ATen:

* float ops the canonical ATen form Inductor's own fusions recognize (the bias inside the
  ``linear``, the activation and the residual as ops after it); a fused group its program,
  inlined; every other op its ATen reference, a plain Python function that torch.export
  traces through;
* int8 ops torch's ``quantized_decomposed`` quantize / dequantize around ``aten.linear`` or a
  convolution whose int8 weight is dequantized per channel, with the scales the ``int8`` pass
  calibrated: the form Inductor's x86 int8 lowering (with freezing) runs as oneDNN int8
  kernels. Per-token dynamic activations run the same int8 GEMM at unit activation scale,
  each token's scale applied to its output; weight-only int8 becomes a float weight that
  freezing folds.

On CUDA an op whose Triton kernel takes the call becomes its ``graphopt_triton::`` twin
(:func:`graphopt.ops.registry.triton_twin`, a ``torch.library.triton_op`` Inductor keeps inside
its graph); the others as on the CPU, except that the int8 ops keep their references (oneDNN
is x86-only).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
from torch.fx import GraphModule, Node

from graphopt.errors import GraphoptError
from graphopt.ir.graph import snapshot
from graphopt.ir.program import Ref
from graphopt.ir.rewriter import EditRule, Rewriter
from graphopt.ir.rules import Call, Const, Match, Rule
from graphopt.kernels.activations import ACTIVATIONS
from graphopt.ops.fused import program_of
from graphopt.ops.int8 import QMAX
from graphopt.ops.registry import GRAPHOPT_OPS, IMPLS, kernels_enabled, triton_twin

aten = torch.ops.aten
go = torch.ops.graphopt
qd = torch.ops.quantized_decomposed

QDQ = "int8 as QDQ"
DYNAMIC = "int8 dynamic as QDQ"
FLOAT = "canonical ATen"
INLINED = "fused group inlined"
REFERENCE = "ATen reference"
TRITON = "triton_op"


@dataclass
class Prepared:
    """The graph Inductor compiles (flat inputs and outputs, like ``Handoff.flat()``) and how
    many ``graphopt::`` calls each rule lowered."""

    gm: GraphModule
    lowered: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return ", ".join(f"{n} {rule}" for rule, n in self.lowered.items() if n)


def prepare(flat: GraphModule, target: str) -> Prepared:
    """A copy of ``flat`` (weights shared) with every ``graphopt::`` call lowered for Inductor
    on ``target``. Raises ``GraphoptError`` if one is left (a rule table that misses an op)."""
    gm = snapshot(flat)
    rw = Rewriter(gm, "inductor-lowering")
    rw.apply(rules_for(target))
    rw.finish()
    left = [n.name for n in gm.graph.nodes if n.op == "call_function" and _is_graphopt(n.target)]
    if left:
        raise GraphoptError(f"lowering for Inductor left graphopt ops at {', '.join(left)}")
    return Prepared(gm, {name: log.applied for name, log in rw.rules.items()})


def _is_graphopt(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "graphopt"


def rules_for(target: str) -> list[Rule | EditRule]:
    """The rule table for ``target``: tried in order at each ``graphopt::`` call, first match
    wins; the last rule (every op's reference) always matches."""
    every_op = (Rule(REFERENCE, tuple(GRAPHOPT_OPS.values()), _reference),)
    if target == "cuda":
        twins = (Rule(TRITON, _ops_with_kernels(), _triton_twin),) if kernels_enabled() else ()
        return [*twins, *FLOAT_RULES, *every_op]
    return [*INT8_RULES, *FLOAT_RULES, *every_op]


# -- int8: quantized_decomposed QDQ around linear / convolution (Inductor's x86 int8 form) -----
#
# Activations are quantized on graphopt's grid (symmetric, zero point 0, [-127, 127]). oneDNN's
# int8 kernels take uint8 activations (VNNI multiplies uint8 by int8; int8 by int8 falls back
# to code about 300x slower, measured on the MLP), so where only int8 layers read a quantized
# activation it is produced as uint8 on the same grid shifted by 128 ([1, 255], zero point
# 128): the same values, exactly. Each layer reads its input's grid from its dtype.


def _int8_linear(node: Node) -> Match:
    """int8_linear(q, s, wq, ws, b, r, act, dt) -> act(linear(dq(q, s), dq_w(wq, ws), b)) + r"""
    q, s, wq, ws, b, r, act, dtype = node.args
    y = Call(aten.linear.default, (_dq_activation(q, s, dtype), _dq_weight(wq, ws, dtype), b))
    return Match([node], _act_then_residual(y, act, r))


def _int8_requant(node: Node) -> Match:
    """int8_linear_requant(q, s, wq, ws, b, r, act, so) -> quantize(int8_linear(..), so)"""
    q, s, wq, ws, b, r, act, out_scale = node.args
    y = Call(aten.linear.default, (_dq_activation(q, s), _dq_weight(wq, ws), b))
    return Match([node], _quantize(_act_then_residual(y, act, r), out_scale, _grid_for(node)))


def _int8_conv1x1(node: Node) -> Match:
    """int8_conv1x1(q, s, wq, ws, b, r, act, dt) -> act(conv(dq(q, s), dq_w(wq, ws), b)) + r"""
    q, s, wq, ws, b, r, act, dtype = node.args
    w = _dq_weight(wq, ws, dtype)
    if _val(wq).dim() == 2:  # a GEMM weight [N, K]: the convolution takes [N, K, 1, 1]
        w = Call(aten.reshape.default, (w, [*_val(wq).shape, 1, 1]))
    conv = (_dq_activation(q, s, dtype), w, b, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
    return Match([node], _act_then_residual(Call(aten.convolution.default, conv), act, r))


def _quantize_node(node: Node) -> Match:
    """graphopt.quantize_per_tensor(x, s) -> quantized_decomposed.quantize_per_tensor(x, s)"""
    x, scale = node.args
    return Match([node], _quantize(x, scale, _grid_for(node)))


def _dequantize_node(node: Node) -> Match:
    """graphopt.dequantize_per_tensor(q, s, dt) -> quantized_decomposed.dequantize_per_tensor"""
    q, scale, dtype = node.args
    return Match([node], _dq(q, scale, dtype, _grid_of(q)))


def _dequantize_channel_node(node: Node) -> Match:
    """graphopt.dequantize_per_channel(q, ss, axis, dt) -> quantized_decomposed's, zero points 0"""
    q, scales, axis, dtype = node.args
    return Match([node], _dq_weight(q, scales, dtype, axis))


def _norm_quant(node: Node) -> Match:
    """norm_quant(x, w, b, eps, kind, s) -> quantize(norm(x, w, b, eps, kind), s)"""
    x, w, b, eps, kind, scale = node.args
    norm = Call(IMPLS["norm"].reference, (x, w, b, eps, kind))
    return Match([node], _quantize(norm, scale, _grid_for(node)))


def _int8_dynamic(node: Node) -> Match | str:
    """int8_linear_dynamic(x, wq, ws, b, r, act)
    -> act(linear(dq(q_tok(x), 1), dq_w(wq, ws)) * s_tok(x) + b) + r"""
    x, wq, ws, b, r, act = node.args
    if _val(x).dtype != torch.float32:
        return "activations are not float32"
    # per token: s = amax|x| / 127 (graphopt's reference), x quantized on the uint8 grid; the
    # layer runs at unit activation scale and the token's scale multiplies its output
    amax = Call(aten.amax.default, (Call(aten.abs.default, (x,)), [-1], True))
    scale = Call(aten.div.Tensor, (Call(aten.clamp_min.default, (amax, 1e-12)), QMAX))
    rounded = Call(aten.round.default, (Call(aten.div.Tensor, (x, scale)),))
    shifted = Call(aten.clamp.default, (Call(aten.add.Tensor, (rounded, 128)), 1, 255))
    q = _to(shifted, torch.uint8)
    y = Call(aten.linear.default, (_dq(q, 1.0, torch.float32, UINT8), _dq_weight(wq, ws)))
    y = Call(aten.mul.Tensor, (y, scale))
    y = y if b is None else Call(aten.add.Tensor, (y, b))
    return Match([node], _act_then_residual(y, act, r))


def _w8a16(node: Node) -> Match:
    """w8a16_linear(x, wq, ws, b, r, act) -> act(linear(x, wq * ws[:, None], b)) + r  (folded)"""
    x, wq, ws, b, r, act = node.args
    dtype = _val(x).dtype
    scales = Call(aten.unsqueeze.default, (_to(ws, dtype), 1))
    w = Call(aten.mul.Tensor, (_to(wq, dtype), scales))
    return Match([node], _act_then_residual(Call(aten.linear.default, (x, w, b)), act, r))


INT8_RULES = [
    Rule(QDQ, (go.int8_linear.default,), _int8_linear),  # -> linear(dq(q), dq_w(wq), b)
    Rule(QDQ, (go.int8_linear_requant.default,), _int8_requant),  # -> q(linear(dq(q), dq_w))
    Rule(QDQ, (go.int8_conv1x1.default,), _int8_conv1x1),  # -> conv(dq(q), dq_w(wq), b)
    Rule(QDQ, (go.quantize_per_tensor.default,), _quantize_node),  # -> qd.quantize_per_tensor
    Rule(QDQ, (go.dequantize_per_tensor.default,), _dequantize_node),  # -> qd.dequantize
    Rule(QDQ, (go.dequantize_per_channel.default,), _dequantize_channel_node),  # -> qd.dq_channel
    Rule(QDQ, (go.norm_quant.default,), _norm_quant),  # norm_quant -> q(norm(x))
    Rule(DYNAMIC, (go.int8_linear_dynamic.default,), _int8_dynamic),  # -> linear(dq(q_tok(x)))
    Rule(QDQ, (go.w8a16_linear.default,), _w8a16),  # w8a16_linear -> linear(x, wq * ws)
]


# graphopt's int8 grid as quantized_decomposed's (zero point, min, max, dtype), and the same
# grid shifted into uint8
INT8 = (0, -QMAX, QMAX, torch.int8)
UINT8 = (128, 128 - QMAX, 128 + QMAX, torch.uint8)
# the graphopt ops that read a quantized activation (argument 0) and dequantize it here
READS_QUANTIZED = (
    go.int8_linear.default,
    go.int8_linear_requant.default,
    go.int8_conv1x1.default,
    go.dequantize_per_tensor.default,
)


def _grid_for(node: Node) -> tuple[Any, ...]:
    """The grid ``node`` quantizes to: uint8 where only int8 layers (and dequantizes) read it."""
    readers = [u for u in node.users if u.target in READS_QUANTIZED and u.args[0] is node]
    return UINT8 if len(readers) == len(node.users) else INT8


def _grid_of(q: Node) -> tuple[Any, ...]:
    return UINT8 if _val(q).dtype == torch.uint8 else INT8


def _quantize(x: Any, scale: Any, grid: tuple[Any, ...]) -> Call:
    return Call(qd.quantize_per_tensor.default, (x, scale, *grid))


def _dq(q: Any, scale: Any, dtype: torch.dtype, grid: tuple[Any, ...]) -> Call:
    """Per-tensor dequantize to ``dtype`` (Inductor's int8-mixed-bf16 form: float32, then a
    conversion)."""
    x = Call(qd.dequantize_per_tensor.default, (q, scale, *grid))
    return x if dtype == torch.float32 else _to(x, dtype)


def _dq_activation(q: Node, scale: Any, dtype: torch.dtype = torch.float32) -> Call:
    """An int8 layer's input dequantized, as uint8 (shifted by 128 if it came as int8)."""
    if _grid_of(q) == INT8:  # something else reads it as int8 too: shift it here, exactly
        wide = Call(aten.add.Tensor, (_to(q, torch.int16), 128))
        return _dq(_to(wide, torch.uint8), scale, dtype, UINT8)
    return _dq(q, scale, dtype, UINT8)


def _dq_weight(wq: Node, ws: Node, dtype: torch.dtype = torch.float32, axis: int = 0) -> Call:
    """Per-channel dequantize of an int8 weight (zero points 0, a stored tensor as the
    pattern requires) to ``dtype``."""
    zero = Const(torch.zeros(_val(wq).shape[axis], dtype=torch.int64), hint="w_zero_point")
    scales = ws if _val(ws).dtype == torch.float32 else _to(ws, torch.float32)
    w = Call(qd.dequantize_per_channel.default, (wq, scales, zero, axis, -QMAX, QMAX, torch.int8))
    return w if dtype == torch.float32 else _to(w, dtype)


def _to(x: Any, dtype: torch.dtype) -> Call:
    return Call(aten._to_copy.default, (x,), {"dtype": dtype})


# -- float ops: the canonical ATen forms --------------------------------------------------------


def _linear(node: Node) -> Match:
    """graphopt.linear(x, w, b, r, act, alpha) -> act(linear(x, w, b)) + r  (alpha 1)"""
    x, w, b, r, act, alpha = node.args
    if alpha == 1.0:
        y = Call(aten.linear.default, (x, w, b))
    else:
        y = Call(aten.mul.Tensor, (Call(aten.linear.default, (x, w)), alpha))
        y = y if b is None else Call(aten.add.Tensor, (y, b))
    return Match([node], _act_then_residual(y, act, r))


def _conv(node: Node) -> Match:
    """graphopt.conv(x, w, b, r, stride, pad, dil, groups, act) -> act(convolution(..) + r)"""
    x, w, b, r, stride, padding, dilation, groups, act = node.args
    n = len(stride)
    y = Call(aten.convolution.default, (x, w, b, stride, padding, dilation, False, [0] * n, groups))
    y = y if r is None else Call(aten.add.Tensor, (y, r))
    return Match([node], _activation(y, act))


def _inline_fused(node: Node, rw: Rewriter) -> bool:
    """fused(xs, program) -> the program's ATen calls, each output replacing its getitem"""
    if any(u.target is not operator.getitem for u in node.users):
        return False
    xs, text = node.args
    program = program_of(text)
    values: list[Any] = []

    def get(a: Any) -> Any:
        if isinstance(a, Ref):
            if a.kind == "in":
                return xs[a.index]
            if a.kind == "node":
                return values[a.index]
            return rw.call(operator.getitem, (values[a.index], a.item), before=node, sources=[node])
        if isinstance(a, tuple):
            return [get(v) for v in a]
        return a

    for call in program.calls:
        args = tuple(get(a) for a in call.args)
        kwargs = {k: get(v) for k, v in call.kwargs}
        values.append(rw.call(call.overload, args, kwargs, before=node, sources=[node]))
    outputs = [get(ref) for ref in program.outputs]
    for user in list(node.users):
        out = outputs[user.args[1]]
        if not isinstance(out, Node) or out.op != "call_function":  # an input: a fresh copy
            out = rw.call(aten.clone.default, (out,), before=node, sources=[node])
        rw.replace(user, out)  # the last one erases the fused call too
    if not node._erased:  # a call nothing read
        rw.gm.graph.erase_node(node)
    return rw.applied(INLINED)


FLOAT_RULES: list[Rule | EditRule] = [
    Rule(FLOAT, (go.linear.default,), _linear),  # graphopt.linear -> act(linear(x, w, b)) + r
    Rule(FLOAT, (go.conv.default,), _conv),  # graphopt.conv -> act(convolution(x, w, b) + r)
    ((go.fused.default,), _inline_fused),  # fused(xs, program) -> the program's ATen calls
]


def _act_then_residual(y: Any, act: str, r: Any) -> Any:
    y = _activation(y, act)
    return y if r is None else Call(aten.add.Tensor, (y, r))


def _activation(y: Any, act: str) -> Any:
    """``act`` applied to ``y`` by its ATen call (``none``: ``y`` itself)."""
    forms = ACTIVATIONS[act].aten
    if not forms:
        return y
    op, fixed = forms[0]
    return Call(op, (y,), dict(fixed))


# -- every op: its reference; on CUDA, its Triton kernel as a triton_op -------------------------


def _reference(node: Node) -> Match:
    """graphopt.<op>(..) -> <op>'s ATen reference (plain Python: export traces through it)"""
    return Match([node], Call(IMPLS[_op_name(node)].reference, node.args, dict(node.kwargs)))


def _ops_with_kernels() -> tuple[Any, ...]:
    return tuple(GRAPHOPT_OPS[name] for name, impl in IMPLS.items() if impl.kernel is not None)


def _triton_twin(node: Node) -> Match | str:
    """graphopt.<op>(..) -> graphopt_triton.<op>(..), where the kernel takes the call"""
    impl = IMPLS[_op_name(node)]
    args = torch.fx.node.map_aggregate(node.args, _val_or_value)
    try:
        why = impl.why_not(*args)
    except Exception as exc:  # a check that cannot judge shapes alone: keep the reference
        why = f"{type(exc).__name__} while checking the kernel"
    if why is not None:
        return why
    if not kernel_traces(impl.kernel, args):
        return (
            "the kernel does not launch through torch.library.wrap_triton: Inductor cannot trace it"
        )
    return Match([node], Call(triton_twin(impl.name), node.args, dict(node.kwargs)))


def kernel_traces(kernel: Any, fake_args: Any) -> bool:
    """Whether ``kernel`` runs on fake tensors, as Inductor traces a triton_op: its launches go
    through ``torch.library.wrap_triton`` (a raw launch reads the fake tensors' memory)."""
    from torch._guards import detect_fake_mode

    tensors = [a for a in torch.utils._pytree.tree_leaves(fake_args) if isinstance(a, torch.Tensor)]
    mode = detect_fake_mode(tensors)
    if mode is None:
        return False
    try:
        with mode:
            kernel(*fake_args)
    except Exception:  # whatever a raw launch raises on a fake tensor
        return False
    return True


def _op_name(node: Node) -> str:
    return node.target._schema.name.split("::", 1)[1]


def _val(node: Any) -> Any:
    return node.meta["val"]


def _val_or_value(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, Node) else a
