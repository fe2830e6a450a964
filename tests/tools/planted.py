"""Planted bugs for the bisector's tests: each is wrong at one known place, and right everywhere
else, so ``graphopt debug bisect`` must name that pass, that rewrite and that node.

* ``relu-to-clamp{wrong_at=k}``: a wrong rewrite. ``relu(x) -> clamp_min(x, 0)``, except the k-th
  relu, which becomes ``clamp_min(x, -0.05)`` (lets small negatives through).
* ``fuse-add-relu``: a right rewrite onto a wrong kernel. ``relu(a + b) -> planted.add_relu(a, b)``;
  the kernel works in blocks of ``BLOCK`` along the last dim and forgets the ReLU on a partial
  last block (a missing tail mask), so only shapes whose last dim is not a multiple of ``BLOCK``
  come out wrong.
* ``int8-planted{wrong_layer=k}``: a wrong quantization scale. ``int8`` plans every layer with
  its calibrated activation scale, then rewrites the k-th layer with a scale ten times too small
  (its activations clip).

``crash-at{at=k}`` is a pass that raises at its k-th rewrite.

Setting ``GRAPHOPT_PLANTED_FIXED=1`` removes all the bugs: that is how the tests show that a
repro script passes once the bug is gone. The repro scripts import this module by name (it
registers the passes and the ``planted::`` op), so it must stay importable from its folder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

import graphopt
from graphopt import Contract, Pass, PassResult
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.passes.int8 import Int8
from graphopt.passes.lib.int8_plan import Layer
from graphopt.pipeline.passes import PassContext

aten = torch.ops.aten
BLOCK = 16


def fixed() -> bool:
    """True when the environment asks for the bugs to be removed."""
    return os.environ.get("GRAPHOPT_PLANTED_FIXED") == "1"


# -- a wrong rewrite ------------------------------------------------------------------------------


@graphopt.register_pass
@dataclass(frozen=True)
class ReluToClamp(Pass):
    """relu(x) -> clamp_min(x, 0.0); the ``wrong_at``-th relu gets a wrong bound."""

    name = "relu-to-clamp"
    contract = Contract.rounding()
    wrong_at: int = 2

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        seen = [0]

        def rewrite(node: Node, rw: Rewriter) -> bool:
            # relu(x) -> clamp_min(x, 0.0)   (the planted bug: -0.05 at the wrong_at-th relu)
            seen[0] += 1
            bound = -0.05 if seen[0] == self.wrong_at and not fixed() else 0.0
            new = rw.call(
                aten.clamp_min.default, (node.args[0], bound), before=node, sources=[node]
            )
            rw.replace(node, new)
            return rw.applied("relu->clamp")

        apply_rules(gm, [((aten.relu.default,), rewrite)], rw)
        return PassResult(rw.rewrites > 0, {"rewritten": rw.rewrites})


@graphopt.register_pass
@dataclass(frozen=True)
class CrashAt(Pass):
    """relu(x) -> clamp_min(x, 0.0), but the pass raises on the ``at``-th relu."""

    name = "crash-at"
    contract = Contract.rounding()
    at: int = 2

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        seen = [0]

        def rewrite(node: Node, rw: Rewriter) -> bool:
            seen[0] += 1
            if seen[0] == self.at and not fixed():
                raise RuntimeError(f"planted crash at %{node.name}")
            new = rw.call(aten.clamp_min.default, (node.args[0], 0.0), before=node, sources=[node])
            rw.replace(node, new)
            return rw.applied("relu->clamp")

        apply_rules(gm, [((aten.relu.default,), rewrite)], rw)
        return PassResult(rw.rewrites > 0, {"rewritten": rw.rewrites})


# -- a wrong kernel -------------------------------------------------------------------------------


def _add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b), computed in blocks of BLOCK along the last dim (the bug: no tail mask)."""
    total = a + b
    out = torch.relu(total)
    tail = out.shape[-1] % BLOCK
    if tail and not fixed():
        out[..., -tail:] = total[..., -tail:]  # the partial block skips the ReLU
    return out


def _add_relu_fake(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty(torch.broadcast_shapes(a.shape, b.shape))


_op = torch.library.custom_op("planted::add_relu", _add_relu, mutates_args=())
_op.register_fake(_add_relu_fake)


def _fuse_add_relu(node: Node, rw: Rewriter) -> bool:
    """relu(add(a, b)) -> planted.add_relu(a, b)"""
    add = node.args[0]
    if not (isinstance(add, Node) and add.target == aten.add.Tensor and len(add.users) == 1):
        return False
    if len(add.args) != 2 or add.kwargs.get("alpha", 1) != 1:
        return rw.missed("add+relu", node, "the add has an alpha")
    a, b = add.args
    new = rw.call(torch.ops.planted.add_relu.default, (a, b), before=node, sources=[add, node])
    rw.replace(node, new)
    return rw.applied("add+relu")


@graphopt.register_pass
@dataclass(frozen=True)
class FuseAddRelu(Pass):
    """relu(a + b) -> planted.add_relu(a, b): one kernel for the residual add and its ReLU."""

    name = "fuse-add-relu"
    contract = Contract.rounding()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.relu.default,), _fuse_add_relu)], rw)
        return PassResult(rw.rewrites > 0, {"fused": rw.rewrites})


# -- a wrong quantization scale -------------------------------------------------------------------


@graphopt.register_pass
@dataclass(frozen=True)
class Int8Planted(Int8):
    """``int8``, but the ``wrong_layer``-th layer is rewritten with a scale 10x too small."""

    name = "int8-planted"
    wrong_layer: int = 2

    def plan(
        self,
        gm: GraphModule,
        layers: list[Layer],
        first_batch: list[Any],
        batches: Iterable[list[Any]],
        measure: bool = True,
    ) -> list[Layer]:
        chosen = super().plan(gm, layers, first_batch, batches, measure)
        # the plan saw the right scale; the rewrite gets the wrong one
        if not fixed() and len(layers) >= self.wrong_layer:
            layer = layers[self.wrong_layer - 1]
            if layer.x_scale is not None:
                layer.x_scale = layer.x_scale / 10
        return chosen
