"""int8: quantize linear layers to int8, calibrated, with per-layer sensitivity and fallback.

Two steps, both passes:

* ``int8{...}`` measures and decides. It calibrates the activation scales on the calibration
  data, measures every layer's error against float (SQNR and cosine of the layer's output on
  the first calibration batch), keeps in float every layer over the budget, checks the whole
  graph against the budget (dropping the worst remaining layer until it fits), and then
  rewrites each chosen layer into its QDQ form:

      before:  %y = linear(%x, %w, %b)
      after:   %q = graphopt.quantize_per_tensor(%x, s)
               %xd = graphopt.dequantize_per_tensor(%q, s, f32)
               %wd = graphopt.dequantize_per_channel(%w_int8, %w_scales, 0, f32)
               %y = linear(%xd, %wd, %b)

1x1 convolutions (stride 1, no padding, one group) are GEMMs over channels and are quantized the
same way in static W8A8 (``graphopt.int8_conv1x1``); other convolutions stay float.

* ``lower-int8`` turns the QDQ form into int8 compute (see passes/lower_int8.py). With
  ``lower=true`` (the default) ``int8`` runs that lowering itself.

Symmetric int8 (range [-127, 127], zero point 0); weights per output channel; activations per
tensor (``act=static``, calibrated) or per token at run time (``act=dynamic``); ``mode=w8a16``
keeps activations in float and stores weights in int8. Norms, softmax and everything that is
not a linear layer or a 1x1 convolution stays float.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.graph import attr_path
from graphopt.ir.rewriter import Rewriter
from graphopt.ops.fused import ACTIVATIONS
from graphopt.passes.lib.calibration import OBSERVERS
from graphopt.pipeline.passes import Pass, PassContext, PassResult, option, register_pass
from graphopt.verification import metrics
from graphopt.verification.contracts import Contract
from graphopt.verification.interpreter import Runner, native_run

aten = torch.ops.aten
go = torch.ops.graphopt

RULE = "int8"


@dataclass
class Layer:
    """One quantizable linear: ``act(alpha * x @ w.T + b) + r``."""

    node: Node
    x: Node
    w: torch.Tensor
    b: Any
    r: Any
    act: str
    # filled in by the pass
    w_q: torch.Tensor | None = None
    w_scale: torch.Tensor | None = None
    x_scale: float | None = None
    sqnr: float | None = None
    cosine: float | None = None
    precision: str = "float"
    why: str = ""
    conv: bool = False  # a 1x1 convolution, computed as a GEMM over channels


def _layer(node: Node, gm: GraphModule) -> Layer | str | None:
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


CONVS = (aten.conv2d.default, go.conv.default)


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


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 weights and their fp32 scales."""
    from graphopt.passes.lib.calibration import quantize_weight_per_channel

    return quantize_weight_per_channel(w.detach(), axis=0)


class _QuantRunner(Runner):
    """Runs the float graph with the chosen layers computed in int8 (no graph edits)."""

    def __init__(self, gm: GraphModule, layers: dict[Node, Layer], act: str, mode: str) -> None:
        super().__init__(gm, record=False)
        self.layers, self.act_mode, self.mode = layers, act, mode

    def run_node(self, n: Node) -> Any:
        layer = self.layers.get(n)
        if layer is None:
            return super().run_node(n)
        args, _ = self.fetch_args_kwargs_from_env(n)
        x = self.env[layer.x]
        b = self.env[layer.b] if isinstance(layer.b, Node) else layer.b
        r = self.env[layer.r] if isinstance(layer.r, Node) else layer.r
        del args
        return _quantized(layer, x, b, r, self.act_mode, self.mode)


def _quantized(
    layer: Layer, x: torch.Tensor, b: Any, r: Any, act: str, mode: str, *, direct: bool = False
) -> torch.Tensor:
    """The layer computed in int8 (``direct``: as compiled models call graphopt ops)."""
    from graphopt.ops.fused import DIRECT

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


def _errors(want: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    return metrics.sqnr(got, want), metrics.cosine(got, want)


@register_pass
@dataclass(frozen=True)
class Int8(Pass):
    """Quantize linear layers to int8 within the user's budget (see the module docstring).

    Options: ``calib`` (minmax | percentile | mse | entropy), ``act`` (static | dynamic),
    ``mode`` (w8a8 | w8a16), ``min_cosine`` (the budget, on every output and every layer),
    ``head`` / ``first`` (int8 | float: the last / first quantizable layer, e.g. a classifier
    head or a network's first 1x1 convolution), ``lower`` (run lower-int8 afterwards),
    ``smooth`` (SmoothQuant migration strength alpha, 0 = off; static W8A8 only),
    ``measure`` (keep a layer in int8 only where it measures faster than float on the target,
    as the compiled model runs it; once per shape, cached).
    """

    name = "int8"
    contract = Contract.lossy("cosine", 0.99)
    runs_after = ("fold-bn", "fuse-epilogue")
    calib: str = option("percentile", choices=tuple(OBSERVERS))
    act: str = option("static", choices=("static", "dynamic"))
    mode: str = option("w8a8", choices=("w8a8", "w8a16"))
    min_cosine: float = option(0.99, low=0.0, high=1.0)
    head: str = option("int8", choices=("int8", "float"))
    first: str = option("int8", choices=("int8", "float"))
    lower: bool = True
    smooth: float = option(0.0, low=0.0, high=1.0)
    measure: bool = True

    def contract_for(self) -> Contract:
        return Contract.lossy("cosine", self.min_cosine)

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        layers = self._find_layers(gm, rw)
        if not layers:
            return PassResult(False, {"layers": []})
        batches = ctx.calibration or [ctx.inputs]
        if self.smooth > 0 and self.mode == "w8a8" and self.act == "static":
            _smooth(gm, layers, batches, self.smooth, rw)
            layers = self._find_layers(gm, None)  # the smoothed layers
        self._prepare(gm, layers, batches)
        chosen = self._choose(gm, layers, batches[0])
        for layer in layers:
            if layer.precision == "int8":
                if not rw.allowed():
                    layer.precision, layer.why = "float", "max_rewrites reached"
                    continue
                _rewrite_qdq(layer, rw, self.act, self.mode)
                rw.applied(RULE)
            else:
                rw.missed(RULE, layer.node, layer.why)
        if self.lower and chosen:
            from graphopt.passes.lower_int8 import lower

            lower(gm, rw)
        table = [
            {
                "layer": layer.node.name,
                "precision": layer.precision,
                "sqnr_db": layer.sqnr,
                "cosine": layer.cosine,
                "why": layer.why,
            }
            for layer in layers
        ]
        return PassResult(bool(chosen), {"layers": table, "int8 layers": len(chosen)})

    # -- steps -------------------------------------------------------------------------------
    def _find_layers(self, gm: GraphModule, rw: Rewriter | None) -> list[Layer]:
        """The graph's linear layers (near misses recorded when ``rw`` is given)."""
        layers: list[Layer] = []
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            found = _layer(node, gm)
            if isinstance(found, str):
                if rw is not None:
                    rw.missed(RULE, node, found)
            elif found is not None and found.conv and (self.act, self.mode) != ("static", "w8a8"):
                if rw is not None:
                    rw.missed(RULE, node, "1x1 convolutions are quantized in static W8A8 only")
            elif found is not None:
                layers.append(found)
        return layers

    def _prepare(self, gm: GraphModule, layers: list[Layer], batches: list[list[Any]]) -> None:
        """Quantize weights; calibrate activation scales (static W8A8 only)."""
        for layer in layers:
            layer.w_q, layer.w_scale = quantize_weight(layer.w)
        if self.mode == "w8a8" and self.act == "static":
            from graphopt.passes.lib.calibration import calibrate

            names = sorted({layer.x.name for layer in layers})
            # a progress bar over the calibration batches when someone is watching
            observers = calibrate(gm, names, batches, self.calib, progress=sys.stderr.isatty())
            for layer in layers:
                layer.x_scale = float(observers[layer.x.name].scale())

    def _slower(self, layer: Layer, values: dict[str, Any]) -> str | None:
        """Why the int8 layer is not faster than the float one on the target, or None.
        Both run as the compiled model runs them (graphopt ops without the dispatcher)."""
        from graphopt.ops.autotune import shape_key
        from graphopt.ops.fused import DIRECT
        from graphopt.passes.lib.fusion import measured_faster

        node = layer.node

        def value(a: Any) -> Any:
            return values[a.name] if isinstance(a, Node) else a

        args = torch.fx.node.map_aggregate(node.args, value)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
        float_fn = DIRECT.get(node.target, node.target)
        x, b, r = value(layer.x), value(layer.b), value(layer.r)
        key = (
            f"int8 {self.act} {self.mode} {layer.act} conv={layer.conv} {shape_key(x, layer.w, r)}"
        )
        return measured_faster(
            key,
            lambda: float_fn(*args, **kwargs),
            lambda: _quantized(layer, x, b, r, self.act, self.mode, direct=True),
            x.device,
        )

    def _choose(self, gm: GraphModule, layers: list[Layer], batch: list[Any]) -> list[Layer]:
        """Per-layer sensitivity, then the end-to-end budget; returns the int8 layers."""
        outputs, values = native_run(gm, batch, record=True)
        for layer in layers:
            x = values[layer.x.name]
            b = values[layer.b.name] if isinstance(layer.b, Node) else layer.b
            r = values[layer.r.name] if isinstance(layer.r, Node) else layer.r
            got = _quantized(layer, x, b, r, self.act, self.mode)
            layer.sqnr, layer.cosine = _errors(values[layer.node.name], got)
            if layer.cosine < self.min_cosine:
                layer.why = f"layer cosine {layer.cosine:.4f} < budget {self.min_cosine}"
            else:
                layer.precision = "int8"
        for end, layer in (("head", layers[-1]), ("first", layers[0])):
            if getattr(self, end) == "float" and layer.precision == "int8":
                layer.precision, layer.why = "float", f"{end}=float"
        if self.measure:
            for layer in layers:
                if layer.precision == "int8" and (why := self._slower(layer, values)) is not None:
                    layer.precision, layer.why = "float", why
        chosen = [layer for layer in layers if layer.precision == "int8"]
        while chosen:
            plan = {layer.node: layer for layer in chosen}
            got = _QuantRunner(gm, plan, self.act, self.mode).run_graph(batch)
            worst = min(
                (metrics.cosine(g, w) for g, w in zip(got, outputs) if _is_float(w)), default=1.0
            )
            if worst >= self.min_cosine:
                break
            drop = min(chosen, key=lambda layer: layer.sqnr or 0.0)
            drop.precision = "float"
            drop.why = (
                f"whole-graph cosine {worst:.4f} < budget {self.min_cosine}: least accurate layer"
            )
            chosen.remove(drop)
        return chosen


def _smooth(
    gm: GraphModule, layers: list[Layer], batches: list[list[Any]], alpha: float, rw: Rewriter
) -> None:
    """SmoothQuant: move activation outliers into the weights, per input channel j:
    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha);  x @ W.T == (x / s) @ (W * s).T

        before:  %y = linear(%x, %w, %b)
        after:   %xs = div(%x, %s); %y = linear(%xs, %w_smoothed, %b)
    """
    amax: dict[Node, torch.Tensor] = {}
    layers = [layer for layer in layers if not layer.conv]
    for batch in batches:
        _, values = native_run(gm, batch, record=True)
        for layer in layers:
            v = values[layer.x.name].detach().abs().reshape(-1, layer.w.shape[1]).amax(0)
            prev = amax.get(layer.node)
            amax[layer.node] = v if prev is None else torch.maximum(prev, v)
    for layer in layers:
        node = layer.node
        if layer.conv:
            continue  # SmoothQuant targets transformer linears
        if not rw.allowed():
            return
        current = _layer(node, gm)  # earlier rewrites may have replaced its inputs
        assert isinstance(current, Layer)
        layer.x, layer.b, layer.r = current.x, current.b, current.r
        ax = amax[node].double().clamp_min(1e-5)
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


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _rewrite_qdq(layer: Layer, rw: Rewriter, act: str, mode: str) -> None:
    """Replace the layer by its QDQ form (per-tensor static) or its dynamic/weight-only call."""
    assert layer.w_q is not None and layer.w_scale is not None
    node = layer.node
    # earlier rewrites may have replaced this layer's inputs: read them from the node now
    current = _layer(node, rw.gm)
    assert isinstance(current, Layer)
    layer.x, layer.b, layer.r = current.x, current.b, current.r
    src = [node]
    w_q = rw.constant(layer.w_q, hint=f"{node.name}_w_int8", sources=src)
    w_s = rw.constant(layer.w_scale, hint=f"{node.name}_w_scale", sources=src)
    if mode == "w8a16" or act == "dynamic":
        target = go.w8a16_linear.default if mode == "w8a16" else go.int8_linear_dynamic.default
        new = rw.call(
            target, (layer.x, w_q, w_s, layer.b, layer.r, layer.act), before=node, sources=src
        )
        rw.replace(node, new)
        return
    dtype = layer.x.meta["val"].dtype
    s = layer.x_scale
    q = rw.call(go.quantize_per_tensor.default, (layer.x, s), before=node, sources=src)
    xd = rw.call(go.dequantize_per_tensor.default, (q, s, dtype), before=node, sources=src)
    wd = rw.call(go.dequantize_per_channel.default, (w_q, w_s, 0, dtype), before=node, sources=src)
    if layer.conv:
        args = (xd, wd, layer.b, layer.r, [1, 1], [0, 0], [1, 1], 1, layer.act)
        new = rw.call(go.conv.default, args, before=node, sources=src)
    elif layer.r is None and layer.act == "none" and node.target == aten.linear.default:
        new = rw.call(aten.linear.default, (xd, wd, layer.b), before=node, sources=src)
    else:
        args = (xd, wd, layer.b, layer.r, layer.act, 1.0)
        new = rw.call(go.linear.default, args, before=node, sources=src)
    rw.replace(node, new)
