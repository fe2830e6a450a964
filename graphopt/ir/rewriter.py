"""The one way passes edit a graph.

The rewriter keeps three things right that passes must never do by hand:

* metadata: every node it creates gets ``meta["val"]`` (computed under the graph's fake mode);
* provenance: ``meta["graphopt"] = {"pass": ..., "from": [original node names], "replaces": name}``
  where ``from`` lists the nodes of the captured graph the new node was built from, and
  ``replaces`` names the original node whose value it computes (set by :meth:`Rewriter.replace`);
* the rewrite budget: ``max_rewrites`` for bisection is counted here, across the whole pipeline.

It also drives rule tables (:mod:`graphopt.ir.rules`): :meth:`Rewriter.apply` matches, judges,
rewrites, and records every application and near miss, the same way for every pass.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.ir.graph import fake_mode_of, is_pure, original_name
from graphopt.ir.rules import Call, Const, Judge, Match, Rule


@dataclass
class RewriteBudget:
    """How many rewrites the whole pipeline may still apply (None: unlimited)."""

    limit: int | None = None
    used: int = 0

    def allows(self) -> bool:
        return self.limit is None or self.used < self.limit


@dataclass
class RuleLog:
    """What one rule did in one pass: how often it applied, and its near misses with the reason.

    A near miss is a node where the rule's anchor op matched but a later condition failed; the
    reason names that condition (``"bias is not a 1-D weight"``). The report prints these as the
    "why didn't it fuse" table.
    """

    applied: int = 0
    missed: int = 0
    misses: list[tuple[str, str]] = field(default_factory=list)  # (node name, reason), first 50

    KEEP = 50

    def merge(self, other: RuleLog) -> None:
        self.applied += other.applied
        self.missed += other.missed
        room = self.KEEP - len(self.misses)
        self.misses += other.misses[: max(room, 0)]


@dataclass
class Rewriter:
    gm: GraphModule
    pass_name: str
    budget: RewriteBudget = field(default_factory=RewriteBudget)
    rewrites: int = 0
    rules: dict[str, RuleLog] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._mode = fake_mode_of(self.gm)
        self._const_id = 0

    # -- budget --------------------------------------------------------------------------
    def allowed(self) -> bool:
        """Ask before starting a rewrite: False once the pipeline's ``max_rewrites`` is spent."""
        return self.budget.allows()

    def _count(self) -> None:
        self.rewrites += 1
        self.budget.used += 1

    # -- why didn't it fuse ----------------------------------------------------------------
    def applied(self, rule: str) -> bool:
        """Record that ``rule`` applied once; returns True so a rule can ``return rw.applied(..)``."""
        self.rules.setdefault(rule, RuleLog()).applied += 1
        return True

    def missed(self, rule: str, node: Node, why: str) -> bool:
        """Record a near miss of ``rule`` at ``node`` and the condition that failed; returns False."""
        log = self.rules.setdefault(rule, RuleLog())
        log.missed += 1
        if len(log.misses) < RuleLog.KEEP:
            log.misses.append((node.name, why))
        return False

    # -- provenance ----------------------------------------------------------------------
    def _origins(self, nodes: Iterable[Node]) -> list[str]:
        names: list[str] = []
        for node in nodes:
            info = node.meta.get("graphopt")
            found = info["from"] if info else [node.name]
            names += [n for n in found if n not in names]
        return names

    def _tag(self, node: Node, sources: Sequence[Node]) -> None:
        node.meta["graphopt"] = {"pass": self.pass_name, "from": self._origins(sources)}

    # -- creating nodes ------------------------------------------------------------------
    def call(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any] | None = None,
        *,
        before: Node,
        sources: Sequence[Node],
    ) -> Node:
        """Insert ``target(*args, **kwargs)`` before ``before``, with metadata and provenance."""
        kwargs = kwargs or {}
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.call_function(target, args, kwargs)
        node.meta["val"] = self._fake_eval(target, args, kwargs)
        if "stack_trace" in before.meta:
            node.meta["stack_trace"] = before.meta["stack_trace"]
        self._tag(node, sources)
        return node

    def constant(self, value: torch.Tensor, *, hint: str, sources: Sequence[Node]) -> Node:
        """Register a new weight tensor on the module and return a ``get_attr`` node for it.

        The node goes at the top of the graph, with the other weights, so it dominates every use.
        """
        name = self._fresh_attr(hint)
        self.gm.register_buffer(name, value.detach(), persistent=True)
        first_op = next(n for n in self.gm.graph.nodes if n.op != "placeholder")
        with self.gm.graph.inserting_before(first_op):
            node = self.gm.graph.get_attr(name)
        node.meta["val"] = self._mode.from_tensor(value, static_shapes=True)
        self._tag(node, sources)
        return node

    def _fresh_attr(self, hint: str) -> str:
        base = "_graphopt_" + "".join(c if c.isalnum() else "_" for c in hint)
        while True:
            self._const_id += 1
            name = f"{base}_{self._const_id}"
            if not hasattr(self.gm, name):
                return name

    def _fake_eval(
        self, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        def val(a: Any) -> Any:
            return a.meta["val"] if isinstance(a, Node) else a

        fargs = torch.fx.node.map_aggregate(args, val)
        fkwargs = torch.fx.node.map_aggregate(kwargs, val)
        with self._mode:
            return target(*fargs, **fkwargs)

    # -- changing the graph ---------------------------------------------------------------
    def replace(self, old: Node, new: Node) -> None:
        """Make every user of ``old`` use ``new`` instead, then erase ``old``. One rewrite.

        If ``new`` was created by this pass it inherits ``old``'s identity for verification.
        """
        info = new.meta.get("graphopt")
        if info is not None and info.get("pass") == self.pass_name and "replaces" not in info:
            info["replaces"] = original_name(old)
        inputs = old.all_input_nodes
        old.replace_all_uses_with(new)
        self.gm.graph.erase_node(old)
        self._erase_orphans(inputs)
        self._count()

    def _erase_orphans(self, nodes: Iterable[Node]) -> None:
        """Erase what a rewrite left unused (pure calls, weights), without counting a rewrite."""
        stack = list(nodes)
        while stack:
            node = stack.pop()
            if node._erased or node.users or not (node.op == "get_attr" or is_pure(node)):
                continue
            stack += node.all_input_nodes
            self.gm.graph.erase_node(node)
            if node.op == "get_attr":
                self._drop_attr_if_unused(str(node.target))

    def erase(self, node: Node) -> None:
        """Delete a node nobody uses. One rewrite."""
        assert not node.users, f"erase({node.name}) while it still has users"
        self.gm.graph.erase_node(node)
        if node.op == "get_attr":
            self._drop_attr_if_unused(str(node.target))
        self._count()

    def _drop_attr_if_unused(self, target: str) -> None:
        if any(n.op == "get_attr" and n.target == target for n in self.gm.graph.nodes):
            return
        owner, _, leaf = target.rpartition(".")
        module = self.gm.get_submodule(owner) if owner else self.gm
        for table in (module._parameters, module._buffers):
            table.pop(leaf, None)
        if leaf in vars(module):
            delattr(module, leaf)

    def sort(self) -> None:
        """Restore a topological order after a rewrite inserted a node that an earlier node now
        uses (stable: nodes keep their relative order where dependencies allow)."""
        import heapq

        nodes = list(self.gm.graph.nodes)
        position = {n: i for i, n in enumerate(nodes)}
        if all(position[a] < position[n] for n in nodes for a in n.all_input_nodes):
            return
        waiting = {n: len(set(n.all_input_nodes)) for n in nodes}
        ready = [(position[n], n.name, n) for n in nodes if waiting[n] == 0]
        heapq.heapify(ready)
        order: list[Node] = []
        while ready:
            _, _, n = heapq.heappop(ready)
            order.append(n)
            for user in n.users:
                waiting[user] -= 1
                if waiting[user] == 0:
                    heapq.heappush(ready, (position[user], user.name, user))
        assert len(order) == len(nodes), "a rewrite created a cycle"
        output = order[-1]
        assert output.op == "output"
        for n in order[:-1]:
            output.prepend(n)

    # -- rule tables ----------------------------------------------------------------------
    def apply(
        self,
        rules: Sequence[Rule | EditRule],
        *,
        keep: Judge | None = None,
        log: bool = True,
    ) -> int:
        """Drive ``rules`` over the graph once, in graph order; returns the matches applied.

        At each call node the rules anchored on its op are tried in table order: a near miss
        (the matcher's reason, or ``keep``'s) is recorded and the next rule tried; the first
        match that ``keep`` accepts (every match, without a judge) is applied and ends the
        node's turn. Stops as soon as the rewrite budget is spent. ``log=False`` records
        neither applications nor near misses (cleanup rules stay out of the report's
        "why (not) fused" table).
        """
        table: dict[Any, list[Rule | EditRule]] = {}
        for rule in rules:
            for op in rule.ops if isinstance(rule, Rule) else rule[0]:
                table.setdefault(op, []).append(rule)
        applied = 0
        for node in list(self.gm.graph.nodes):
            if node._erased or node.op != "call_function" or node.target not in table:
                continue
            for rule in table[node.target]:
                if not self.allowed():
                    return applied
                if self._try(rule, node, keep, log):
                    applied += 1
                    break
        return applied

    def _try(self, rule: Rule | EditRule, node: Node, keep: Judge | None, log: bool) -> bool:
        if not isinstance(rule, Rule):
            return rule[1](node, self)
        found = rule.match(node)
        if found is None:
            return False
        if isinstance(found, str):
            if log:
                self.missed(rule.name, node, found)
            return False
        return self.apply_match(rule.name, found, keep=keep, log=log)

    def apply_match(
        self, rule: str, match: Match, *, keep: Judge | None = None, log: bool = True
    ) -> bool:
        """Apply one match of ``rule`` unless ``keep`` gives a reason not to (recorded as a
        near miss at the anchor); True when applied. The new nodes go before the anchor, with
        the matched nodes as their provenance; each member in ``match.replaces`` is replaced
        (one rewrite each), through a ``getitem`` where the call returns a tuple."""
        if keep is not None and (why := keep(rule, match)) is not None:
            if log:
                self.missed(rule, match.anchor, why)
            return False
        anchor, sources = match.anchor, match.nodes
        new = self._build(match.value, anchor, sources)
        values = [
            new
            if index is None
            else self.call(operator.getitem, (new, index), before=anchor, sources=[old])
            for old, index in match.replaces
        ]
        for (old, _), value in reversed(list(zip(match.replaces, values))):
            self.replace(old, value)
        if log:
            self.applied(rule)
        return True

    def _build(self, value: Any, before: Node, sources: Sequence[Node]) -> Any:
        """Create the Calls and Consts in ``value`` (arguments first, in order)."""
        if isinstance(value, Call):
            args = tuple(self._build(a, before, sources) for a in value.args)
            kwargs = {k: self._build(v, before, sources) for k, v in value.kwargs.items()}
            return self.call(value.target, args, kwargs, before=before, sources=sources)
        if isinstance(value, Const):
            return self.constant(value.value, hint=value.hint, sources=sources)
        if isinstance(value, (list, tuple)):
            return type(value)(self._build(v, before, sources) for v in value)
        return value

    def finish(self) -> None:
        """Restore topological order, lint and regenerate code once the pass is done editing."""
        self.sort()
        self.gm.graph.lint()
        self.gm.recompile()


# the form of hand-written rules from before rules were data: ``fn(node, rw)`` edits the graph
# through ``rw`` itself and returns whether it did; the rewriter neither judges it nor records
# its applications and near misses (``fn`` may call ``rw.applied`` / ``rw.missed`` itself)
EditRule = tuple[tuple[Any, ...], Callable[[Node, Rewriter], bool]]


def apply_rules(gm: GraphModule, rules: Sequence[Rule | EditRule], rw: Rewriter) -> None:
    """``rw.apply(rules)``: drive a rule table over ``gm`` once (kept for hand-written passes)."""
    assert rw.gm is gm, "apply_rules: the rewriter edits another graph"
    rw.apply(rules)
