"""fuse-gelu: recognize gelu written out in elementary ops and call ``aten.gelu`` instead."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.rules import Call, Match, Rule
from graphopt.passes.lib.patterns import (
    ADDS,
    DIVS,
    MULS,
    POWS,
    SUBS,
    close,
    is_call,
    module_of,
    operands,
    same_type,
    scalar,
)
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten

ERF_SCALE = 1 / math.sqrt(2)
TANH_SCALE = math.sqrt(2 / math.pi)
TANH_CUBIC = 0.044715

Poly = dict[int, float]  # exponent of x -> coefficient


def _product(gm: GraphModule, node: Node, nodes: list[Node]) -> tuple[float, list[Any]]:
    """``node`` as ``coef * f1 * f2 * ...``: descends into mul and divide-by-constant nodes that
    have no other user (appending them to ``nodes``); the factors are the leaves."""
    coef, leaves = 1.0, []

    def visit(n: Any, top: bool) -> None:
        nonlocal coef
        c = scalar(gm, n)
        if c is not None:
            coef *= c
            return
        if isinstance(n, Node) and (top or len(n.users) == 1):
            if (ab := operands(n, MULS)) is not None:
                nodes.append(n)
                visit(ab[0], False)
                visit(ab[1], False)
                return
            if (ab := operands(n, DIVS)) is not None and (d := scalar(gm, ab[1])):
                nodes.append(n)
                coef /= d
                visit(ab[0], False)
                return
        leaves.append(n)

    visit(node, True)
    return coef, leaves


def _times(a: Poly, b: Poly) -> Poly:
    out: Poly = {}
    for i, ca in a.items():
        for j, cb in b.items():
            out[i + j] = out.get(i + j, 0.0) + ca * cb
    return out


def _poly(gm: GraphModule, node: Any, x: Node, nodes: list[Node]) -> Poly | None:
    """``node`` as a polynomial in ``x``, through arithmetic nodes that have no other user."""
    if node is x:
        return {1: 1.0}
    c = scalar(gm, node)
    if c is not None:
        return {0: c}
    if not isinstance(node, Node) or len(node.users) != 1:
        return None
    out: Poly | None = None
    if (ab := operands(node, MULS + ADDS + SUBS)) is not None:
        a, b = _poly(gm, ab[0], x, nodes), _poly(gm, ab[1], x, nodes)
        if a is not None and b is not None and node.target in MULS:
            out = _times(a, b)
        elif a is not None and b is not None:
            sign = -1.0 if node.target in SUBS else 1.0
            out = {i: a.get(i, 0.0) + sign * b.get(i, 0.0) for i in set(a) | set(b)}
    elif (ab := operands(node, DIVS)) is not None and (d := scalar(gm, ab[1])):
        a = _poly(gm, ab[0], x, nodes)
        out = None if a is None else {i: ca / d for i, ca in a.items()}
    elif is_call(node, POWS) and (n := scalar(gm, node.args[1])) in (2.0, 3.0):
        a = _poly(gm, node.args[0], x, nodes)
        out = None if a is None else _times(a, a) if n == 2.0 else _times(_times(a, a), a)
    elif is_call(node, (aten.neg.default,)):
        a = _poly(gm, node.args[0], x, nodes)
        out = None if a is None else {i: -ca for i, ca in a.items()}
    if out is not None:
        nodes.append(node)
    return out


def _poly_is(p: Poly, want: Poly) -> bool:
    terms = {i: c for i, c in p.items() if c != 0.0}
    return terms.keys() == want.keys() and all(close(terms[i], c) for i, c in want.items())


@dataclass(frozen=True)
class _Form:
    approximate: str
    fn: str  # the op inside: erf or tanh
    argument: Poly  # its argument, as a polynomial in x
    reads: str  # the argument, for a near miss


_FORMS = {
    aten.erf.default: _Form("none", "erf", {1: ERF_SCALE}, "x / sqrt(2)"),
    aten.tanh.default: _Form(
        "tanh",
        "tanh",
        {1: TANH_SCALE, 3: TANH_SCALE * TANH_CUBIC},
        "sqrt(2/pi) * (x + 0.044715 * x^3)",
    ),
}


def _match(gm: GraphModule, node: Node, inner: Any) -> Match | str | None:
    """``node`` as ``0.5 * x * (1 + inner(...))``, factors in any order, with ``inner`` erf
    (``x / sqrt(2)`` inside) or tanh (``sqrt(2/pi) * (x + 0.044715 * x^3)`` inside)."""
    nodes: list[Node] = []
    coef, leaves = _product(gm, node, nodes)
    found = [(h, fn) for h in leaves for fn in _one_plus(h)]
    if len(found) != 1 or found[0][1].target != inner:
        return None  # no (1 + erf(...)) factor, or the other form's: not this gelu
    h, fn = found[0]
    form = _FORMS[inner]
    one = next(a for a in h.args if a is not fn)
    if not close(scalar(gm, one), 1.0):
        return f"%{h.name} adds {one}, not 1, to {form.fn}(...)"
    others = [leaf for leaf in leaves if leaf is not h]
    if len(others) != 1 or not isinstance(others[0], Node) or not close(coef, 0.5):
        shared = [n for n in others if is_call(n, MULS + DIVS) and len(n.users) > 1]
        if shared:
            return f"intermediate %{shared[0].name} has other users"
        return (
            f"the product is {coef:g} x {len(others)} factor(s) x %{h.name}, "
            f"not 0.5 * x * (1 + {form.fn}(...))"
        )
    x = others[0]
    for inner_node in (h, fn):
        if len(inner_node.users) != 1:
            return f"intermediate %{inner_node.name} has other users"
    arg_nodes: list[Node] = []
    p = _poly(gm, fn.args[0], x, arg_nodes)
    if p is None or not _poly_is(p, form.argument):
        return f"the {form.fn} argument is not {form.reads} with x = %{x.name}"
    if not same_type(x, node):
        return f"%{x.name} and the result differ in shape or dtype"
    kwargs = {} if form.approximate == "none" else {"approximate": form.approximate}
    return Match(nodes + arg_nodes + [h, fn], Call(aten.gelu.default, (x,), kwargs))


def _one_plus(h: Any) -> list[Node]:
    """The erf/tanh node ``fn`` when ``h`` is ``fn + c`` or ``c + fn``."""
    ab = operands(h, ADDS)
    if ab is None:
        return []
    fns = [a for a in ab if is_call(a, tuple(_FORMS))]
    return fns if len(fns) == 1 else []


def _feeds_product(node: Node) -> bool:
    """Is ``node``'s only use a further factor of the same product (a later anchor)?"""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return operands(user, MULS) is not None or (
        operands(user, DIVS) is not None and user.args[0] is node
    )


def _gelu(node: Node, inner: Any) -> Match | str | None:
    found = _match(module_of(node), node, inner)
    if isinstance(found, str) and _feeds_product(node):
        return None  # a larger product may still complete the pattern: judge it at the last factor
    return found


def _erf_gelu(node: Node) -> Match | str | None:
    return _gelu(node, aten.erf.default)


def _tanh_gelu(node: Node) -> Match | str | None:
    return _gelu(node, aten.tanh.default)


PRODUCTS = (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar)

RULES = [
    # x * 0.5 * (1 + erf(x / sqrt(2)))                          -> gelu(x)
    Rule("gelu", PRODUCTS, _erf_gelu),
    # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))   -> gelu(x, approximate="tanh")
    Rule("gelu-tanh", PRODUCTS, _tanh_gelu),
]


@register_pass
@dataclass(frozen=True)
class FuseGelu(RulePass):
    """Replace gelu written out in elementary ops by one ``aten.gelu`` call.

    The erf form ``0.5 * x * (1 + erf(x / sqrt(2)))`` becomes ``gelu(x)``; the tanh form
    ``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`` (x^3 as ``pow`` or ``x*x*x``,
    or factored as ``x * (1 + 0.044715 * x * x)``) becomes ``gelu(x, approximate="tanh")``.
    Factors may come in any order, scales as a multiply or a divide, constants as Python
    numbers or one-element weights (an imported ONNX graph's form).

    before:  %m = mul(%x, 0.5); %d = div(%x, 1.41421); %e = erf(%d); %a = add(%e, 1)
             %y = mul(%m, %a)
    after:   %y = gelu(%x)
    """

    name = "fuse-gelu"
    contract = Contract.rounding()
    runs_before = ("fuse-pointwise",)
    rules = RULES
    stat = "fused"
