"""precision: lower an fp32 graph to fp16 or bf16; reductions and norms keep accumulating in fp32."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_aggregate

from graphopt.errors import PipelineError
from graphopt.ir.graph import attr_path, tensor_val
from graphopt.ir.rewriter import Rewriter
from graphopt.ir.state import effects, is_stateful
from graphopt.pipeline.passes import Pass, PassContext, PassResult, option, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
F32 = torch.float32

DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16"}

# Reductions and norms (ATen op names): they read their inputs cast up to fp32, accumulate in
# fp32, and their result is cast down where a half op reads it.
ACCUMULATE_FP32 = frozenset(
    {
        "sum", "nansum", "mean", "nanmean", "prod", "var", "var_mean", "std", "std_mean",
        "softmax", "_softmax", "_safe_softmax", "log_softmax", "_log_softmax", "logsumexp",
        "cumsum", "cumprod", "logcumsumexp", "norm", "linalg_vector_norm", "frobenius_norm",
        "renorm", "_weight_norm", "cosine_similarity", "dist", "trace",
        "layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm",
        "batch_norm", "native_batch_norm", "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training", "_batch_norm_with_update",
        "_batch_norm_no_update", "group_norm", "native_group_norm", "instance_norm",
        "nll_loss", "mse_loss", "kl_div", "cross_entropy_loss", "binary_cross_entropy",
    }
)  # fmt: skip

# Ops torch has no float16/bfloat16 kernel for on any device, and those it lacks on the CPU
# (checked with torch 2.13: conv, linear, matmul, pooling, norms and activations all have one).
NO_HALF_PREFIXES = ("linalg_", "_linalg_", "fft_", "_fft_")
NO_HALF_ON_CPU = frozenset(
    {"cdist", "_cdist_forward", "pdist", "_pdist_forward", "avg_pool3d", "polar"}
)
BITCASTS = frozenset({aten.view.dtype})  # a dtype argument that reinterprets bits


def _op_name(node: Node) -> str:
    packet = getattr(node.target, "overloadpacket", None)
    return packet.__name__ if packet is not None else getattr(node.target, "__name__", "")


def _tensor_vals(node: Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


def _creates_fp32(node: Node) -> bool:
    """Does the node name float32 as a dtype argument (to.dtype, _to_copy, arange, full, ...)?"""
    found = False

    def look(a: Any) -> Any:
        nonlocal found
        found |= isinstance(a, torch.dtype) and a == F32
        return a

    map_aggregate((node.args, node.kwargs), look)
    return found


class _Lowering:
    """One walk over the graph in order, retyping one op per rewrite.

    Every rewrite keeps the graph well typed: a node lowered to half is replaced by
    ``_to_copy(half_node, float32)`` (its *widening*), so its users still see fp32. Later users
    that are lowered themselves read the half node through the widening; ops that stay fp32
    (reductions, norms) read the widening itself, which is exactly their up-cast; the graph
    outputs read it, which is the cast back to the model's output dtype. Widenings nobody reads
    any more are erased by the rewriter with the last user they had.
    """

    def __init__(
        self, gm: GraphModule, rw: Rewriter, dtype: torch.dtype, keep: frozenset[str], target: str
    ) -> None:
        self.gm, self.rw, self.dtype, self.keep, self.target = gm, rw, dtype, keep, target
        self.half_of: dict[Node, Node] = {}  # widening -> the half node it widens
        self.casts: dict[tuple[Node, torch.dtype], Node] = {}  # (value, dtype) -> its cast
        self.last_input_cast: Node | None = None
        self.new_casts: list[Node] = []  # every _to_copy this pass inserted
        self.weights = 0

    # -- which ops go to half ------------------------------------------------------------
    def plan(self, node: Node) -> tuple[str, str]:
        """("half" | "fp32" | "skip", why it stays fp32)."""
        vals = _tensor_vals(node)
        if node.op != "call_function" or node.target is operator.getitem or not vals:
            return "skip", ""
        if not node.users:
            return "skip", ""  # dead: dce's business
        if any(v.is_floating_point() and v.dtype != F32 for v in vals):
            return "skip", ""  # float64 (or already half) results are the user's choice
        name = _op_name(node)
        if node.target in BITCASTS:
            return "fp32", "its dtype argument reinterprets bits"
        if name in ACCUMULATE_FP32:
            return "fp32", ""
        if name in self.keep:
            return "fp32", "kept in fp32 by the keep_fp32 option"
        if name.startswith(NO_HALF_PREFIXES):
            return "fp32", f"torch has no {self.dtype} kernel for {name}"
        if self.target == "cpu" and name in NO_HALF_ON_CPU:
            return "fp32", f"torch {torch.__version__} has no CPU {self.dtype} kernel for {name}"
        if not isinstance(node.meta["val"], torch.Tensor) and any(
            u.target is not operator.getitem for u in node.users
        ):
            return "fp32", "multi-output op read other than through getitem"
        if _creates_fp32(node) and all(self._reads_fp32(u) for u in node.users):
            return "fp32", "creates float32 values that only fp32 ops or outputs read"
        return "half", ""

    def _reads_fp32(self, user: Node) -> bool:
        return user.op == "output" or self.plan(user)[0] == "fp32"

    # -- casts -----------------------------------------------------------------------------
    def as_dtype(self, value: Node, dtype: torch.dtype, user: Node) -> Node:
        """``value`` as ``dtype``, for ``user``: the half node behind a widening, a half copy of
        a weight, or one cast shared by every user."""
        base = self.half_of.get(value, value)
        val = tensor_val(base)
        if val is None or val.dtype == dtype:
            return base
        key = (base, dtype)
        if key not in self.casts:
            self.casts[key] = self._new_cast(base, dtype, user)
        return self.casts[key]

    def _new_cast(self, base: Node, dtype: torch.dtype, user: Node) -> Node:
        if base.op == "get_attr":  # a half copy of the weight; the user's tensor is untouched
            self.weights += 1
            value = attr_path(self.gm, str(base.target)).detach().to(dtype)
            hint = f"{base.target}_{_SHORT.get(dtype, str(dtype))}"
            return self.rw.constant(value, hint=hint, sources=[base])
        before = user
        if base.op == "placeholder":  # graph inputs are cast once, at the top, in input order
            before = self.last_input_cast.next if self.last_input_cast else self._first_op()
        cast = self.rw.call(
            aten._to_copy.default, (base,), {"dtype": dtype}, before=before, sources=[base]
        )
        if base.op == "placeholder":
            self.last_input_cast = cast
        self.new_casts.append(cast)
        return cast

    def _first_op(self) -> Node:
        return next(n for n in self.gm.graph.nodes if n.op not in ("placeholder", "get_attr"))

    def widen(self, new: Node, dtype: torch.dtype, old: Node) -> Node:
        """``new`` in the dtype ``old`` had, so that ``old``'s users may read it unchanged."""
        val = tensor_val(new)
        if val is None or val.dtype == dtype:
            return new
        back = self.rw.call(
            aten._to_copy.default, (new,), {"dtype": dtype}, before=old, sources=[old]
        )
        self.half_of[back] = new
        self.casts[(new, dtype)] = back
        self.new_casts.append(back)
        return back

    # -- the rewrite -----------------------------------------------------------------------
    def lower(self, node: Node) -> bool:
        """op(fp32 args) -> widen(op(half args)): fp32 values read as half, float32 dtype
        arguments become the half dtype. False when nothing about the op changes."""
        changed = False

        def arg(a: Any) -> Any:
            nonlocal changed
            if isinstance(a, Node):
                val = tensor_val(a)
                if val is None or val.dtype != F32:
                    return a
                changed = True
                return self.as_dtype(a, self.dtype, node)
            if isinstance(a, torch.dtype) and a == F32:
                changed = True
                return self.dtype
            return a

        args, kwargs = map_aggregate(node.args, arg), map_aggregate(node.kwargs, arg)
        if not changed:
            return False
        new = self.rw.call(node.target, args, kwargs, before=node, sources=[node])
        old = node.meta["val"]
        if isinstance(old, torch.Tensor):
            self.rw.replace(node, self.widen(new, old.dtype, node))
            return True
        for item in list(node.users):  # a multi-output op: plan() checked these are getitems
            if not self.rw.allowed():
                break
            new_item = self.rw.call(
                operator.getitem, (new, *item.args[1:]), before=item, sources=[item]
            )
            self.rw.replace(item, self.widen(new_item, tensor_val(item).dtype, item))
        return True

    def run(self) -> None:
        mutating = next((n for n in self.gm.graph.nodes if _mutates(n)), None)
        if mutating is not None:
            self.rw.missed("half", mutating, "the graph writes a tensor in place; not lowered")
            return
        if is_stateful(self.gm):  # verification sees one call; the drift would build up over many
            written = ", ".join(f"{kind} {target}" for kind, target in effects(self.gm))
            self.rw.missed(
                "half",
                self.gm.graph.output_node(),
                f"the graph updates state on every call ({written}); in half precision the "
                "rounding would build up from call to call; not lowered",
            )
            return
        for node in list(self.gm.graph.nodes):
            if node._erased or node.op != "call_function":
                continue
            if not self.rw.allowed():
                return
            mode, why = self.plan(node)
            if mode == "fp32" and not why:
                self.rw.applied("fp32-accumulate")
            elif mode == "fp32":
                self.rw.missed("half", node, why)
            elif mode == "half" and self.lower(node):
                self.rw.applied("half")


def _mutates(node: Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _parse_keep(text: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in text.replace("+", ",").split(",") if n.strip())
    unknown = sorted(n for n in names if not hasattr(aten, n))
    if unknown:
        raise PipelineError(
            f"precision: keep_fp32 names {', '.join(map(repr, unknown))}, not ATen ops; name "
            "ops as the graph does, joined by '+': precision{keep_fp32=gelu+softmax}"
        )
    return names


@register_pass
@dataclass(frozen=True)
class Precision(Pass):
    """Lower an fp32 graph to ``dtype`` (fp16 or bf16) behind an unchanged fp32 interface.

    * Floating graph inputs are cast to ``dtype`` once, at the top; every fp32 weight read by a
      half op gets a half copy (``rw.constant``; the model's own tensors stay fp32).
    * Ops compute in ``dtype`` (matmul, linear, conv, pointwise, ...): each fp32 value they read
      is read as half, and a ``float32`` dtype argument (``to``, ``_to_copy``, ``arange``,
      ``full``, ``zeros``, ...) becomes ``dtype`` unless only fp32 ops or outputs read the value.
    * Reductions and norms (sum, mean, var, softmax, log_softmax, layer/rms/batch/group norm,
      cumsum, ... : ``ACCUMULATE_FP32``) stay fp32: their inputs are cast up, their result down.
      Norm weights are read in fp32. So do the ops in ``keep_fp32`` (ATen names joined by ``+``),
      ops torch has no half kernel for, and, with ``target="cpu"``, those it has none for on the
      CPU (``NO_HALF_ON_CPU``); each is a near miss of rule ``half`` with the reason.
    * Graph outputs are cast back to their dtype (fp32): inputs, outputs, shapes and dtypes of
      the graph do not change. Integer and bool values are untouched; float64 values too.
    * A graph that writes tensors in place, or updates state (buffers, inputs) on every call,
      is left alone.

    before:  %y = linear(%x, %w, %b); %s = softmax(%y, -1)                     : f32
    after:   %xh = _to_copy(%x, dtype=f16); %yh = linear(%xh, %w_fp16, %b_fp16) : f16
             %y = _to_copy(%yh, dtype=f32); %s = softmax(%y, -1)               : f32

    Not a rule table: every op is rewritten (all of them, not those matching a pattern), and
    how a value is read depends on how its producer was lowered earlier in the same walk (the
    casts it shares with other users, the half node behind a widening): one stateful walk.

    Contract: ``rounding`` judged with the floor of the compute dtype (``Contract.rounding(
    dtype)``: rel_max error <= max(2 x the error before, 2e-3 for fp16, 1.6e-2 for bf16)), or,
    with ``min_cosine`` > 0, ``lossy(cosine >= min_cosine)`` for deep models whose error grows
    past the floor. Measured numbers and the reasons are in docs/precision.md.
    """

    name = "precision"
    contract = Contract.rounding(torch.float16)  # of the defaults; contract_for() reads options
    runs_after = ("fold-bn",)  # fold batch norms while the weights are still fp32
    # a fused group's program is opaque to this pass: lower precision first, then fuse
    runs_before = ("fuse-epilogue", "fuse-kernels", "fuse-pointwise")

    dtype: str = "fp16"
    keep_fp32: str = ""
    min_cosine: float = option(0.0, low=0.0, high=1.0)

    def check(self) -> None:
        if self.dtype.lower() not in DTYPES:  # any case: fp16, FP16, bf16, ...
            raise PipelineError(
                f"precision{{dtype={self.dtype}}}: {self.dtype!r} is not a half-precision dtype; "
                f"valid values: {', '.join(DTYPES)} (e.g. precision{{dtype=bf16}})"
            )
        _parse_keep(self.keep_fp32)

    @property
    def half(self) -> torch.dtype:
        return DTYPES[self.dtype.lower()]

    def contract_for(self) -> Contract:
        if self.min_cosine > 0:
            return Contract.lossy("cosine", self.min_cosine)
        return Contract.rounding(self.half)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        lowering = _Lowering(gm, rw, self.half, _parse_keep(self.keep_fp32), ctx.target)
        lowering.run()
        rules = rw.rules
        stats = {
            "half_ops": rules["half"].applied if "half" in rules else 0,
            "fp32_ops": rules["fp32-accumulate"].applied if "fp32-accumulate" in rules else 0,
            "casts": sum(not n._erased for n in lowering.new_casts),
            "half_weights": lowering.weights,
        }
        return PassResult(rw.rewrites > 0, stats)
