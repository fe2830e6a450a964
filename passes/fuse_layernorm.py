"""fuse-layernorm: recognize layer norm and RMS norm written out in elementary ops."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import tensor_val
from graphopt.ir.rules import Call, Match, Rule
from graphopt.passes.lib.patterns import (
    ADDS,
    DIVS,
    MULS,
    POWS,
    SUBS,
    arg,
    escaped,
    is_call,
    last_dim_only,
    module_of,
    operands,
    same_type,
    scalar,
    shape,
)
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten

VARS = (aten.var.correction, aten.var.dim)


@dataclass
class _Core:
    """``numer / sqrt(var + eps)`` or ``numer * rsqrt(var + eps)``."""

    numer: Node
    var: Node
    eps: float
    nodes: list[Node]  # the divide (or multiply), the root and the + eps


@dataclass
class _Split:
    """The anchor as ``core [* weight] [+ bias]``."""

    core_node: Node
    core: _Core
    weight: Any
    bias: Any
    nodes: list[Node]  # the core node and the affine nodes


def _root_power(gm: GraphModule, node: Any) -> float | None:
    """0.5 for sqrt(v), -0.5 for rsqrt(v), p for pow(v, p)."""
    if is_call(node, (aten.sqrt.default,)):
        return 0.5
    if is_call(node, (aten.rsqrt.default,)):
        return -0.5
    return scalar(gm, node.args[1]) if is_call(node, POWS) else None


def _core(gm: GraphModule, node: Any) -> _Core | None:
    candidates: list[tuple[Any, Any, float]] = []
    if (ab := operands(node, DIVS)) is not None:
        candidates.append((ab[0], ab[1], 0.5))
    elif (ab := operands(node, MULS)) is not None:
        candidates += [(ab[0], ab[1], -0.5), (ab[1], ab[0], -0.5)]
    for numer, root, power in candidates:
        if not isinstance(numer, Node) or _root_power(gm, root) != power:
            continue
        ve = operands(root.args[0], ADDS)
        for var, eps in (ve, ve[::-1]) if ve is not None else ():
            e = scalar(gm, eps)
            if e is not None and isinstance(var, Node):
                return _Core(numer, var, e, [node, root, root.args[0]])
    return None


def _centered(node: Node) -> tuple[Node, Node] | None:
    """``(x, m)`` when ``node`` is ``x - m`` with ``m = mean(x, ...)``."""
    ab = operands(node, SUBS)
    if ab is not None and is_call(ab[1], (aten.mean.dim,)) and ab[1].args[0] is ab[0]:
        return ab[0], ab[1]
    return None


def _same_mean(centered: tuple[Node, Node] | None, x: Node, mean: Node) -> bool:
    """Is ``centered`` ``x - m`` with ``m`` the same mean as ``mean`` (both written out)?"""
    if centered is None or centered[0] is not x:
        return False
    m = centered[1]
    return m is mean or (m.args[1:] == mean.args[1:] and m.kwargs == mean.kwargs)


def _split(gm: GraphModule, node: Node) -> _Split | None:
    def scaled(n: Any) -> _Split | None:
        if (core := _core(gm, n)) is not None:
            return _Split(n, core, None, None, [n])
        for c, w in (ab, ab[::-1]) if (ab := operands(n, MULS)) is not None else ():
            if isinstance(c, Node) and (core := _core(gm, c)) is not None:
                return _Split(c, core, w, None, [c, n])
        return None

    for s, b in (ab, ab[::-1]) if (ab := operands(node, ADDS)) is not None else ():
        found = scaled(s)
        if found is not None and _centered(found.core.numer) is not None:  # RMS norm: no bias
            found.bias = b
            found.nodes.append(node)
            return found
    return scaled(node)


def _params_ok(split: _Split) -> bool:
    """Weight and bias, where present, are 1-D of the normalized size and the same dtype."""
    val = tensor_val(split.core_node)
    for p in (split.weight, split.bias):
        pv = tensor_val(p)
        if p is None:
            continue
        if val is None or pv is None or pv.dtype != val.dtype or val.dim() == 0:
            return False
        if shape(p) != [str(val.shape[-1])]:
            return False
    return True


def _square_of(gm: GraphModule, node: Any) -> Any:
    """``a`` when ``node`` is ``a * a``, ``a ** 2`` or ``square(a)``."""
    if (ab := operands(node, MULS)) is not None and ab[0] is ab[1]:
        return ab[0]
    if is_call(node, POWS) and scalar(gm, node.args[1]) == 2.0:
        return node.args[0]
    return node.args[0] if is_call(node, (aten.square.default,)) else None


def _keepdim(node: Node) -> Any:
    if node.target == aten.var.dim:
        return arg(node, 3, "keepdim", False)
    if node.target == aten.var.correction:
        return node.kwargs.get("keepdim", False)
    return arg(node, 2, "keepdim", False)


def _biased(var: Node) -> bool:
    if var.target == aten.var.dim:
        return arg(var, 2, "unbiased", True) is False
    return var.kwargs.get("correction") in (0, 0.0)


def _match(gm: GraphModule, node: Node, split: _Split) -> Match | str:
    """The norm at ``node`` (a layer norm when the numerator is ``x - mean(x)``, else an RMS
    norm) or why it is not one."""
    core = split.core
    centered = _centered(core.numer)
    var = core.var
    nodes = [*split.nodes, *core.nodes, var]
    if centered is not None:
        x, mean = centered
        reductions = [mean, var]
        nodes += [core.numer, mean]
        if is_call(var, VARS):
            if var.args[0] is not x or not _biased(var):
                return f"%{var.name} is not the biased variance of %{x.name}"
        else:
            a = _square_of(gm, var.args[0]) if is_call(var, (aten.mean.dim,)) else None
            again = _centered(a) if a is not None and a is not core.numer else None
            if a is None or (a is not core.numer and not _same_mean(again, x, mean)):
                return f"%{var.name} is not mean((x - mean(x))^2) of %{x.name}"
            nodes += [var.args[0], a, *(again or ())[1:]]
    else:
        x = core.numer
        reductions = [var]
        if not (is_call(var, (aten.mean.dim,)) and _square_of(gm, var.args[0]) is x):
            return f"%{var.name} is not mean(x^2) of the numerator %{x.name}"
        nodes.append(var.args[0])
    xv = tensor_val(x)
    rank = 0 if xv is None else xv.dim()
    for r in reductions:
        dims = arg(r, 1, "dim")
        dtype_ok = r.kwargs.get("dtype") is None
        if not (rank and last_dim_only(dims, rank) and _keepdim(r) is True and dtype_ok):
            return f"%{r.name} reduces over dims {dims}, not the last dim only"
    if (leak := escaped(node, nodes)) is not None:
        return f"intermediate %{leak.name} has other users"
    if xv is None or not isinstance(xv.shape[-1], int):
        return f"the last dim of %{x.name} is symbolic"
    if not same_type(x, node):
        return f"%{x.name} and the result differ in shape or dtype"
    size, eps = [xv.shape[-1]], core.eps
    if centered is not None:
        norm = Call(aten.layer_norm.default, (x, size, split.weight, split.bias, eps))
    else:
        norm = Call(aten.rms_norm.default, (x, size, split.weight, eps))
    return Match(nodes, norm)


def _extended_by_user(gm: GraphModule, node: Node, split: _Split) -> bool:
    """Does ``node``'s only user add the weight or bias of the same norm (a later anchor)?"""
    if len(node.users) != 1:
        return False
    outer = _split(gm, next(iter(node.users)))
    return outer is not None and outer.core_node is split.core_node and _params_ok(outer)


def _norm(node: Node, centered: bool) -> Match | str | None:
    gm = module_of(node)
    split = _split(gm, node)
    if split is None or not _params_ok(split) or _extended_by_user(gm, node, split):
        return None
    if (_centered(split.core.numer) is not None) != centered:
        return None  # the other norm's rule
    return _match(gm, node, split)


def _layernorm(node: Node) -> Match | str | None:
    return _norm(node, centered=True)


def _rmsnorm(node: Node) -> Match | str | None:
    return _norm(node, centered=False)


ANCHORS = (aten.add.Tensor, aten.mul.Tensor, aten.div.Tensor)

RULES = [
    # d = x - mean(x); (d / sqrt(mean(d*d) + eps)) * w + b  -> layer_norm(x, [N], w, b, eps)
    Rule("layernorm", ANCHORS, _layernorm),
    # x * rsqrt(mean(x^2) + eps) * w                       -> rms_norm(x, [N], w, eps)
    Rule("rmsnorm", ANCHORS, _rmsnorm),
]


@register_pass
@dataclass(frozen=True)
class FuseLayerNorm(RulePass):
    """Replace layer norm and RMS norm over the last dim, written out in elementary ops, by
    one ``aten.layer_norm`` / ``aten.rms_norm`` call.

    The variance may be ``mean(d*d)``, ``mean(d**2)`` or ``var(x, unbiased=False)``; the
    normalization ``d / sqrt(var + eps)``, ``d * rsqrt(var + eps)`` or a ``pow`` by +-0.5; the
    affine part ``* weight + bias`` is optional, with weight and bias 1-D of the last dim's size.

    before:  %m = mean(%x, [-1], True); %d = sub(%x, %m); %q = mul(%d, %d)
             %v = mean(%q, [-1], True); %a = add(%v, 1e-05); %r = rsqrt(%a); %n = mul(%d, %r)
             %s = mul(%n, %w); %y = add(%s, %b)
    after:   %y = layer_norm(%x, [N], %w, %b, 1e-05)
    """

    name = "fuse-layernorm"
    contract = Contract.rounding()
    runs_before = ("fuse-pointwise",)
    rules = RULES
    stat = "fused"
