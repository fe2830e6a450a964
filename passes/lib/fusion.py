"""Fusion analysis shared by the fusion passes, and their measuring.

* :func:`partition` splits a graph into fusion groups: it merges a node into the group of one of
  its producers when the caller's predicate allows it and the merge creates no cycle, checked on
  the node DAG with networkx (a merge is illegal when a path leaves the group and comes back).
* :func:`program_of_nodes` turns a group into a :class:`graphopt.ir.program.Program`: its external
  tensor inputs in order, its calls, and as outputs every member whose value escapes the group.
* :func:`example_like` builds random example tensors from ``meta["val"]`` (symbolic sizes take
  their example value) so a pass can measure a candidate against the unfused ATen graph.
* Keep only what measures faster (the policy is :func:`graphopt.ops.autotune.why_not_faster`):
  :func:`why_match_not_faster` judges a rule's match for the rewriter (``rw.apply(rules,
  keep=why_match_not_faster)``), :func:`why_graph_not_faster` a whole rewritten graph.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from graphopt.ir.program import Call as ProgramCall
from graphopt.ir.program import Program, Ref, op_name
from graphopt.ir.rules import Call, Const, Match
from graphopt.ir.state import with_state
from graphopt.ops.autotune import cache_key, why_not_faster
from graphopt.ops.fused import DIRECT, REFERENCE_ONLY_ON_CPU, executable


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
        calls.append(ProgramCall(op_name(n.target), args, kwargs))
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
    if device.type == "cpu" and target in REFERENCE_ONLY_ON_CPU:
        return f"{target} is its ATen reference on the CPU (kernels are CUDA-only): no gain"
    return None


def why_match_not_faster(rule: str, match: Match) -> str | None:
    """The fusion passes' judge: None when the match's call, run as the compiled model runs it,
    measures faster on the target than the ATen calls it replaces (on random inputs of their
    shapes; once per shape, cached); otherwise the near-miss reason with both times."""
    assert isinstance(match.value, Call), "only a new call can be measured"
    device = match.anchor.meta["val"].device
    if (why := no_gain_on(match.value.target, device)) is not None:
        return why
    program, inputs, _ = program_of_nodes(match.nodes)
    values = {n: example_like(n.meta.get("val"), seed=i) for i, n in enumerate(inputs)}
    ins = [values[n] for n in inputs]

    def real(a: Any) -> Any:
        if isinstance(a, Node):
            if a not in values:
                values[a] = example_like(a.meta.get("val"))
            return values[a]
        if isinstance(a, Call):
            return a.target(*real(a.args), **real(a.kwargs))
        if isinstance(a, Const):
            return a.value
        if isinstance(a, (list, tuple)):
            return type(a)(real(v) for v in a)
        if isinstance(a, dict):
            return {k: real(v) for k, v in a.items()}
        return a

    target = DIRECT.get(match.value.target, match.value.target)  # as the compiled model calls it
    args, kwargs = real(match.value.args), real(match.value.kwargs)
    return why_not_faster(
        cache_key(rule, *ins, program=program.key),
        lambda: program.run(ins),
        lambda: target(*args, **kwargs),
        device,
    )


def why_graph_not_faster(
    baseline: GraphModule,
    candidate: GraphModule,
    inputs: Sequence[Any],
    *,
    names: tuple[str, str] = ("ATen", "fused"),
    reps: int = 7,
) -> str | None:
    """None when ``candidate`` runs ``inputs`` faster than ``baseline`` (both as a compiled model
    runs them, state included); otherwise the near-miss reason with both times. Measured each
    time: a whole graph has no cache key."""
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    base, base_in = executable(baseline), with_state(baseline, inputs)
    new, new_in = executable(candidate), with_state(candidate, inputs)
    return why_not_faster(
        None, lambda: base(*base_in), lambda: new(*new_in), device, names=names, reps=reps
    )
