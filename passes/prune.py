"""prune: zero weights by magnitude (unstructured), in the 2:4 pattern, or drop whole channels.

Every kind writes its result as NEW weight tensors (``rw.constant``) and rebuilds the layer call
on them; the user's tensors are never touched. The zeros are exact float zeros, so they survive
an ONNX export (where a sparse runtime or a compressor can use them)::

    before:  %y = linear(%x, %w, %b)
    after:   %y = linear(%x, %w_pruned, %b)                  # unstructured; 2:4 on the CPU
             %y = graphopt.sparse24_linear(%x, %w_pruned, %b)  # 2:4, fp16/bf16 weights on CUDA

* ``kind=unstructured``: in linear layers and (non-transposed) convolutions, zero the
  ``round(amount * n)`` weights of smallest magnitude (``round``: half up), per layer
  (``scope=layer``: every layer ends at exactly that sparsity, plus any zeros it already had) or
  over all prunable weights together (``scope=global``: one threshold, so layers with small
  weights lose more). Ties go in flat order, the earlier weight first. A dense GEMM is no
  faster with zeros in it: this is about model size and exportable zeros, not speed, so it is
  never measured.
* ``kind=2:4``: linear layers whose input dim K is divisible by 4 keep the 2 largest-|w| of
  every 4 consecutive weights along K (ties: the earlier weight is kept); ``amount`` and
  ``scope`` do not apply. fp16/bf16 weights on CUDA run on the semi-structured sparse GEMM
  (``graphopt/ops/sparse.py``); elsewhere the layer stays a dense ``linear`` with the zeros and
  the pass warns once per compile.
* ``kind=channel``: structured pruning of whole output channels by ``importance``
  (l1 | bn_gamma | taylor), delegated to ``graphopt.passes.lib.prune_channels``, which edits the
  graph through the same rewriter and measures its own dependency groups.

``measure=true`` (2:4): each pruned layer is timed against its dense form on the target, as
the compiled model runs it (``graphopt.ops.autotune.why_not_faster``, the one "keep only what
measures faster" policy), and a layer that is not faster keeps its dense weight: its row says ``reverted`` and why. So on the CPU, 2:4 layers are reverted
unless ``measure=false``, which keeps the zeros (for an export).

``stats["layers"]`` has one row per layer the pass considered, keys in the order of ``ROW_KEYS``;
the numbers describe the graph after the pass (a reverted or skipped layer: its dense weight).
``params_*`` count nonzero weights and ``flops_*`` the nonzero multiply-adds (x2) of one call at
the example input shapes (channel rows: element counts, from ``prune_channels``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
import graphopt.ops.sparse  # noqa: F401  (registers graphopt::sparse24_linear)
from graphopt.errors import PipelineError
from graphopt.ir.graph import attr_path, snapshot
from graphopt.ir.rewriter import Rewriter
from graphopt.pipeline.passes import Pass, PassContext, PassResult, option, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt

RULE = "prune"
KINDS = ("unstructured", "channel", "2:4")
SCOPES = ("layer", "global")
IMPORTANCES = ("l1", "bn_gamma", "taylor")
ROW_KEYS = (
    "layer",
    "kind",
    "sparsity",
    "params_before",
    "params_after",
    "flops_before",
    "flops_after",
    "status",
    "why",
)

LINEARS = (aten.linear.default, go.linear.default)
CONVS = (
    aten.conv1d.default,
    aten.conv2d.default,
    aten.conv3d.default,
    aten.conv1d.padding,
    aten.conv2d.padding,
    aten.conv3d.padding,
    aten.convolution.default,
    go.conv.default,
)
CPU_WARNING = "prune{kind=2:4}: 2:4 sparsity stays dense on the CPU (no sparse GEMM there)"


@dataclass
class Layer:
    """One prunable layer: the call, its stored weight, and what the pass decided."""

    node: Node
    weight: Tensor
    new: Tensor | None = None  # the pruned weight
    status: str = "pruned"
    why: str = ""
    lowered: bool = False  # 2:4 on the sparse GEMM


# -- masks: which weights stay ---------------------------------------------------------------------


def magnitude_masks(weights: Sequence[Tensor], amount: float) -> list[Tensor]:
    """Keep-masks that drop the ``floor(amount * n + 0.5)`` smallest |w| over all ``weights``
    together (n: their total size); ties go in flat order, the earlier weight first."""
    flat = torch.cat([w.detach().abs().flatten().double().cpu() for w in weights])
    k = int(amount * flat.numel() + 0.5)
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.argsort(flat, stable=True)[:k]] = False
    parts = keep.split([w.numel() for w in weights])
    return [m.reshape(w.shape).to(w.device) for m, w in zip(parts, weights)]


def mask_2_4(w: Tensor) -> Tensor:
    """Keep-mask of the 2 largest |w| in every 4 consecutive weights of the last dim (which must
    divide by 4); on ties the earlier weight is kept."""
    groups = w.detach().abs().reshape(*w.shape[:-1], -1, 4)
    order = torch.argsort(groups, dim=-1, descending=True, stable=True)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=w.device)
    return keep.scatter_(-1, order[..., :2], True).reshape(w.shape)


def apply_mask(w: Tensor, keep: Tensor) -> Tensor:
    """A new tensor: ``w`` with exact +0.0 where ``keep`` is False."""
    return w.detach().masked_fill(~keep, 0.0)


# -- the pass ----------------------------------------------------------------------------------------


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Prune weights within the user's cosine budget (see the module docstring).

    Options: ``kind`` (unstructured | channel | 2:4), ``amount`` (the fraction to remove, in
    [0, 1)), ``scope`` (layer | global, unstructured), ``importance`` (l1 | bn_gamma | taylor,
    channel), ``min_cosine`` (the budget on every output), ``measure`` (2:4: keep a layer pruned
    only where it measures faster on the target).
    """

    name = "prune"
    contract = Contract.lossy("cosine", 0.9)
    kind: str = option("unstructured", choices=KINDS)
    amount: float = option(0.5, low=0.0, high=1.0, high_open=True)
    scope: str = option("layer", choices=SCOPES)
    importance: str = option("l1", choices=IMPORTANCES)
    min_cosine: float = option(0.9, low=0.0, high=1.0)
    measure: bool = True

    def contract_for(self) -> Contract:
        return Contract.lossy("cosine", self.min_cosine)

    def check(self) -> None:
        if self.kind == "channel":
            _prune_channels()  # a missing analysis fails when the pipeline is parsed

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        if self.kind == "channel":
            rows = self._channels(gm, rw, ctx)
        else:
            layers, skipped = self._find_layers(gm, rw)
            self._plan(layers)
            if self.kind == "2:4" and self.measure and layers:
                self._measure(gm, layers, ctx.inputs)
            self._rewrite(layers, rw)
            rows = [_row(layer, self.kind) for layer in layers] + skipped
            if any(layer.status == "pruned" and not layer.lowered for layer in layers):
                if self.kind == "2:4":
                    warnings.warn(CPU_WARNING, stacklevel=2)
        totals = {
            key: sum(row[key] for row in rows if isinstance(row.get(key), int))
            for key in ("params_before", "params_after")
        }
        pruned = sum(row["status"] == "pruned" for row in rows)
        # a reverted channel pruning reports no change: the pass manager keeps the dense graph
        changed = rw.rewrites > 0 and pruned > 0
        return PassResult(changed, {"layers": rows, **totals, "pruned layers": pruned})

    # -- steps -------------------------------------------------------------------------------
    def _find_layers(self, gm: GraphModule, rw: Rewriter) -> tuple[list[Layer], list[dict]]:
        """The prunable layers, and a "skipped" row (and near miss) for each one that is not."""
        layers: list[Layer] = []
        skipped: list[dict[str, Any]] = []
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in LINEARS + CONVS:
                continue
            found = self._layer(node, gm)
            if isinstance(found, Layer):
                layers.append(found)
                continue
            rw.missed(RULE, node, found)
            row = dict.fromkeys(ROW_KEYS)
            row.update(layer=node.name, kind=self.kind, status="skipped", why=found)
            skipped.append(row)
        return layers, skipped

    def _layer(self, node: Node, gm: GraphModule) -> Layer | str:
        """The layer at ``node`` or why it cannot be pruned."""
        if self.kind == "2:4" and node.target not in LINEARS:
            return "2:4 sparsity covers linear layers only"
        if node.target == aten.convolution.default and node.args[6]:
            return "transposed convolutions are not pruned"
        w_node = node.args[1] if len(node.args) > 1 else None
        if not (isinstance(w_node, Node) and w_node.op == "get_attr"):
            return "the weight is computed in the graph, not a stored tensor"
        w = attr_path(gm, str(w_node.target))
        if not (isinstance(w, Tensor) and w.is_floating_point()):
            return "the weight is not a float tensor"
        if self.kind == "2:4" and (w.dim() != 2 or w.shape[1] % 4):
            return f"weight {list(w.shape)}: 2:4 needs the input dim K divisible by 4"
        return Layer(node, w)

    def _plan(self, layers: list[Layer]) -> None:
        """Compute every layer's pruned weight (no graph edits yet)."""
        if self.kind == "2:4":
            for layer in layers:
                layer.new = apply_mask(layer.weight, mask_2_4(layer.weight))
                layer.lowered = _lowers(layer)
            return
        # a weight shared by two layers is one set of numbers: count it once, mask it once
        unique = list({id(layer.weight): layer.weight for layer in layers}.values())
        if self.scope == "global":
            masks = dict(zip(map(id, unique), magnitude_masks(unique, self.amount)))
        else:
            masks = {id(w): magnitude_masks([w], self.amount)[0] for w in unique}
        for layer in layers:
            layer.new = apply_mask(layer.weight, masks[id(layer.weight)])

    def _measure(self, gm: GraphModule, layers: list[Layer], inputs: list[Any]) -> None:
        """Revert (keep dense) every 2:4 layer that does not measure faster than dense."""
        from graphopt.verification.interpreter import native_run

        _, values = native_run(gm, inputs, record=True)
        for layer in layers:
            why = _slower(layer, values)
            if why is not None:
                layer.status, layer.why, layer.lowered = "reverted", why, False

    def _rewrite(self, layers: list[Layer], rw: Rewriter) -> None:
        for layer in layers:
            if layer.status != "pruned":
                rw.missed(RULE, layer.node, layer.why)
                continue
            if not rw.allowed():
                layer.status, layer.why, layer.lowered = "skipped", "max_rewrites reached", False
                continue
            _rebuild(layer, rw)
            rw.applied(RULE)

    def _channels(self, gm: GraphModule, rw: Rewriter, ctx: PassContext) -> list[dict]:
        """Structured pruning: ``prune_channels`` edits the graph. With ``measure``, the pruned
        graph must run faster than the dense one on the example inputs (the groups are applied
        together, so they are kept or reverted together)."""
        dense = snapshot(gm) if self.measure else None
        rows = [
            _ordered(row)
            for row in _prune_channels()(
                gm, rw, amount=self.amount, importance=self.importance, inputs=ctx.inputs
            )
        ]
        if dense is not None and any(row["status"] == "pruned" for row in rows):
            rw.finish()
            why = _slower_graph(dense, gm, ctx.inputs)
            if why is not None:
                for row in rows:
                    if row["status"] == "pruned":
                        row["status"], row["why"] = "reverted", why
        return rows


# -- helpers -------------------------------------------------------------------------------------


def _slower_graph(dense: GraphModule, pruned: GraphModule, inputs: list[Any]) -> str | None:
    """Why the pruned graph is not faster than the dense one on the example inputs, or None
    (the one policy: ``why_graph_not_faster``, as a compiled model runs them)."""
    from graphopt.passes.lib.fusion import why_graph_not_faster

    why = why_graph_not_faster(dense, pruned, inputs, names=("dense", "pruned"))
    return None if why is None else f"{why} (channel groups are kept or reverted together)"


def _prune_channels() -> Callable[..., list[dict[str, Any]]]:
    """The channel pruner of ``graphopt.passes.lib.prune_channels``, imported when first needed."""
    try:
        from graphopt.passes.lib.prune_channels import prune_channels
    except ImportError:
        raise PipelineError("prune{kind=channel}: not available yet") from None
    return prune_channels  # type: ignore[no-any-return]


def _lowers(layer: Layer) -> bool:
    """Does this 2:4 layer go to the sparse GEMM (a plain linear, fp16/bf16 weight on CUDA)?"""
    from graphopt.ops.sparse import SPARSE_DTYPES

    w = layer.weight
    return (
        layer.node.target == aten.linear.default
        and w.device.type == "cuda"
        and w.dtype in SPARSE_DTYPES
    )


def _rebuild(layer: Layer, rw: Rewriter) -> None:
    """The layer's call again, on the pruned weight (and on the sparse GEMM when lowered)."""
    # before: %y = linear(%x, %w, %b)  ->  after: %y = linear(%x, %w_pruned, %b)
    assert layer.new is not None
    node = layer.node
    src = [node]
    w_new = rw.constant(layer.new, hint=f"{node.name}_w_pruned", sources=src)
    args = (node.args[0], w_new, *node.args[2:])
    if layer.lowered:
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        target, args, kwargs = go.sparse24_linear.default, (node.args[0], w_new, bias), {}
    else:
        target, kwargs = node.target, dict(node.kwargs)
    rw.replace(node, rw.call(target, args, kwargs, before=node, sources=src))


def _slower(layer: Layer, values: dict[str, Any]) -> str | None:
    """Why the pruned layer is not faster than the dense one on the target, or None.
    Both run as the compiled model runs them (graphopt ops without the dispatcher)."""
    from graphopt.ops.autotune import cache_key, why_not_faster
    from graphopt.ops.registry import DIRECT
    from graphopt.ops.sparse import why_not_sparse

    node = layer.node
    assert layer.new is not None

    def value(a: Any) -> Any:
        return values[a.name] if isinstance(a, Node) else a

    args = torch.fx.node.map_aggregate(node.args, value)
    kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
    dense_fn = DIRECT.get(node.target, node.target)
    x = args[0]
    pruned_args = (x, layer.new, *args[2:])
    pruned_fn: Callable[..., Any] = dense_fn
    if layer.lowered:
        pruned_fn, pruned_args, kwargs = go.sparse24_linear.default, (x, layer.new, args[2]), {}
    why = why_not_faster(
        cache_key("prune 2:4", x, layer.weight, lowered=layer.lowered),
        lambda: dense_fn(*args, **kwargs),
        lambda: pruned_fn(*pruned_args, **kwargs),
        x.device,
        names=("dense", "pruned"),
    )
    if why is None:
        return None
    reason = why_not_sparse(layer.weight)
    if reason is None and layer.lowered and _rows(x) % 8:
        reason = "padding at small shapes"  # the sparse GEMM pads the input's rows to 8
    return f"{why} ({reason})" if reason else why


def _rows(x: Tensor) -> int:
    return x.numel() // max(x.shape[-1], 1)


def _calls(node: Node) -> int:
    """Output positions per output channel of one call (M for a linear, N*H*W for a conv)."""
    from graphopt.passes.lib.fusion import concrete_shape

    out = node.meta.get("val")
    shape = concrete_shape(out) if isinstance(out, Tensor) else []
    channels = shape[-1] if node.target in LINEARS else (shape[1] if len(shape) > 1 else 1)
    numel = 1
    for d in shape:
        numel *= d
    return numel // max(channels, 1)


def _row(layer: Layer, kind: str) -> dict[str, Any]:
    """The report row of one layer: the graph after the pass (a reverted layer is dense)."""
    w_after = layer.new if layer.status == "pruned" and layer.new is not None else layer.weight
    before = int(torch.count_nonzero(layer.weight))
    after = int(torch.count_nonzero(w_after))
    positions = _calls(layer.node)
    return {
        "layer": layer.node.name,
        "kind": kind,
        "sparsity": 1.0 - after / max(w_after.numel(), 1),
        "params_before": before,
        "params_after": after,
        "flops_before": 2 * positions * before,
        "flops_after": 2 * positions * after,
        "status": layer.status,
        "why": layer.why,
    }


def _ordered(row: dict[str, Any]) -> dict[str, Any]:
    """A channel row with the common keys first (missing ones None), then its own; callables
    (e.g. a revert hook) are prune_channels' business, not the report's."""
    out = {key: row.get(key) for key in ROW_KEYS}
    out["kind"] = out["kind"] or "channel"
    out.update({k: v for k, v in row.items() if k not in out and not callable(v)})
    return out
