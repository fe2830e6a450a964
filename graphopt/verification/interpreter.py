"""A node-by-node runner for graphopt graphs.

``Runner`` runs any graph and records every node's value. With ``reference=True`` it runs in
float64 on the CPU: floating inputs, weights and dtype arguments are promoted, so the run is the
float64 reference every numerical contract is judged against. ``run_one`` evaluates a single node
on values the caller supplies, which is how local error is told from inherited error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.errors import MutationError
from graphopt.ir.graph import (
    named_tensors,
    short_target,
    storage_key,
    written_roots,
    written_tensors,
)
from graphopt.ir.state import with_state

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _promote(value: Any) -> Any:
    """float64-on-CPU view of a value (tensors, dtypes, devices, nested containers)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.double() if value.dtype in _FLOATS else value
    if isinstance(value, torch.dtype):
        return torch.float64 if value in _FLOATS else value
    if isinstance(value, torch.device):
        return torch.device("cpu")
    if isinstance(value, (list, tuple)):
        return type(value)(_promote(v) for v in value)
    if isinstance(value, dict):
        return {k: _promote(v) for k, v in value.items()}
    return value


class Runner(torch.fx.Interpreter):
    """Runs a graph node by node.

    ``expand=True`` looks inside fused groups: a ``graphopt.fused`` call runs its reference
    decomposition node by node, and (with ``record``) each inner value is recorded as
    ``"<fused node>/<inner node>"``.
    """

    def __init__(
        self, gm: GraphModule, *, reference: bool = False, record: bool = True, expand: bool = False
    ) -> None:
        super().__init__(gm, garbage_collect_values=not record)
        self.reference = reference
        self.record = record
        self.expand = expand
        self.values: dict[str, Any] = {}
        self._weights: dict[int, str] | None = None  # storage -> weight name, built on first write
        self._fresh_attrs: dict[str, torch.Tensor | None] = {}  # written weights, copied per run
        self._inputs: dict[int, str] = {}  # storage -> the caller's input, this run

    def run_node(self, n: Node) -> Any:
        self._node = n
        result = super().run_node(n)
        if self.record:
            self.values[n.name] = result
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if target in self._fresh_attrs:  # a weight the graph writes: this run's own copy
            if self._fresh_attrs[target] is None:
                self._fresh_attrs[target] = value.clone()
            value = self._fresh_attrs[target]
        return _promote(value) if self.reference else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.reference:
            args, kwargs = _promote(args), _promote(kwargs)
        self._refuse_writes(target, args, kwargs)
        if self.expand and target is _fused_op():
            return self._run_fused(args[0], args[1])
        result = super().call_function(target, args, kwargs)
        # factory ops without a dtype (zeros, ones, full) make float32 even here: promote their
        # results once, so later in-place writes through views land in the tensor others read
        return _promote(result) if self.reference else result

    def _refuse_writes(self, target: Any, args: Any, kwargs: Any) -> None:
        """A node about to write into a weight (a constant, parameter or buffer of the graph) or
        into a caller's input is stopped before it does: the weights are shared with the
        user's model and with the graph a pass started from, so such a write could never be
        rolled back. (What the graph admits to writing got a copy of its own in ``run_graph``;
        this catches the writes the graph analysis cannot see.)"""
        if self._weights is None:
            self._weights = {}
            for name, t in named_tensors(self.module):
                key = storage_key(t) if t.numel() else None
                if key is not None:
                    self._weights.setdefault(key, f"the weight {name!r}")
        for t in written_tensors(target, args, kwargs):
            key = storage_key(t)
            what = (self._weights.get(key) or self._inputs.get(key)) if key is not None else None
            if what is not None:
                raise MutationError(
                    f"%{self._node.name} ({short_target(self._node)}) writes into {what} in "
                    "place; a graphopt graph never changes its weights or the caller's tensors",
                    node=self._node.name,
                    op=short_target(self._node),
                    target=what,
                )

    def _run_fused(self, inputs: list[Any], program: str) -> list[Any]:
        from graphopt.ops.fused import program_of

        inner = Runner(program_of(program).to_graph(), record=self.record)
        out = inner.run_graph(list(inputs))
        if self.record:
            self.values.update({f"{self._node.name}/{k}": v for k, v in inner.values.items()})
        return out

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.reference:
            args, kwargs = _promote(args), _promote(kwargs)
        return super().call_module(target, args, kwargs)

    def run_graph(self, flat_inputs: Sequence[Any]) -> list[Any]:
        """Run on ``flat_inputs`` (the user's inputs; the state inputs of a stateful graph are
        fresh copies of its buffers). Every run works on copies of what the graph writes in
        place (inputs, weights), so it never changes the caller's tensors or the graph's
        weights, and two runs on the same inputs see the same values. (A captured graph is
        functional and writes nothing; graphs built by hand may.)"""
        inputs = with_state(self.module, flat_inputs)
        roots = written_roots(self.module)
        self._fresh_attrs = {str(r.target): None for r in roots if r.op == "get_attr"}
        placeholders = [n for n in self.module.graph.nodes if n.op == "placeholder"]
        inputs = [
            x.clone() if isinstance(x, torch.Tensor) and node in roots else x
            for node, x in zip(placeholders, inputs)
        ] + inputs[len(placeholders) :]
        inputs = [_promote(x) for x in inputs] if self.reference else inputs
        self._inputs = {}
        for i, (node, x) in enumerate(zip(placeholders, inputs)):
            key = storage_key(x) if isinstance(x, torch.Tensor) and x.numel() else None
            if key is not None and node not in roots:
                self._inputs.setdefault(key, f"graph input {i} (%{node.name})")
        with torch.no_grad():
            out = self.run(*inputs, enable_io_processing=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def run_one(self, node: Node, env: dict[str, Any]) -> Any:
        """Evaluate ``node`` alone, reading its inputs from ``env`` (node name -> value)."""
        self.env = {n: env[n.name] for n in node.all_input_nodes}
        self._node = node
        with torch.no_grad():
            return super().run_node(node)


def _fused_op() -> Any:
    import graphopt.ops  # noqa: F401

    return torch.ops.graphopt.fused.default


def reference_run(gm: GraphModule, flat_inputs: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """float64 CPU outputs of ``gm`` and every node's value."""
    runner = Runner(gm, reference=True)
    outs = runner.run_graph(flat_inputs)
    return outs, runner.values


def native_run(
    gm: GraphModule, flat_inputs: Sequence[Any], *, record: bool = False
) -> tuple[list[Any], dict[str, Any]]:
    """Outputs of ``gm`` in its own dtypes and devices (and every node's value if ``record``)."""
    runner = Runner(gm, record=record)
    outs = runner.run_graph(flat_inputs)
    return outs, runner.values
