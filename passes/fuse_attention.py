"""fuse-attention: recognize attention written out as matmul, scale, mask, softmax, matmul and
call ``aten.scaled_dot_product_attention`` instead."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import tensor_val
from graphopt.ir.rules import Call, Match, Rule
from graphopt.passes.lib.patterns import (
    ADDS,
    DIVS,
    MULS,
    arg,
    broadcasts_to,
    constant_value,
    escaped,
    is_call,
    module_of,
    operands,
    scalar,
    shape,
)
from graphopt.pipeline.passes import RulePass, register_pass
from graphopt.verification.contracts import Contract

aten = torch.ops.aten

MATMULS = (aten.matmul.default, aten.bmm.default)
SOFTMAXES = (aten.softmax.int, aten._softmax.default)
FILLS = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
NOTS = (aten.bitwise_not.default, aten.logical_not.default)


@dataclass
class _Scores:
    """What lies between ``q @ k^T`` and the softmax: the scale and the masks."""

    scale: float = 1.0
    add_mask: Any = None  # an additive float mask
    fill_mask: Any = None  # a bool mask of the scores set to -inf
    nodes: list[Node] = field(default_factory=list)


@dataclass
class _Attention:
    q: Node
    k: Node
    v: Node
    qk: Node  # the q @ k^T node
    scores: _Scores


def _scaled(gm: GraphModule, node: Any) -> tuple[Node, float] | None:
    """``(t, c)`` when ``node`` is ``t * c``, ``c * t`` or ``t / c`` with a constant ``c``."""
    if (ab := operands(node, MULS)) is not None:
        for t, c in (ab, ab[::-1]):
            if isinstance(t, Node) and (value := scalar(gm, c)) is not None:
                return t, value
    if (ab := operands(node, DIVS)) is not None and (d := scalar(gm, ab[1])):
        return ab[0], 1 / d
    return None


def _reaches_scores(gm: GraphModule, node: Any) -> bool:
    """Does ``node`` come from a matmul through scales and masks (the scores side of an add)?"""
    while True:
        if is_call(node, MATMULS):
            return True
        if (ab := operands(node, ADDS)) is not None:
            return any(_reaches_scores(gm, a) for a in ab)
        if is_call(node, FILLS):
            node = node.args[0]
        elif (found := _scaled(gm, node)) is not None:
            node = found[0]
        else:
            return False


def _untransposed(node: Any) -> Node | None:
    """``k`` when ``node`` is ``k`` with its last two dims swapped (transpose or permute)."""
    val = tensor_val(node)
    if val is None or val.dim() < 2:
        return None
    rank = val.dim()
    if is_call(node, (aten.transpose.int,)):
        dims = {node.args[1] % rank, node.args[2] % rank}
        return node.args[0] if dims == {rank - 2, rank - 1} else None
    if is_call(node, (aten.permute.default,)):
        perm = [d % rank for d in node.args[1]]
        return node.args[0] if perm == [*range(rank - 2), rank - 1, rank - 2] else None
    return None


def _walk_scores(gm: GraphModule, sc: _Scores, s: Any) -> Node | str:
    """Walk up from the softmax input through masks and scales to ``q @ k^T``."""
    scaled = False
    while True:
        if (ab := operands(s, ADDS)) is not None:
            side = next((i for i in (0, 1) if _reaches_scores(gm, ab[i])), None)
            if side is None:
                break
            if sc.add_mask is not None or scaled:
                where = "twice" if sc.add_mask is not None else "before the scale"
                return f"additive mask %{s.name} is applied {where}"
            sc.add_mask = ab[1 - side]
            sc.nodes.append(s)
            s = ab[side]
        elif is_call(s, FILLS):
            value = scalar(gm, s.args[2])
            if sc.fill_mask is not None or value != -math.inf:
                why = "twice" if sc.fill_mask is not None else f"with {value}, not -inf"
                return f"%{s.name} masks the scores {why}"
            sc.fill_mask = s.args[1]
            sc.nodes.append(s)
            s = s.args[0]
        elif (found := _scaled(gm, s)) is not None:
            sc.nodes.append(s)
            s, c = found
            sc.scale *= c
            scaled = True
        else:
            break
    if not is_call(s, MATMULS):
        return "the softmax input is not q @ k^T [* scale] [+ mask]"
    return s


def _match(gm: GraphModule, node: Node) -> _Attention | str | None:
    p, v = node.args
    nodes = [node]
    if is_call(p, (aten.dropout.default,)) and is_call(p.args[0], SOFTMAXES):
        if arg(p, 2, "train", True) is not False:
            return f"%{p.name} is dropout in training mode"
        nodes.append(p)
        p = p.args[0]
    if not is_call(p, SOFTMAXES) or not isinstance(v, Node):
        return None
    nodes.append(p)
    rank = len(shape(p) or [])
    half = p.args[2] if p.target == aten._softmax.default else arg(p, 2, "dtype") is not None
    if p.args[1] not in (-1, rank - 1) or half:
        return f"%{p.name} is not a softmax over the last dim in the input dtype"
    sc = _Scores(nodes=nodes)
    qk = _walk_scores(gm, sc, p.args[0])
    if isinstance(qk, str):
        return qk
    q, kt = qk.args
    k = _untransposed(kt)
    if k is None:
        return f"%{kt.name} is not k with its last two dims swapped"
    sc.nodes += [qk, kt]
    if len(q.users) == 1 and (found := _scaled(gm, q)) is not None:  # (q * scale) @ k^T
        sc.nodes.append(q)
        q, c = found
        sc.scale *= c
    return _check(_Attention(q, k, v, qk, sc), node)


def _check(att: _Attention, node: Node) -> _Attention | str:
    qs, ks, vs, ss = shape(att.q), shape(att.k), shape(att.v), shape(att.qk)
    if qs is None or ks is None or vs is None or ss is None:
        return "q, k or v is not a tensor"
    if not (len(qs) == len(ks) == len(vs) and len(qs) in (3, 4)):
        return f"q, k, v have ranks {len(qs)}, {len(ks)}, {len(vs)}; want 3 or 4"
    if not (qs[:-2] == ks[:-2] == vs[:-2] and qs[-1] == ks[-1] and ks[-2] == vs[-2]):
        return f"q, k, v shapes {qs}, {ks}, {vs} are not consistent"
    dtypes = {tensor_val(n).dtype for n in (att.q, att.k, att.v)}  # type: ignore[union-attr]
    dtype = dtypes.pop()
    if dtypes or not dtype.is_floating_point:
        return "q, k, v are not all of one floating dtype"
    sc = att.scores
    if sc.scale <= 0:
        return f"the scale {sc.scale:g} is not positive"
    for mask, want in ((sc.add_mask, dtype), (sc.fill_mask, torch.bool)):
        mv = tensor_val(mask)
        if mask is None:
            continue
        if mv is None or mv.dtype != want or not broadcasts_to(shape(mask) or [], ss):
            return f"mask %{mask} is not a {want} tensor broadcastable to {ss}"
    if (leak := escaped(node, sc.nodes)) is not None:
        return f"intermediate %{leak.name} has other users"
    return att


def _is_causal(gm: GraphModule, fill: Node, qk: Node) -> bool:
    """Is the -inf mask exactly ``~ones(L, S).tril()``, what SDPA's ``is_causal`` masks?"""
    val = constant_value(gm, fill)
    length, source = tensor_val(qk).shape[-2:]  # type: ignore[union-attr]
    if not (isinstance(length, int) and isinstance(source, int)):
        return False
    if not isinstance(val, torch.Tensor) or val.dtype != torch.bool or val.dim() < 2:
        return False
    if any(d != 1 for d in val.shape[:-2]) or tuple(val.shape[-2:]) != (length, source):
        return False
    causal = torch.ones(length, source, dtype=torch.bool, device=val.device).tril()
    return torch.equal(~val.reshape(length, source), causal)


def _mask_kwargs(gm: GraphModule, att: _Attention) -> dict[str, Any]:
    fill, add = att.scores.fill_mask, att.scores.add_mask
    if fill is not None and add is None and _is_causal(gm, fill, att.qk):
        return {"is_causal": True}
    if fill is not None and add is None:  # SDPA's bool mask is True where scores are kept
        kept = fill.args[0] if is_call(fill, NOTS) else None
        kept_val = tensor_val(kept)
        if kept_val is None or kept_val.dtype != torch.bool:
            return {"attn_mask": Call(aten.logical_not.default, (fill,))}
        return {"attn_mask": kept}
    if fill is not None:  # both: one additive mask, -inf where the scores were filled
        return {"attn_mask": Call(aten.where.ScalarSelf, (fill, -math.inf, add))}
    return {"attn_mask": add} if add is not None else {}


def _attention(node: Node) -> Match | str | None:
    gm = module_of(node)
    att = _match(gm, node)
    if att is None or isinstance(att, str):
        return att
    kwargs = {**_mask_kwargs(gm, att), "scale": att.scores.scale}
    sdpa = Call(aten.scaled_dot_product_attention.default, (att.q, att.k, att.v), kwargs)
    return Match(att.scores.nodes, sdpa)


RULES = [
    # softmax(q @ k^T * scale [+ mask]) [-> dropout(eval)] @ v -> sdpa(q, k, v, mask, scale)
    Rule("attention", (aten.matmul.default, aten.bmm.default), _attention),
]


@register_pass
@dataclass(frozen=True)
class FuseAttention(RulePass):
    """Replace scaled dot-product attention written out in ops by one
    ``aten.scaled_dot_product_attention`` call (3-D or 4-D q, k, v).

    k^T may be a transpose or a permute of k's last two dims; the scale a multiply or divide
    by a constant, of the scores or of q; an additive float mask becomes ``attn_mask``, a
    ``masked_fill(mask, -inf)`` becomes the bool ``attn_mask`` ``~mask``, or ``is_causal=True``
    when the mask is a constant ``~ones(L, S).tril()``. Eval-mode dropout on the probabilities
    is dropped (``dropout_p=0``). One difference: a row whose scores are all masked is 0 after
    the rewrite (SDPA), where the written-out softmax gave NaN.

    before:  %kt = transpose(%k, -2, -1); %s = matmul(%q, %kt); %d = div(%s, 8.0)
             %a = add(%d, %mask); %p = softmax(%a, -1); %y = matmul(%p, %v)
    after:   %y = scaled_dot_product_attention(%q, %k, %v, attn_mask=%mask, scale=0.125)
    """

    name = "fuse-attention"
    contract = Contract.rounding()
    runs_before = ("fuse-pointwise",)
    rules = RULES
    stat = "fused"
