"""Rules as data: how a pass says what to rewrite. The rewriter applies them
(:meth:`graphopt.ir.rewriter.Rewriter.apply`).

A rule is a name, the ops it anchors on, and a matcher that looks at one anchor node and returns

* None: the pattern is not there (nothing is recorded);
* a string: a near miss, the anchor matched but a later condition failed, and the string says
  which one (the report's "why (not) fused" table prints it);
* a :class:`Match`: the nodes it matched and the value that replaces the anchor's.

A table reads one rule per line, each with its ``# before -> after`` comment::

    RULES = [
        Rule("linear+act", ACTS, _act_into_linear),  # act(linear(x, w, b)) -> linear(.., act)
        Rule("clone", (aten.clone.default,), _clone),  # clone(x) -> x, if no one could tell
    ]

A match's value is an existing node (``clone(x) -> x``) or a :class:`Call` to create, whose
arguments may hold nodes, further calls, and :class:`Const` (a new weight tensor). Matchers only
look; they never edit the graph, so the rewriter can judge a match (measure it, count it against
the rewrite budget) before anything changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import Node


@dataclass(frozen=True)
class Const:
    """A new weight tensor for the rewriter to register (``Rewriter.constant``) and read with a
    ``get_attr`` node; ``hint`` goes into its attribute name."""

    value: torch.Tensor
    hint: str


@dataclass(frozen=True)
class Call:
    """A node for the rewriter to create: ``target(*args, **kwargs)``. Arguments may be nodes,
    Calls (created first, in order), Consts, plain values, or lists and tuples of these."""

    target: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def graph_order(nodes: Iterable[Node]) -> list[Node]:
    """Unique nodes in graph order (FX orders the nodes of one graph by position)."""
    return sorted(dict.fromkeys(nodes))


class Match:
    """What a rule found: ``nodes``, the matched calls (the provenance of everything the rewrite
    creates), now computed by ``value``, an existing node or a :class:`Call`.

    ``nodes`` are kept in graph order; the last one is the anchor, whose value ``value`` becomes,
    and the new nodes go right before it. ``replaces`` lists the members whose values a
    tuple-returning call provides, each with the index of its result (None: the call returns one
    tensor); by default the anchor alone. Every other member must be used only inside the match:
    the rewriter erases what the rewrite leaves unused.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        value: Node | Call,
        replaces: Sequence[tuple[Node, int | None]] | None = None,
    ) -> None:
        self.nodes = graph_order(nodes)
        self.value = value
        self.replaces = list(replaces) if replaces is not None else [(self.anchor, None)]

    @property
    def anchor(self) -> Node:
        return self.nodes[-1]

    def __repr__(self) -> str:
        value = self.value.name if isinstance(self.value, Node) else self.value.target
        return f"Match({[n.name for n in self.nodes]} -> {value})"


# a matcher looks at its anchor: None (not this pattern), a near-miss reason, or a Match
Matcher = Callable[[Node], "Match | str | None"]
# a judge decides whether a match is worth applying: None keeps it, a string is the near miss
# the report shows instead (the fusion passes keep only what measures faster)
Judge = Callable[[str, Match], "str | None"]


@dataclass(frozen=True)
class Rule:
    """``match`` runs at every call of one of ``ops``; ``name`` is what the report and the
    bisector print for its applications and near misses."""

    name: str
    ops: tuple[Any, ...]
    match: Matcher
