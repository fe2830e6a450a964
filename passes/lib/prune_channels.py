"""prune-channels: structured channel (and attention-head) pruning with a dependency analysis.

``dependency_groups`` finds the channel dimensions that must shrink together; ``prune_channels``
removes the least important channels of each prunable group physically (smaller weights, rebuilt
conv/linear/norm/reshape calls), so the result is a smaller dense model.

before:  %c = conv2d(%x, %w[16,3,3,3]); %r = relu(%c); %y = conv2d(%r, %w2[8,16,3,3])
after:   %c = conv2d(%x, %w'[12,3,3,3]); %r = relu(%c); %y = conv2d(%r, %w2'[8,12,3,3])

Channel identity is followed through elementwise ops (a residual add joins both operands' groups),
batch norm, layer norm over the channel dim, depthwise convs, pooling and spatial means, and maps
through concatenation (offsets) and flatten (each channel is ``H*W`` consecutive features). An
attention block ``qkv linear -> reshape(.., 3, heads, d) -> ... -> reshape(.., heads*d) -> proj``
forms a group whose unit is a whole head. Grouped (non-depthwise) convolutions, graph inputs and
outputs, and any op the analysis does not know make their group unprunable, with the reason.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from graphopt.ir.graph import attr_path, fake_mode_of, tensor_val
from graphopt.ir.rewriter import Rewriter
from graphopt.passes.lib.fusion import concrete_shape

aten = torch.ops.aten

CONVS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
LINEAR = aten.linear.default
UNARY = {
    aten.relu.default, aten.relu6.default, aten.hardtanh.default, aten.gelu.default,
    aten.silu.default, aten.sigmoid.default, aten.tanh.default, aten.hardswish.default,
    aten.hardsigmoid.default, aten.leaky_relu.default, aten.elu.default, aten.neg.default,
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
}  # fmt: skip
BINARY = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.maximum.default,
    aten.minimum.default, aten.masked_fill.Scalar, aten.where.self,
}  # fmt: skip
POOLS = {
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool1d.default, aten.avg_pool2d.default,
    aten.max_pool2d.default, aten.adaptive_max_pool2d.default,
}  # fmt: skip
RESHAPES = (aten.reshape.default, aten.view.default)
BN_PARAMS = {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}

# kept channel counts are rounded up to a multiple of this (for groups of 2 * ALIGN or more)
ALIGN = 8


@dataclass(frozen=True)
class Member:
    """One place a group's channels live: ``node.args[arg]`` along ``dim``.

    For a tensor argument, channel ``c`` is the indices ``o + c*rep .. o + (c+1)*rep - 1`` for each
    ``o`` in ``offsets``. For a list argument (a reshape's shape, layer norm's normalized_shape, a
    depthwise conv's groups) entry ``dim`` shrinks by ``rep`` per removed channel.
    """

    node: Node
    role: str  # "out" (producer rows), "in" (consumer columns), "param", "shape"
    arg: int
    dim: int
    offsets: tuple[int, ...] = (0,)
    rep: int = 1

    def text(self) -> str:
        where = f"{self.node.name}.args[{self.arg}]"
        extra = f" offsets={list(self.offsets)}" if self.offsets != (0,) else ""
        extra += f" rep={self.rep}" if self.rep != 1 else ""
        return f"{self.role} {where} dim={self.dim}{extra}"


@dataclass
class ChannelGroup:
    """Channel dimensions that must be pruned together; ``channels`` is the count of units
    (channels, or heads for ``kind == "head"``)."""

    channels: int
    members: list[Member] = field(default_factory=list)
    kind: str = "channel"
    reasons: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.reasons and any(m.role == "out" for m in self.members)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.role == "out" and m.arg == 1]

    def text(self) -> str:
        state = "prunable" if self.prunable else f"unprunable: {self.reason}"
        lines = [f"{self.kind} group C={self.channels} {state}"]
        lines += [f"  {m.text()}" for m in self.members]
        return "\n".join(lines)


# -- shapes ---------------------------------------------------------------------------------------


def _shape(node: Any) -> list[Any]:
    val = tensor_val(node)
    return list(val.shape) if val is not None else []


def _size(node: Any, dim: int) -> int | None:
    """The static size of ``node``'s dim, None if symbolic or absent."""
    shape = _shape(node)
    if not -len(shape) <= dim < len(shape):
        return None
    d = shape[dim]
    return d if isinstance(d, int) else None


def _groups(conv: Node) -> Any:
    return conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)


def _is_depthwise(conv: Node) -> bool:
    w = _shape(conv.args[1])
    return _groups(conv) != 1 and len(w) > 1 and w[1] == 1 and w[0] == _groups(conv)


def _is_producer(node: Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is LINEAR:
        return True
    return node.target in CONVS and _groups(node) == 1


def _out_axis(node: Node) -> int:
    return len(_shape(node)) - 1 if node.target is LINEAR else 1


def _weight_members(
    node: Node, role: str, dim: int, offsets: tuple[int, ...], rep: int
) -> list[Member]:
    out = [Member(node, role, 1, dim, offsets, rep)]
    bias = node.args[2] if len(node.args) > 2 else None
    if role == "out" and bias is not None:
        out.append(Member(node, "out", 2, 0, offsets, rep))
    return out


# -- the channel analysis --------------------------------------------------------------------------


class _Analysis:
    """Walks channel identity from every producer; values are nodes of an undirected networkx
    graph whose connected components are the groups."""

    def __init__(self, gm: GraphModule) -> None:
        self.gm = gm
        self.g: nx.Graph = nx.Graph()
        self.head_groups: list[ChannelGroup] = []
        self.attention_qkv: set[Node] = set()

    # bookkeeping on the networkx graph: axis, members and reasons per value
    def _note(self, v: Node, *, member: Member | None = None, reason: str | None = None) -> None:
        data = self.g.nodes[v]
        if member is not None:
            data["members"].append(member)
        if reason is not None and reason not in data["reasons"]:
            data["reasons"].append(reason)

    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            if node.op == "call_function" and node.target is LINEAR:
                head = _attention_group(node)
                if head is not None:
                    self.head_groups.append(head)
                    self.attention_qkv.add(node)
        for node in self.gm.graph.nodes:
            if _is_producer(node) and node not in self.attention_qkv and node not in self.g:
                self._walk(node, _out_axis(node))
        groups = []
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        for comp in sorted(nx.connected_components(self.g), key=lambda c: min(order[n] for n in c)):
            values = sorted(comp, key=order.__getitem__)
            first = values[0]
            size = _size(first, self.g.nodes[first]["axis"])
            group = ChannelGroup(channels=size or 0)
            for v in values:
                data = self.g.nodes[v]
                group.members += data["members"]
                group.reasons += [r for r in data["reasons"] if r not in group.reasons]
                if _size(v, data["axis"]) != size:
                    group.reasons.append(f"{v.name} has a different channel count")
            for m in group.members:
                arg = m.node.args[m.arg] if m.arg < len(m.node.args) else None
                if m.role != "shape" and not (isinstance(arg, Node) and arg.op == "get_attr"):
                    group.reasons.append(f"{m.node.name}.args[{m.arg}] is not a stored weight")
            if not group.producers and not group.reasons:
                group.reasons.append("no conv/linear produces these channels")
            groups.append(group)
        groups += self.head_groups
        return [g for g in groups if g.members]

    def _walk(self, start: Node, axis: int) -> None:
        stack = [(start, axis)]
        while stack:
            v, a = stack.pop()
            if "axis" in self.g.nodes.get(v, {}):
                if self.g.nodes[v]["axis"] != a:
                    self._note(v, reason=f"{v.name} carries the channels on two axes")
                continue
            self.g.add_node(v, axis=a, members=[], reasons=[])  # (re)sets v's attributes
            for other, oa in self._backward(v, a) + self._forward(v, a):
                self.g.add_edge(v, other)
                stack.append((other, oa))

    # v's definition: which inputs carry the same channels (or the producer's members)
    def _backward(self, v: Node, a: int) -> list[tuple[Node, int]]:
        if _is_producer(v) and a == _out_axis(v):
            for m in _weight_members(v, "out", 0, (0,), 1):
                self._note(v, member=m)
            return []
        if v.op == "placeholder":
            self._note(v, reason=f"channels come from graph input {v.name}")
            return []
        if v.op != "call_function":
            self._note(v, reason=f"channels come from {v.op} {v.name}")
            return []
        links = _identity_links(v, a)
        if links is None:
            self._note(v, reason=f"channels come from unsupported {_op(v)} ({v.name})")
            return []
        for m in links[1]:
            self._note(v, member=m)
        return links[0]

    # v's users: identity ops (same channels), consumers (members), mapped views (cat, flatten)
    def _forward(self, v: Node, a: int) -> list[tuple[Node, int]]:
        found: list[tuple[Node, int]] = []
        for user in v.users:
            if user.op == "output":
                self._note(v, reason=f"graph output exposes the channels of {v.name}")
                continue
            consumed = _consumer(user, v, a)
            if consumed is not None:
                for m in consumed:
                    self._note(v, member=m)
                continue
            mapped = _mapped(user, v, a)
            if mapped is not None:
                out, out_axis, offsets, rep = mapped
                members, why = _trace_mapped(out, out_axis, offsets, rep)
                members = _view_shape(out, out_axis, rep) + members
                for m in members:
                    self._note(v, member=m)
                if why:
                    self._note(v, reason=why)
                continue
            out_axis = _forward_axis(user, v, a)
            if user.target in CONVS and user.args[0] is v and out_axis is None:
                self._note(
                    v, reason=f"grouped conv {user.name} (groups={_groups(user)}) not handled"
                )
                continue
            if out_axis is None:
                self._note(v, reason=f"unsupported consumer {_op(user)} ({user.name})")
                continue
            for m in _view_shape(user, out_axis):
                self._note(v, member=m)
            found.append((user, out_axis))
        return found


def _op(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _aligned(node: Any, out: Node, out_axis: int) -> int | None:
    """The axis of input ``node`` broadcast against ``out``'s ``out_axis`` (None: absent or 1)."""
    rank = len(_shape(node))
    axis = out_axis - (len(_shape(out)) - rank)
    if axis < 0 or str(_shape(node)[axis]) == "1":
        return None
    return axis


def _spatial_mean(node: Node, a: int) -> int | None:
    """For mean.dim over dims not including ``a``: ``a``'s axis in the result."""
    dims = node.args[1] if len(node.args) > 1 else None
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    rank = len(_shape(node.args[0]))
    if not isinstance(dims, (list, tuple)) or not dims:
        return None
    dims = [d % rank for d in dims]
    if a in dims:
        return None
    return a if keep else a - sum(d < a for d in dims)


def _forward_axis(user: Node, v: Node, a: int) -> int | None:
    """The channel axis of ``user``'s result when ``user`` keeps ``v``'s channel identity."""
    t = user.target
    if user.op != "call_function":
        return None
    if t in UNARY and user.args[0] is v:
        return a
    if t in BINARY:
        return a + len(_shape(user)) - len(_shape(v))
    if t is aten.batch_norm.default and user.args[0] is v and a == 1:
        return a
    if t is aten.layer_norm.default and user.args[0] is v:
        return a if list(user.args[1]) == [_size(v, a)] and a == len(_shape(v)) - 1 else None
    if t in CONVS and user.args[0] is v and a == 1 and _is_depthwise(user):
        return a
    if t in POOLS and user.args[0] is v and a == 1:
        return a
    if t is aten.mean.dim and user.args[0] is v:
        return _spatial_mean(user, a)
    if (rng := _flatten_of(user, v)) is not None:
        start, end = rng
        if a < start:
            return a
        if a > end:
            return a - (end - start)
        return start if _flat_rep(v, a, end) == 1 and a == start else None
    return None


def _identity_links(v: Node, a: int) -> tuple[list[tuple[Node, int]], list[Member]] | None:
    """Inputs of ``v`` carrying ``v``'s channels (and ``v``'s own per-channel params)."""
    t = v.target
    x = v.args[0] if v.args else None
    if t in UNARY:
        return [(x, a)], []
    if t in BINARY:
        ins = [arg for arg in v.args if isinstance(arg, Node)]
        links = [(arg, ax) for arg in ins if (ax := _aligned(arg, v, a)) is not None]
        return links, []
    if t is aten.batch_norm.default and a == 1:
        params = [Member(v, "param", i, 0) for i in BN_PARAMS if v.args[i] is not None]
        return [(x, a)], params
    if t is aten.layer_norm.default and _forward_axis(v, x, a) == a:
        params = [Member(v, "param", i, 0) for i in (2, 3) if v.args[i] is not None]
        return [(x, a)], [Member(v, "shape", 1, 0), *params]
    if t in CONVS and a == 1 and _is_depthwise(v):
        w = _weight_members(v, "param", 0, (0,), 1)
        bias = [Member(v, "param", 2, 0)] if len(v.args) > 2 and v.args[2] is not None else []
        groups = [Member(v, "shape", 6, -1)] if len(v.args) > 6 else []
        return [(x, a)], w[:1] + bias + groups
    if t in POOLS and a == 1:
        return [(x, a)], []
    if t is aten.mean.dim:
        for ax in range(len(_shape(x))):
            if _spatial_mean(v, ax) == a:
                return [(x, ax)], []
    if _flatten_of(v, x) is not None:
        for ax in range(len(_shape(x))):
            if _forward_axis(v, x, ax) == a:
                return [(x, ax)], _view_shape(v, a)
    return None


def _view_shape(view: Node, axis: int, rep: int = 1) -> list[Member]:
    """A ``view``/``reshape`` spells its result's shape out: entry ``axis`` shrinks with the
    channels (``flatten`` computes its own)."""
    return [Member(view, "shape", 1, axis, rep=rep)] if view.target in RESHAPES else []


def _consumer(
    user: Node, v: Node, a: int, offsets: tuple[int, ...] = (0,), rep: int = 1
) -> list[Member] | None:
    """Members for a layer that reads ``v``'s channels as its input features."""
    if user.op != "call_function" or not user.args or user.args[0] is not v:
        return None
    if user.target is LINEAR and a == len(_shape(v)) - 1:
        return [Member(user, "in", 1, 1, offsets, rep)]
    if user.target in CONVS and a == 1 and _groups(user) == 1:
        return [Member(user, "in", 1, 1, offsets, rep)]
    return None


def _flatten_of(node: Node, x: Any) -> tuple[int, int] | None:
    """``(start, end)`` when ``node`` flattens dims ``start..end`` of its input ``x``: a
    ``flatten``, or a ``view``/``reshape`` that merges one run of dims and keeps the others
    (captured functional, ``nn.Flatten`` is a ``view``); None otherwise."""
    if node.op != "call_function" or not node.args or node.args[0] is not x:
        return None
    if node.target is aten.flatten.using_ints:
        return _flatten_range(node, x)
    if node.target not in RESHAPES:
        return None
    before, after = [str(d) for d in _shape(x)], [str(d) for d in _shape(node)]
    merged = len(before) - len(after)
    if not before or not after or merged < 0:
        return None
    for start in range(len(after)):  # size-1 dims make more than one reading possible
        end = start + merged
        if before[:start] != after[:start] or before[end + 1 :] != after[start + 1 :]:
            continue
        sizes = [_size(x, d) for d in range(start, end + 1)]
        if all(s is not None for s in sizes) and str(math.prod(sizes)) == after[start]:  # type: ignore[arg-type]
            return start, end
    return None


def _flatten_range(node: Node, x: Node) -> tuple[int, int]:
    rank = len(_shape(x))
    start = node.args[1] if len(node.args) > 1 else 0
    end = node.args[2] if len(node.args) > 2 else -1
    return start % rank, end % rank


def _flat_rep(x: Node, a: int, end: int) -> int | None:
    sizes = [_size(x, d) for d in range(a + 1, end + 1)]
    return None if any(s is None for s in sizes) else math.prod(sizes)  # type: ignore[misc]


def _mapped(user: Node, v: Node, a: int) -> tuple[Node, int, tuple[int, ...], int] | None:
    """A view where ``v``'s channels become a slice (cat) or blocks (flatten) of a new axis."""
    if user.target is aten.cat.default:
        tensors = list(user.args[0])
        dim = (user.args[1] if len(user.args) > 1 else 0) % len(_shape(user))
        if dim != a or tensors.count(v) != 1:
            return None
        before = [_size(t, a) for t in tensors[: tensors.index(v)]]
        if any(s is None for s in before):
            return None
        return user, a, (sum(before),), 1  # type: ignore[arg-type]
    if (rng := _flatten_of(user, v)) is not None:
        start, end = rng
        rep = _flat_rep(v, a, end)
        if a == start and rep is not None and rep > 1:
            return user, start, (0,), rep
    return None


def _trace_mapped(
    out: Node, axis: int, offsets: tuple[int, ...], rep: int
) -> tuple[list[Member], str | None]:
    """Consumers of a mapped view, through elementwise ops, batch norm and nested cat/flatten."""
    members: list[Member] = []
    for user in out.users:
        if user.op == "output":
            return members, f"graph output exposes the channels of {out.name}"
        consumed = _consumer(user, out, axis, offsets, rep)
        if consumed is not None:
            members += consumed
            continue
        if user.target is aten.batch_norm.default and axis == 1 and user.args[0] is out:
            members += [
                Member(user, "param", i, 0, offsets, rep)
                for i in BN_PARAMS
                if user.args[i] is not None
            ]
        elif user.target in UNARY and user.args[0] is out:
            pass
        elif (mapped := _mapped(user, out, axis)) is not None:
            nxt, nax, noff, nrep = mapped
            inner = tuple(n + o * nrep for o in offsets for n in noff)
            more, why = _trace_mapped(nxt, nax, inner, rep * nrep)
            members += _view_shape(nxt, nax, rep * nrep) + more
            if why:
                return members, why
            continue
        else:
            return members, f"unsupported consumer {_op(user)} ({user.name}) of {out.name}"
        more, why = _trace_mapped(user, axis, offsets, rep)
        members += more
        if why:
            return members, why
    return members, None


# -- attention heads --------------------------------------------------------------------------------


def _head_axis_after(node: Node, x: Node, a: int) -> int | None:
    """Where the heads axis ``a`` of ``x`` lands in ``node``'s result, for ops inside attention."""
    t = node.target
    rank = len(_shape(x))
    if t is aten.permute.default:
        return [d % rank for d in node.args[1]].index(a)
    if t is aten.transpose.int:
        d0, d1 = node.args[1] % rank, node.args[2] % rank
        return d1 if a == d0 else d0 if a == d1 else a
    if t is aten.matmul.default:
        other = node.args[1] if node.args[0] is x else node.args[0]
        ok = a < rank - 2 and len(_shape(other)) == rank
        return a if ok else None
    if t in UNARY or t in BINARY:
        return a + len(_shape(node)) - rank
    if t in (aten.softmax.int, aten._softmax.default):
        return a if node.args[1] % rank != a else None
    return None


def _attention_group(qkv: Node) -> ChannelGroup | None:
    """qkv linear -> reshape(.., 3, heads, d) -> ... -> reshape(.., heads*d) -> proj linear.

    Returns None when ``qkv`` does not start this pattern, an unprunable head group when the
    heads reach something the analysis cannot follow.
    """
    users = list(qkv.users)
    if len(users) != 1 or users[0].target not in RESHAPES:
        return None
    r = users[0]
    out = _shape(r)
    if len(out) < 3 or not all(isinstance(d, int) for d in out[-3:]) or out[-3] != 3:
        return None
    heads, dh = out[-2], out[-1]
    if _size(qkv, -1) != 3 * heads * dh or not isinstance(r.args[1], (list, tuple)):
        return None
    if r.args[1][-2] != heads:
        return None
    width = heads * dh
    group = ChannelGroup(channels=heads, kind="head")
    group.members += _weight_members(qkv, "out", 0, (0, width, 2 * width), dh)
    group.members.append(Member(r, "shape", 1, len(out) - 2))
    seen: dict[Node, int] = {}
    stack = [(r, len(out) - 2)]
    while stack:
        v, a = stack.pop()
        if v in seen:
            if seen[v] != a:
                group.reasons.append(f"heads on two axes at {v.name}")
            continue
        seen[v] = a
        for user in v.users:
            why = _follow_heads(user, v, a, heads, dh, group, stack)
            if why:
                group.reasons.append(why)
                return group
    for node in seen:  # every other operand of a visited op broadcasts over the heads
        for arg in node.all_input_nodes if node is not r else []:
            if node.target is aten.matmul.default:
                ax: int | None = 0
            else:
                ax = _aligned(arg, node, seen[node]) if node.target in BINARY else None
            if ax is not None and arg not in seen:
                group.reasons.append(f"{arg.name} meets the heads at {node.name}")
                return group
    return group


def _follow_heads(
    user: Node,
    v: Node,
    a: int,
    heads: int,
    dh: int,
    group: ChannelGroup,
    stack: list[tuple[Node, int]],
) -> str | None:
    if user.op == "output":
        return f"graph output exposes the heads of {v.name}"
    t = user.target
    if t is aten.unbind.int:
        dim = (user.args[1] if len(user.args) > 1 else 0) % len(_shape(v))
        if dim == a or any(u.target is not operator.getitem for u in user.users):
            return f"unsupported unbind {user.name}"
        stack += [(g, a - (dim < a)) for g in user.users]
        return None
    if t in RESHAPES:
        shape, out = _shape(v), _shape(user)
        merged = (
            a == len(shape) - 2
            and len(out) == len(shape) - 1
            and out[-1] == heads * dh
            and [str(d) for d in out[:-1]] == [str(d) for d in shape[:-2]]
            and isinstance(user.args[1], (list, tuple))
            and user.args[1][-1] == heads * dh
        )
        if not merged:
            return f"unsupported reshape {user.name} of the heads"
        group.members.append(Member(user, "shape", 1, len(out) - 1, rep=dh))
        members, why = _trace_mapped(user, len(out) - 1, (0,), dh)
        group.members += members
        return why
    nxt = _head_axis_after(user, v, a)
    if nxt is None:
        return f"unsupported op {_op(user)} ({user.name}) on the heads"
    stack.append((user, nxt))
    return None


def dependency_groups(gm: GraphModule) -> list[ChannelGroup]:
    """The groups of coupled channel dims of ``gm`` (attention head groups last)."""
    return _Analysis(gm).run()


def format_groups(groups: Sequence[ChannelGroup]) -> str:
    return "\n".join(g.text() for g in groups) + "\n"


# -- importance -------------------------------------------------------------------------------------


def _tensor(gm: GraphModule, m: Member) -> torch.Tensor | None:
    arg = m.node.args[m.arg] if m.arg < len(m.node.args) else None
    if isinstance(arg, Node) and arg.op == "get_attr":
        return attr_path(gm, str(arg.target))
    return None


def _unit_indices(m: Member, c: int) -> list[int]:
    return [o + c * m.rep + j for o in m.offsets for j in range(m.rep)]


def _per_unit(t: torch.Tensor, m: Member, units: int) -> torch.Tensor:
    """Sum of ``t`` (non-negative scores along ``m.dim``) per unit of the group."""
    return torch.stack([t[_unit_indices(m, c)].sum() for c in range(units)])


def _l1(gm: GraphModule, group: ChannelGroup) -> torch.Tensor:
    score = torch.zeros(group.channels, dtype=torch.float64)
    for m in group.producers:
        w = _tensor(gm, m)
        assert w is not None
        rows = w.detach().abs().to(torch.float64).reshape(w.shape[0], -1).sum(1)
        s = _per_unit(rows, m, group.channels)
        score += s / s.sum().clamp_min(1e-12)
    return score


def _bn_gamma(gm: GraphModule, group: ChannelGroup) -> torch.Tensor:
    for m in group.members:
        if m.node.target is aten.batch_norm.default and m.arg == 1:
            gamma = _tensor(gm, m)
            if gamma is not None:
                return _per_unit(gamma.detach().abs().to(torch.float64), m, group.channels)
    return _l1(gm, group)


def _taylor_grads(gm: GraphModule, inputs: Sequence[Any]) -> dict[Node, torch.Tensor]:
    """|activation * gradient| of every producer output, loss = sum of squared outputs."""
    acts: dict[Node, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: Node) -> Any:
            out = super().run_node(n)
            if _is_producer(n) and isinstance(out, torch.Tensor) and out.is_floating_point():
                out = out.detach().requires_grad_()
                acts[n] = out
            return out

    with torch.enable_grad():
        outs = Recorder(gm).run(*inputs)
        leaves = [
            o for o in pytree.tree_leaves(outs) if isinstance(o, torch.Tensor) and o.requires_grad
        ]
        if not leaves or not acts:
            return {}
        loss = sum((o.float() ** 2).sum() for o in leaves)
        grads = torch.autograd.grad(loss, list(acts.values()), allow_unused=True)
    return {
        n: (a.detach() * g).abs().to(torch.float64)
        for (n, a), g in zip(acts.items(), grads)
        if g is not None
    }


def _taylor(gm: GraphModule, group: ChannelGroup, taylor: dict[Node, torch.Tensor]) -> torch.Tensor:
    score = torch.zeros(group.channels, dtype=torch.float64)
    for m in group.producers:
        t = taylor.get(m.node)
        if t is None:
            continue
        axis = _out_axis(m.node)
        per = t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1)
        s = _per_unit(per, m, group.channels)
        score += s / s.sum().clamp_min(1e-12)
    return score if score.sum() > 0 else _l1(gm, group)


# -- applying removals --------------------------------------------------------------------------------


def _flops(node: Node) -> int:
    """Multiply-adds x 2 of a conv or linear at the example shapes."""
    out, w = tensor_val(node), tensor_val(node.args[1])
    if out is None or w is None or node.target not in (*CONVS, LINEAR):
        return 0
    per_out = math.prod(w.shape[1:]) if node.target in CONVS else w.shape[1]
    return 2 * math.prod(concrete_shape(out)) * int(per_out)


def _removed_indices(m: Member, removed: Sequence[int]) -> list[int]:
    return sorted(i for c in removed for i in _unit_indices(m, c))


def _cost(
    gm: GraphModule, group: ChannelGroup, removed: Sequence[int]
) -> tuple[int, int, int, int]:
    """(params, params after, flops, flops after) of the tensors and layers this group touches."""
    params = params_after = flops = flops_after = 0
    seen: set[tuple[Node, int]] = set()
    for m in group.members:
        if m.role == "shape" or (m.node, m.arg) in seen:
            continue
        seen.add((m.node, m.arg))
        t = _tensor(gm, m)
        if t is None:
            continue
        kept = 1 - len(_removed_indices(m, removed)) / t.shape[m.dim]
        params += t.numel()
        params_after += round(t.numel() * kept)
        if m.arg == 1:
            f = _flops(m.node)
            flops += f
            flops_after += round(f * kept)
    return params, params_after, flops, flops_after


@dataclass
class _Plan:
    """Index removals per (node, arg, dim) and shape-entry shrinkage per (node, arg, entry)."""

    drop: dict[tuple[Node, int, int], set[int]] = field(default_factory=dict)
    shrink: dict[tuple[Node, int, int], int] = field(default_factory=dict)

    def add(self, group: ChannelGroup, removed: Sequence[int]) -> None:
        shrunk: set[tuple[Node, int, int]] = set()  # a group may reach a shape both ways
        for m in group.members:
            if m.role == "shape":
                key = (m.node, m.arg, m.dim)
                if key in shrunk:
                    continue
                shrunk.add(key)
                self.shrink[key] = self.shrink.get(key, 0) + len(removed) * m.rep
            else:
                key = (m.node, m.arg, m.dim)
                self.drop.setdefault(key, set()).update(_removed_indices(m, removed))

    def nodes(self) -> set[Node]:
        return {k[0] for k in self.drop} | {k[0] for k in self.shrink}


def _new_args(gm: GraphModule, node: Node, plan: _Plan, rw: Rewriter) -> tuple[Any, ...]:
    args = list(node.args)
    for i, arg in enumerate(args):
        dims = {d: idx for (n, a, d), idx in plan.drop.items() if n is node and a == i}
        if dims and isinstance(arg, Node):
            t = attr_path(gm, str(arg.target))
            for d, idx in dims.items():
                keep = [j for j in range(t.shape[d]) if j not in idx]
                t = t.index_select(d, torch.tensor(keep, dtype=torch.long))
            args[i] = rw.constant(t.clone(), hint=f"{node.name}_{i}_pruned", sources=[node, arg])
        shrink = {e: s for (n, a, e), s in plan.shrink.items() if n is node and a == i}
        if shrink and isinstance(arg, (list, tuple)):
            entries = list(arg)
            for e, s in shrink.items():
                entries[e] = entries[e] - s
            args[i] = type(arg)(entries)
        elif shrink and isinstance(arg, int):
            args[i] = arg - sum(shrink.values())
    return tuple(args)


def _apply(gm: GraphModule, rw: Rewriter, plan: _Plan) -> None:
    """Rebuild every planned node in graph order, refreshing the metadata of what follows."""
    mode = fake_mode_of(gm)
    todo = plan.nodes()
    changed: set[Node] = set()

    def val(a: Any) -> Any:
        return a.meta["val"] if isinstance(a, Node) else a

    for node in list(gm.graph.nodes):
        if node in todo:
            new = rw.call(
                node.target,
                _new_args(gm, node, plan, rw),
                dict(node.kwargs),
                before=node,
                sources=[node],
            )
            rw.replace(node, new)
            changed.add(new)
        elif node.op == "call_function" and any(a in changed for a in node.all_input_nodes):
            # the op is unchanged but its input shapes shrank: recompute its metadata
            args = torch.fx.node.map_aggregate(node.args, val)
            kwargs = torch.fx.node.map_aggregate(node.kwargs, val)
            with mode:
                node.meta["val"] = node.target(*args, **kwargs)
            changed.add(node)


Scorer = Callable[[ChannelGroup], torch.Tensor]


def _scorer(gm: GraphModule, importance: str, inputs: Sequence[Any] | None) -> Scorer:
    if importance == "l1":
        return lambda g: _l1(gm, g)
    if importance == "bn_gamma":
        return lambda g: _bn_gamma(gm, g)
    if importance == "taylor":
        if inputs is None:
            raise ValueError("importance='taylor' needs example inputs")
        grads = _taylor_grads(gm, inputs)
        return lambda g: _taylor(gm, g, grads)
    raise ValueError(f"unknown importance {importance!r}; use l1, bn_gamma or taylor")


def _layer_name(group: ChannelGroup) -> str:
    if not group.members:
        return "?"
    m = group.producers[0] if group.producers else group.members[0]
    w = m.node.args[1] if len(m.node.args) > 1 else None
    if isinstance(w, Node) and w.op == "get_attr":
        return str(w.target).removesuffix(".weight")
    return m.node.name


def prune_channels(
    gm: GraphModule,
    rw: Rewriter,
    *,
    amount: float,
    importance: str = "l1",
    inputs: Sequence[Any] | None = None,
) -> list[dict[str, Any]]:
    """Remove ``floor(amount * C)`` of the least important channels (heads) of every prunable
    group of ``gm``, keeping at least one; returns one row per group.

    All groups are analysed and scored on the unpruned graph, then every affected layer is rebuilt
    once with new, smaller weights (the model's own tensors are never touched).
    """
    groups = dependency_groups(gm)
    score = _scorer(gm, importance, inputs)
    plan = _Plan()
    rows = []
    for group in groups:
        c = group.channels
        row: dict[str, Any] = {
            "layer": _layer_name(group),
            "kind": group.kind,
            "channels": f"{c}->{c}",
        }
        n_remove = min(math.floor(amount * c), c - 1)
        if group.kind == "channel" and c >= 2 * ALIGN:
            # keep a multiple of ALIGN channels: CPU and GPU conv/GEMM kernels run much slower on
            # odd channel counts, so the smaller model would not be faster
            keep = -(-(c - n_remove) // ALIGN) * ALIGN
            n_remove = c - min(keep, c)
        if not group.prunable or n_remove <= 0 or not rw.allowed():
            why = group.reason or ("nothing to remove" if n_remove <= 0 else "rewrite budget spent")
            params, _, flops, _ = _cost(gm, group, [])
            rows.append({**row, "sparsity": 0.0, "params_before": params, "params_after": params,
                         "flops_before": flops, "flops_after": flops, "status": "skipped", "why": why})  # fmt: skip
            continue
        order = torch.argsort(score(group), stable=True)
        removed = sorted(order[:n_remove].tolist())
        plan.add(group, removed)
        params, params_after, flops, flops_after = _cost(gm, group, removed)
        rows.append({**row, "sparsity": n_remove / c, "params_before": params, "params_after": params_after,
                     "flops_before": flops, "flops_after": flops_after, "status": "pruned", "why": "",
                     "channels": f"{c}->{c - n_remove}"})  # fmt: skip
    if plan.drop or plan.shrink:
        _apply(gm, rw, plan)
    return rows
