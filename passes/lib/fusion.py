"""Fusion analysis shared by the fusion passes.

* :func:`partition` splits a graph into fusion groups: it merges a node into the group of one of
  its producers when the caller's predicate allows it and the merge creates no cycle, checked on
  the node DAG with networkx (a merge is illegal when a path leaves the group and comes back).
* :func:`program_of_nodes` turns a group into a :class:`graphopt.ir.program.Program`: its external
  tensor inputs in order, its calls, and as outputs every member whose value escapes the group.
* :func:`example_like` builds random example tensors from ``meta["val"]`` (symbolic sizes take
  their example value) so a pass can measure a candidate against the unfused ATen graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from graphopt.ir.program import Call, Program, Ref, op_name


def _hint(d: Any) -> int:
    if isinstance(d, int):
        return d
    node = getattr(d, "node", None)
    hint = getattr(node, "hint", None) if node is not None else None
    if hint is None:
        return int(node.shape_env.size_hint(node.expr)) if node is not None else int(d)
    return int(hint)


def concrete_shape(val: torch.Tensor) -> list[int]:
    return [_hint(d) for d in val.shape]


def example_like(val: Any, seed: int = 0) -> Any:
    """A real tensor with ``val``'s shape, dtype and device: random, never all zeros."""
    if not isinstance(val, torch.Tensor):
        return val
    shape = concrete_shape(val)
    g = torch.Generator().manual_seed(seed)
    if val.dtype == torch.bool:
        t = torch.rand(shape, generator=g) > 0.3
    elif val.dtype.is_floating_point:
        t = torch.randn(shape, generator=g).to(val.dtype)
    else:
        t = torch.randint(0, 3, shape, generator=g).to(val.dtype)
    return t.to(val.device)


def escaping(nodes: Sequence[Node]) -> list[Node]:
    """Members whose value is used outside the group (or is a graph output), in order."""
    members = set(nodes)
    return [n for n in nodes if any(u not in members for u in n.users)]


def program_of_nodes(nodes: Sequence[Node]) -> tuple[Program, list[Node], list[Node]]:
    """(program, external tensor inputs, escaping members) of a group in topological order."""
    index = {n: j for j, n in enumerate(nodes)}
    inputs: list[Node] = []

    def arg(a: Any) -> Any:
        if isinstance(a, Node):
            if a in index:
                return Ref("node", index[a])
            if a not in inputs:
                inputs.append(a)
            return Ref("in", inputs.index(a))
        if isinstance(a, (list, tuple)):
            return tuple(arg(v) for v in a)
        return a

    calls = []
    for n in nodes:
        args = tuple(arg(a) for a in n.args)
        kwargs = tuple((k, arg(v)) for k, v in n.kwargs.items())
        calls.append(Call(op_name(n.target), args, kwargs))
    outs = escaping(nodes)
    return (
        Program(len(inputs), tuple(calls), tuple(Ref("node", index[n]) for n in outs)),
        inputs,
        outs,
    )


def node_dag(gm: GraphModule) -> nx.DiGraph:
    dag = nx.DiGraph()
    for n in gm.graph.nodes:
        dag.add_node(n)
        for user in n.users:
            dag.add_edge(n, user)
    return dag


def merge_makes_cycle(dag: nx.DiGraph, group: set[Node], node: Node) -> bool:
    """True if adding ``node`` to ``group`` creates a cycle: some path leaves the group (or
    ``node``) through an outside node and comes back into the merged group."""
    merged = group | {node}
    for member in merged:
        for succ in dag.successors(member):
            if succ in merged:
                continue
            reach = nx.descendants(dag, succ)
            if reach & merged:
                return True
    return False


def partition(
    gm: GraphModule,
    fusible: Callable[[Node], bool],
    can_merge: Callable[[list[Node], Node], str | None],
) -> list[list[Node]]:
    """Greedy producer-consumer grouping of fusible nodes in topological order.

    A node joins the group of the first producer for which ``can_merge(group, node)`` returns
    None (the reason otherwise) and the merge makes no cycle; otherwise it starts a group.
    Groups come back in topological order, members in graph order; singletons included.
    """
    dag = node_dag(gm)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    group_of: dict[Node, int] = {}
    groups: list[list[Node]] = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not fusible(node):
            continue
        placed = False
        seen: set[int] = set()
        for producer in node.all_input_nodes:
            gid = group_of.get(producer)
            if gid is None or gid in seen:
                continue
            seen.add(gid)
            members = groups[gid]
            if can_merge(members, node) is None and not merge_makes_cycle(dag, set(members), node):
                members.append(node)
                group_of[node] = gid
                placed = True
                break
        if not placed:
            group_of[node] = len(groups)
            groups.append([node])
    for members in groups:
        members.sort(key=order.__getitem__)
    return sorted(groups, key=lambda g: order[g[0]])


def no_gain_on(target: Any, device: torch.device) -> str | None:
    """Why a graphopt op cannot beat ATen on ``device`` without measuring, or None."""
    from graphopt.ops.fused import REFERENCE_ONLY_ON_CPU

    if device.type == "cpu" and target in REFERENCE_ONLY_ON_CPU:
        return f"{target} is its ATen reference on the CPU (kernels are CUDA-only): no gain"
    return None


# a fusion must win by this fraction: timing noise must not flip a compile's result
MARGIN = 0.03


def measured_faster(
    key: str,
    unfused: Callable[[], Any],
    fused: Callable[[], Any],
    device: torch.device | str,
) -> str | None:
    """None when ``fused`` measures faster than ``unfused`` on ``device`` (cached per key);
    otherwise the near-miss reason with both times."""
    from graphopt.ops.autotune import choose, device_name

    _, times = choose(key, {"aten": unfused, "fused": fused}, device)
    if times["fused"] < times["aten"] * (1 - MARGIN):
        return None
    return (
        f"not faster on {device_name(device)}: fused {times['fused'] * 1e3:.3f} ms vs "
        f"ATen {times['aten'] * 1e3:.3f} ms"
    )


# -- rule-driven fusion: match, measure, rewrite ---------------------------------------------------


class Match:
    """A rule's proposal: compute ``target(*args, **kwargs)`` in place of ``nodes``.

    ``nodes`` are the matched calls in graph order (the last is the anchor); ``replaces`` lists
    the members whose values the new call provides, each with the index of its result in a
    tuple-returning op (None when the op returns one tensor). Every other member must be used
    only inside the match.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        target: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        replaces: Sequence[tuple[Node, int | None]] | None = None,
    ) -> None:
        self.nodes = list(nodes)
        self.target = target
        self.args = args
        self.kwargs = kwargs or {}
        self.replaces = list(replaces) if replaces is not None else [(self.nodes[-1], None)]


# a rule looks at its anchor node: None (not this pattern), a near-miss reason, or a Match
Matcher = Callable[[Node], "Match | str | None"]
FusionRule = tuple[str, tuple[Any, ...], Matcher]


def internal_users_only(match_nodes: Sequence[Node], keep: Sequence[Node]) -> str | None:
    """Reason a match is illegal because an intermediate escapes; None when it is legal."""
    members = set(match_nodes)
    for n in match_nodes:
        if n in keep:
            continue
        outside = [u for u in n.users if u not in members]
        if outside:
            return f"intermediate %{n.name} is also used by %{outside[0].name}"
    return None


def _run_match(match: Match, gm: GraphModule) -> tuple[Callable[[], Any], Callable[[], Any], str]:
    """(unfused, fused) callables on example inputs, and a shape key, for measuring."""
    program, inputs, _ = program_of_nodes(match.nodes)
    values = {n: example_like(n.meta.get("val"), seed=i) for i, n in enumerate(inputs)}
    ins = [values[n] for n in inputs]

    def real(a: Any) -> Any:
        if isinstance(a, Node):
            if a not in values:
                values[a] = example_like(a.meta.get("val"))
            return values[a]
        if isinstance(a, (list, tuple)):
            return type(a)(real(v) for v in a)
        return a

    args = real(match.args)
    kwargs = {k: real(v) for k, v in match.kwargs.items()}
    from graphopt.ops.fused import DIRECT

    target = DIRECT.get(match.target, match.target)  # as the compiled model will call it
    from graphopt.ops.autotune import shape_key

    key = f"{program.key} {shape_key(*ins)}"
    return (lambda: program.run(ins)), (lambda: target(*args, **kwargs)), key


def apply_fusion_rules(
    gm: GraphModule,
    rules: Sequence[FusionRule],
    rw: Any,
    *,
    measure: bool,
) -> None:
    """Drive fusion rules over the graph once: match at each anchor, keep only what measures
    faster than the unfused ATen calls (when ``measure``), rewrite through the rewriter, and
    record every application and near miss (``rw.applied`` / ``rw.missed``)."""
    import operator

    table: dict[Any, list[tuple[str, Matcher]]] = {}
    for name, ops, matcher in rules:
        for op in ops:
            table.setdefault(op, []).append((name, matcher))
    for node in list(gm.graph.nodes):
        if node._erased or node.op != "call_function" or node.target not in table:
            continue
        for name, matcher in table[node.target]:
            if not rw.allowed():
                return
            found = matcher(node)
            if found is None:
                continue
            if isinstance(found, str):
                rw.missed(name, node, found)
                continue
            device = found.nodes[-1].meta["val"].device
            if measure and (why := no_gain_on(found.target, device)) is not None:
                rw.missed(name, node, why)
                continue
            if measure:
                unfused, fused, key = _run_match(found, gm)
                why = measured_faster(f"{name} {key}", unfused, fused, device)
                if why is not None:
                    rw.missed(name, node, why)
                    continue
            new = rw.call(found.target, found.args, found.kwargs, before=node, sources=found.nodes)
            values = [
                new
                if index is None
                else rw.call(operator.getitem, (new, index), before=node, sources=[old])
                for old, index in found.replaces
            ]
            for (old, _), value in reversed(list(zip(found.replaces, values))):
                rw.replace(old, value)
            rw.applied(name)
            break
