"""int8: quantize linear layers to int8, calibrated, with per-layer sensitivity and fallback.

The pass reads in three parts: its options (below), the plan (``passes/lib/int8_plan.py``, on
the observers of ``passes/lib/calibration.py``: which layers, which scales, the sensitivity
fallback under the budget, SmoothQuant) and the rewrite of each planned layer into its QDQ form:

    before:  %y = linear(%x, %w, %b)
    after:   %q = graphopt.quantize_per_tensor(%x, s)
             %xd = graphopt.dequantize_per_tensor(%q, s, f32)
             %wd = graphopt.dequantize_per_channel(%w_int8, %w_scales, 0, f32)
             %y = linear(%xd, %wd, %b)

1x1 convolutions (stride 1, no padding, one group) are GEMMs over channels and are quantized the
same way in static W8A8 (``graphopt.int8_conv1x1``); other convolutions stay float.

With ``lower=true`` (the default) the pipeline runs ``lower-int8`` right after ``int8``
(``Int8.followed_by``): it turns the QDQ form into int8 compute (passes/lower_int8.py) and is
verified on its own, so the report has a row for each.

Symmetric int8 (range [-127, 127], zero point 0); weights per output channel; activations per
tensor (``act=static``, calibrated) or per token at run time (``act=dynamic``); ``mode=w8a16``
keeps activations in float and stores weights in int8. Norms, softmax and everything that is
not a linear layer or a 1x1 convolution stays float.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.rewriter import Rewriter
from graphopt.passes.lib import int8_plan
from graphopt.passes.lib.calibration import OBSERVERS, split_first
from graphopt.passes.lib.int8_plan import RULE, Layer, quantized
from graphopt.passes.lower_int8 import LowerInt8
from graphopt.pipeline.passes import Pass, PassContext, PassResult, option, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt


@register_pass
@dataclass(frozen=True)
class Int8(Pass):
    """Quantize linear layers to int8 within the user's budget (see the module docstring).

    Options: ``calib`` (minmax | percentile | mse | entropy), ``act`` (static | dynamic),
    ``mode`` (w8a8 | w8a16), ``min_cosine`` (the budget, on every output and every layer),
    ``head`` / ``first`` (int8 | float: the last / first quantizable layer, e.g. a classifier
    head or a network's first 1x1 convolution), ``lower`` (the pipeline runs lower-int8 next),
    ``smooth`` (SmoothQuant migration strength alpha, 0 = off; static W8A8 only),
    ``measure`` (keep a layer in int8 only where it measures faster than float on the target,
    as the compiled model runs it; once per shape, cached). Only when the graph runs on the
    aten backend (``ctx.engine``): under another engine (Inductor's oneDNN int8, ONNX
    Runtime's integer GEMMs, or ``auto``) graphopt's own int8 ops are not what runs, so timing
    them would judge the wrong code; that engine is verified and timed whole instead.

    Calibration data is ``ctx.calibration``, a stream: read once (by the observers), and only
    its first batch kept (for SmoothQuant's channel maxima and the sensitivity check).
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

    def followed_by(self) -> tuple[Pass, ...]:
        return (LowerInt8(),) if self.lower else ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        layers = int8_plan.find_layers(gm, self.act, self.mode, rw)
        if not layers:
            return PassResult(False, {"layers": []})
        # the calibration stream, read once; its first batch is kept for the sensitivity check
        first_batch, batches = split_first(ctx.calibration, ctx.inputs)
        if self.smooth > 0 and self.static:
            int8_plan.smooth(gm, layers, first_batch, self.smooth, rw)
            layers = int8_plan.find_layers(gm, self.act, self.mode, None)  # the smoothed layers
        measure = self.measure and ctx.engine == "aten"
        chosen = self.plan(gm, layers, first_batch, batches, measure)
        for layer in layers:
            if layer.precision != "int8":
                rw.missed(RULE, layer.node, layer.why)
            elif not rw.allowed():
                layer.precision, layer.why = "float", "max_rewrites reached"
            else:
                _rewrite_qdq(layer, rw, self.act, self.mode)
                rw.applied(RULE)
        table = [layer.row() for layer in layers]
        return PassResult(bool(chosen), {"layers": table, "int8 layers": len(chosen)})

    @property
    def static(self) -> bool:
        """Static W8A8: activation scales come from calibration."""
        return self.mode == "w8a8" and self.act == "static"

    def plan(
        self,
        gm: GraphModule,
        layers: list[Layer],
        first_batch: list[Any],
        batches: Iterable[list[Any]],
        measure: bool = True,
    ) -> list[Layer]:
        """Decide every layer's precision and scales (``passes/lib/int8_plan.py``): calibrate on
        ``batches`` (the whole stream, read once), judge on ``first_batch``; returns the int8
        layers."""
        calib = self.calib if self.static else None
        # a progress bar over the calibration batches when someone is watching
        int8_plan.calibrate_layers(gm, layers, batches, calib, progress=sys.stderr.isatty())
        ends = [end for end in ("head", "first") if getattr(self, end) == "float"]
        return int8_plan.choose(
            gm,
            layers,
            first_batch,
            act=self.act,
            mode=self.mode,
            min_cosine=self.min_cosine,
            float_ends=ends,
            slower=self._slower if measure else None,
        )

    def _slower(self, layer: Layer, values: dict[str, Any]) -> str | None:
        """Why the int8 layer is not faster than the float one on the target, or None.
        Both run as the compiled model runs them (graphopt ops without the dispatcher)."""
        from graphopt.ops.autotune import cache_key, why_not_faster
        from graphopt.ops.registry import DIRECT

        node = layer.node

        def value(a: Any) -> Any:
            return values[a.name] if isinstance(a, Node) else a

        args = torch.fx.node.map_aggregate(node.args, value)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, value)
        float_fn = DIRECT.get(node.target, node.target)
        x, b, r = value(layer.x), value(layer.b), value(layer.r)
        key = cache_key(
            "int8", x, layer.w, r, act=self.act, mode=self.mode, epilogue=layer.act, conv=layer.conv
        )
        return why_not_faster(
            key,
            lambda: float_fn(*args, **kwargs),
            lambda: quantized(layer, x, b, r, self.act, self.mode, direct=True),
            x.device,
        )


def _rewrite_qdq(layer: Layer, rw: Rewriter, act: str, mode: str) -> None:
    """Replace a planned layer by its QDQ form (static W8A8, module docstring), or by its
    dynamic / weight-only call:

        linear(%x, %w, %b) -> graphopt.int8_linear_dynamic(%x, %w_int8, %w_scales, %b, ..)
        linear(%x, %w, %b) -> graphopt.w8a16_linear(%x, %w_int8, %w_scales, %b, ..)
    """
    assert layer.w_q is not None and layer.w_scale is not None
    node = layer.node
    int8_plan.refresh(layer, rw.gm)
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
