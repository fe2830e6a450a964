"""fuse-kernels: hand the hot row-wise ops to graphopt's kernels (norms, softmax, attention).

The ops stay standard in meaning; each ``graphopt`` op runs its Triton kernel on CUDA where
that measures faster and its ATen reference elsewhere (``graphopt/ops/fused.py``). The pass adds one
fusion the ATen graph cannot express: the residual add in front of a norm (``add_norm``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ir.rules import Call, Judge, Match, Rule
from graphopt.passes.lib.fusion import why_match_not_faster
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten
go = torch.ops.graphopt


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _arg(node: Node, i: int, name: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _norm_parts(node: Node) -> tuple[Any, Any, Any, float, str] | str:
    """(x, weight, bias, eps, kind) of layer_norm / rms_norm over the last dim."""
    x = node.args[0]
    shape = _arg(node, 1, "normalized_shape", None)
    val = _val(x)
    if val is None or not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return "normalizes over more than the last dim"
    if str(shape[0]) != str(val.shape[-1]):
        return "normalized shape is not the last dim"
    if node.target == aten.rms_norm.default:
        eps = _arg(node, 3, "eps", None)
        if eps is None:
            return "rms_norm without an explicit eps"
        return x, _arg(node, 2, "weight", None), None, float(eps), "rms"
    eps = _arg(node, 4, "eps", 1e-5)
    return x, _arg(node, 2, "weight", None), _arg(node, 3, "bias", None), float(eps), "layer"


def _add_norm(node: Node) -> Match | str | None:
    """layer_norm(a + b) -> graphopt.add_norm(a, b) (the sum stays available to other users)"""
    parts = _norm_parts(node)
    if isinstance(parts, str):
        return parts
    x, w, b, eps, kind = parts
    if not isinstance(x, Node) or x.target != aten.add.Tensor:
        return None
    a, r = x.args[0], x.args[1] if len(x.args) > 1 else None
    if not (isinstance(a, Node) and isinstance(r, Node)) or x.kwargs.get("alpha", 1) != 1:
        return "the add has a scalar operand or an alpha"
    va, vr, vx = _val(a), _val(r), _val(x)
    if va is None or vr is None or vx is None:
        return "missing tensor metadata"
    same = [str(d) for d in va.shape] == [str(d) for d in vr.shape] == [str(d) for d in vx.shape]
    if not same or va.dtype != vr.dtype:
        return "the residual add broadcasts or mixes dtypes"
    replaces = [(x, 1), (node, 0)] if len(x.users) > 1 else [(node, 0)]
    add_norm = Call(go.add_norm.default, (a, r, w, b, eps, kind))
    return Match([x, node], add_norm, replaces=replaces)


def _norm(node: Node) -> Match | str | None:
    """layer_norm(x, [n], w, b, eps) -> graphopt.norm(x, w, b, eps, 'layer'); rms_norm likewise"""
    parts = _norm_parts(node)
    if isinstance(parts, str):
        return parts
    x, w, b, eps, kind = parts
    return Match([node], Call(go.norm.default, (x, w, b, eps, kind)))


def _fits(mask: torch.Tensor, x: torch.Tensor) -> bool:
    """Does ``mask`` broadcast to ``x``'s shape without enlarging it?"""
    if mask.dim() > x.dim():
        return False
    pairs = zip(reversed(mask.shape), reversed(x.shape))
    return all(str(m) == "1" or str(m) == str(d) for m, d in pairs)


def _softmax(node: Node) -> Match | str | None:
    """softmax(x * s + m, -1) -> graphopt.softmax(x, s, m)"""
    x = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    val = _val(x)
    if val is None or dim not in (-1, val.dim() - 1):
        return "softmax over a dim other than the last"
    if node.target == aten._softmax.default and node.args[2]:
        return "half-to-float softmax"
    if node.target == aten.softmax.int and _arg(node, 2, "dtype", None) is not None:
        return "softmax with a dtype argument"
    nodes, mask, scale = [node], None, 1.0
    if isinstance(x, Node) and x.target == aten.add.Tensor and len(x.users) == 1:
        m = x.args[1] if len(x.args) > 1 else None
        vm = _val(m)
        if isinstance(m, Node) and vm is not None and vm.dtype == val.dtype and _fits(vm, val):
            nodes, mask, x = [x, *nodes], m, x.args[0]
    if isinstance(x, Node) and x.target in (aten.mul.Tensor, aten.div.Tensor) and len(x.users) == 1:
        s = x.args[1] if len(x.args) > 1 else None
        if isinstance(s, (int, float)) and not isinstance(s, bool):
            scale = float(s) if x.target == aten.mul.Tensor else 1.0 / float(s)
            nodes, x = [x, *nodes], x.args[0]
    return Match(nodes, Call(go.softmax.default, (x, scale, mask)))


def _attention(node: Node) -> Match | str | None:
    """scaled_dot_product_attention(q, k, v, m, 0.0, causal, scale) -> graphopt.attention(...)"""
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask", None)
    dropout = _arg(node, 4, "dropout_p", 0.0)
    causal = _arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale")
    if dropout != 0.0:
        return "attention with dropout"
    if node.kwargs.get("enable_gqa", False):
        return "grouped-query attention"
    return Match([node], Call(go.attention.default, (q, k, v, mask, scale, bool(causal))))


LAYER_NORMS = (aten.layer_norm.default, aten.rms_norm.default)
SOFTMAXES = (aten._softmax.default, aten.softmax.int)

SDPA = (aten.scaled_dot_product_attention.default,)

RULES = [
    Rule("add+norm", LAYER_NORMS, _add_norm),  # layer_norm(a + r) -> graphopt.add_norm(a, r)
    Rule("norm", LAYER_NORMS, _norm),  # layer_norm(x) -> graphopt.norm(x)
    Rule("softmax", SOFTMAXES, _softmax),  # softmax(x * s + m) -> graphopt.softmax(x, s, m)
    Rule("attention", SDPA, _attention),  # sdpa(q, k, v, m) -> graphopt.attention(q, k, v, m)
]


@register_pass
@dataclass(frozen=True)
class FuseKernels(RulePass):
    """Route norms, softmax and attention to graphopt's kernel-backed ops.

    before:  %s = add(%x, %r); %y = layer_norm(%s, [768], %w, %b, 1e-05); ... uses of %s
    after:   %n = graphopt.add_norm(%x, %r, %w, %b, 1e-05, 'layer'); %y = %n[0]; %s = %n[1]

    ``measure`` (default on): applied only where the graphopt op measures faster than the ATen
    calls on the target (once per shape, cached); otherwise a near miss with both times.
    """

    name = "fuse-kernels"
    contract = Contract.rounding()
    runs_after = ("fuse-epilogue",)
    rules = RULES
    stat = "fused"
    measure: bool = True

    def judge(self) -> Judge | None:
        return why_match_not_faster if self.measure else None
