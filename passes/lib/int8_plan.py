"""The int8 plan: which linear layers become int8, with which scales, within the user's budget.

``passes/int8.py`` is the pass (options, plan, rewrite); this is its planning step, between the
observers (``passes/lib/calibration.py``) and the rewrite into the QDQ form:

1. ``find_layers``: the quantizable layers, ``act(x @ w.T + b) + r`` (``aten.linear``,
   ``graphopt.linear``) and 1x1 convolutions (GEMMs over channels), near misses recorded.
2. ``smooth`` (SmoothQuant, optional): move activation outliers into the weights.
3. ``calibrate_layers``: per-channel int8 weights; per-tensor activation scales from the
   calibration stream (static W8A8 only).
4. ``choose``: per-layer sensitivity on the first calibration batch (SQNR and cosine of the
   layer's int8 output against its float output, fed the same float input); layers under the
   budget, and the head / first layer when asked, stay float; an optional measurement keeps
   float what is not faster; then the whole graph, with the chosen layers computed in int8
   (``QuantRunner``, no graph edits), is held to the budget, the least accurate layer going
   back to float until it fits.

The result is the layers themselves: each has its ``precision``, its scales, its numbers and,
for a float layer, ``why``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.graph import attr_path
from graphopt.ir.rewriter import Rewriter
from graphopt.ops.fused import ACTIVATIONS, DIRECT
from graphopt.passes.lib.calibration import all_reduce_max, calibrate, quantize_weight_per_channel
from graphopt.verification import metrics
from graphopt.verification.interpreter import Runner, native_run

aten = torch.ops.aten
go = torch.ops.graphopt

RULE = "int8"
CONVS = (aten.conv2d.default, go.conv.default)

# why a layer is not faster in int8 on the target (None: it is); see Int8._slower
Slower = Callable[["Layer", dict[str, Any]], "str | None"]


@dataclass
class Layer:
    """One quantizable linear: ``act(alpha * x @ w.T + b) + r``."""

    node: Node
    x: Node
    w: torch.Tensor
    b: Any
    r: Any
    act: str
    # filled in by the plan
    w_q: torch.Tensor | None = None
    w_scale: torch.Tensor | None = None
    x_scale: float | None = None
    sqnr: float | None = None
    cosine: float | None = None
    precision: str = "float"
    why: str = ""
    conv: bool = False  # a 1x1 convolution, computed as a GEMM over channels

    def row(self) -> dict[str, Any]:
        """The layer's line in the report's per-layer table."""
        return {
            "layer": self.node.name,
            "precision": self.precision,
            "sqnr_db": self.sqnr,
            "cosine": self.cosine,
            "why": self.why,
        }


# -- 1. the layers --------------------------------------------------------------------------------


def layer_at(node: Node, gm: GraphModule) -> Layer | str | None:
    """The layer at ``node``, a near-miss reason, or None when ``node`` is no linear."""
    if node.target == aten.linear.default:
        x, w_node = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        r, act, alpha = None, "none", 1.0
    elif node.target == go.linear.default:
        x, w_node, b, r, act, alpha = node.args
    elif node.target in CONVS:
        return _conv1x1(node, gm)
    else:
        return None
    if not (isinstance(w_node, Node) and w_node.op == "get_attr"):
        return "the weight is computed in the graph, not a stored tensor"
    w = attr_path(gm, str(w_node.target))
    if w.dim() != 2 or not w.is_floating_point():
        return "the weight is not a 2-D float tensor"
    if alpha != 1.0:
        return "a GEMM scale (alpha) is not folded into int8 yet"
    if act not in ACTIVATIONS:
        return f"activation {act!r} has no int8 epilogue"
    return Layer(node, x, w, b, r, act)


def _conv1x1(node: Node, gm: GraphModule) -> Layer | str:
    """A 1x1 convolution (stride 1, no padding, one group) as a layer; else the reason."""
    if node.target == go.conv.default:
        x, w_node, b, r, stride, padding, dilation, groups, act = node.args
    else:
        args = list(node.args) + [None, [1], [0], [1], 1][len(node.args) - 2 :]
        x, w_node, b, stride, padding, dilation, groups = args[:7]
        r, act = None, "none"
    if not (isinstance(w_node, Node) and w_node.op == "get_attr"):
        return "the weight is computed in the graph, not a stored tensor"
    w = attr_path(gm, str(w_node.target))
    one = all(int(v) == 1 for v in (*list(stride), *list(dilation)))
    if w.dim() != 4 or tuple(w.shape[2:]) != (1, 1) or not one or any(padding) or groups != 1:
        return "only 1x1 convolutions (stride 1, no padding, one group) become int8 GEMMs"
    if act not in ACTIVATIONS:
        return f"activation {act!r} has no int8 epilogue"
    return Layer(node, x, w, b, r, act, conv=True)


def find_layers(gm: GraphModule, act: str, mode: str, rw: Rewriter | None) -> list[Layer]:
    """The graph's quantizable layers for ``act``/``mode`` (near misses recorded on ``rw``)."""
    layers: list[Layer] = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        found = layer_at(node, gm)
        if isinstance(found, str):
            if rw is not None:
                rw.missed(RULE, node, found)
        elif found is not None and found.conv and (act, mode) != ("static", "w8a8"):
            if rw is not None:
                rw.missed(RULE, node, "1x1 convolutions are quantized in static W8A8 only")
        elif found is not None:
            layers.append(found)
    return layers


def refresh(layer: Layer, gm: GraphModule) -> None:
    """Read the layer's inputs from its node again: earlier rewrites may have replaced them."""
    current = layer_at(layer.node, gm)
    assert isinstance(current, Layer)
    layer.x, layer.b, layer.r = current.x, current.b, current.r


# -- the layer in int8 ----------------------------------------------------------------------------


def quantized(
    layer: Layer, x: torch.Tensor, b: Any, r: Any, act: str, mode: str, *, direct: bool = False
) -> torch.Tensor:
    """The layer computed in int8 (``direct``: as compiled models call graphopt ops)."""

    def op(name: str) -> Any:
        overload = getattr(go, name).default
        return DIRECT[overload] if direct else overload

    assert layer.w_q is not None and layer.w_scale is not None
    if mode == "w8a16" and not layer.conv:
        return op("w8a16_linear")(x, layer.w_q, layer.w_scale, b, r, layer.act)
    if act == "dynamic" and not layer.conv:
        return op("int8_linear_dynamic")(x, layer.w_q, layer.w_scale, b, r, layer.act)
    assert layer.x_scale is not None
    xq = op("quantize_per_tensor")(x, layer.x_scale)
    gemm = op("int8_conv1x1" if layer.conv else "int8_linear")
    return gemm(xq, layer.x_scale, layer.w_q, layer.w_scale, b, r, layer.act, x.dtype)


class QuantRunner(Runner):
    """Runs the float graph with the planned layers computed in int8 (no graph edits)."""

    def __init__(self, gm: GraphModule, layers: dict[Node, Layer], act: str, mode: str) -> None:
        super().__init__(gm, record=False)
        self.layers, self.act_mode, self.mode = layers, act, mode

    def run_node(self, n: Node) -> Any:
        layer = self.layers.get(n)
        if layer is None:
            return super().run_node(n)
        x = self.env[layer.x]
        b = self.env[layer.b] if isinstance(layer.b, Node) else layer.b
        r = self.env[layer.r] if isinstance(layer.r, Node) else layer.r
        return quantized(layer, x, b, r, self.act_mode, self.mode)


# -- 2. SmoothQuant -------------------------------------------------------------------------------


def smooth(
    gm: GraphModule, layers: list[Layer], batch: list[Any], alpha: float, rw: Rewriter
) -> None:
    """SmoothQuant: move activation outliers into the weights, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha);  x @ W.T == (x / s) @ (W * s).T

        before:  %y = linear(%x, %w, %b)
        after:   %xs = div(%x, %s); %y = linear(%xs, %w_smoothed, %b)

    ``max|X_j|`` is taken on ``batch`` (the first calibration batch: the stream is read once,
    and the activation scales are then calibrated on the smoothed graph), and MAX-reduced over
    the processes calibrating together, so that they all build the same model.
    """
    layers = [layer for layer in layers if not layer.conv]  # SmoothQuant targets linears
    _, values = native_run(gm, batch, record=True)
    amax = {
        layer.node: all_reduce_max(
            values[layer.x.name].detach().abs().reshape(-1, layer.w.shape[1]).amax(0)
        )
        for layer in layers
    }
    for layer in layers:
        if not rw.allowed():
            return
        _smooth_one(gm, layer, amax[layer.node], alpha, rw)


def _smooth_one(
    gm: GraphModule, layer: Layer, ax: torch.Tensor, alpha: float, rw: Rewriter
) -> None:
    """linear(x, w, b) -> linear(x / s, w * s, b) for one layer (see ``smooth``)."""
    node = layer.node
    refresh(layer, gm)
    ax = ax.double().clamp_min(1e-5)
    aw = layer.w.detach().abs().amax(0).double().clamp_min(1e-5)
    scale = (ax**alpha / aw ** (1 - alpha)).clamp_min(1e-5)
    w = (layer.w.detach().double() * scale).to(layer.w.dtype)
    src = [node]
    s_node = rw.constant(scale.to(layer.w.dtype), hint=f"{node.name}_smooth", sources=src)
    w_node = rw.constant(w, hint=f"{node.name}_w_smoothed", sources=src)
    xs = rw.call(aten.div.Tensor, (layer.x, s_node), before=node, sources=src)
    if node.target == aten.linear.default:
        new = rw.call(aten.linear.default, (xs, w_node, layer.b), before=node, sources=src)
    else:
        args = (xs, w_node, layer.b, layer.r, layer.act, 1.0)
        new = rw.call(go.linear.default, args, before=node, sources=src)
    rw.replace(node, new)
    rw.applied("smooth")


# -- 3. scales ------------------------------------------------------------------------------------


def calibrate_layers(
    gm: GraphModule,
    layers: list[Layer],
    batches: Iterable[list[Any]],
    calib: str | None,
    *,
    progress: bool = False,
) -> None:
    """Quantize every layer's weight per output channel; with an observer name ``calib``
    (static W8A8), calibrate each layer's activation scale on ``batches``, read once."""
    for layer in layers:
        layer.w_q, layer.w_scale = quantize_weight_per_channel(layer.w.detach(), axis=0)
    if calib is None:
        return
    names = sorted({layer.x.name for layer in layers})
    observers = calibrate(gm, names, batches, calib, progress=progress)
    for layer in layers:
        layer.x_scale = float(observers[layer.x.name].scale())


# -- 4. the choice --------------------------------------------------------------------------------


def choose(
    gm: GraphModule,
    layers: list[Layer],
    batch: list[Any],
    *,
    act: str,
    mode: str,
    min_cosine: float,
    float_ends: Iterable[str] = (),
    slower: Slower | None = None,
) -> list[Layer]:
    """Per-layer sensitivity, then the end-to-end budget, on ``batch``; returns the int8 layers.

    ``float_ends`` names the ends kept float (``"head"``: the last layer, ``"first"``: the
    first); ``slower`` (optional) says why an int8 layer is not faster than its float version.
    """
    outputs, values = native_run(gm, batch, record=True)
    for layer in layers:
        _measure_error(layer, values, act, mode, min_cosine)
    for end in float_ends:
        layer = layers[-1] if end == "head" else layers[0]
        if layer.precision == "int8":
            layer.precision, layer.why = "float", f"{end}=float"
    if slower is not None:
        for layer in layers:
            if layer.precision == "int8" and (why := slower(layer, values)) is not None:
                layer.precision, layer.why = "float", why
    chosen = [layer for layer in layers if layer.precision == "int8"]
    while chosen:
        plan = {layer.node: layer for layer in chosen}
        got = QuantRunner(gm, plan, act, mode).run_graph(batch)
        worst = min(
            (metrics.cosine(g, w) for g, w in zip(got, outputs) if _is_float(w)), default=1.0
        )
        if worst >= min_cosine:
            break
        drop = min(chosen, key=lambda layer: layer.sqnr or 0.0)
        drop.precision = "float"
        drop.why = f"whole-graph cosine {worst:.4f} < budget {min_cosine}: least accurate layer"
        chosen.remove(drop)
    return chosen


def _measure_error(
    layer: Layer, values: dict[str, Any], act: str, mode: str, min_cosine: float
) -> None:
    """The layer's SQNR and cosine in int8 against float, fed the same float input; int8 when
    within the budget."""
    x = values[layer.x.name]
    b = values[layer.b.name] if isinstance(layer.b, Node) else layer.b
    r = values[layer.r.name] if isinstance(layer.r, Node) else layer.r
    want, got = values[layer.node.name], quantized(layer, x, b, r, act, mode)
    layer.sqnr, layer.cosine = metrics.sqnr(got, want), metrics.cosine(got, want)
    if layer.cosine < min_cosine:
        layer.why = f"layer cosine {layer.cosine:.4f} < budget {min_cosine}"
    else:
        layer.precision = "int8"


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
