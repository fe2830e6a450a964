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

    def run_node(self, n: Node) -> Any:
        self._node = n
        result = super().run_node(n)
        if self.record:
            self.values[n.name] = result
        return result

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return _promote(value) if self.reference else value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        if self.reference:
            args, kwargs = _promote(args), _promote(kwargs)
        if self.expand and target is _fused_op():
            return self._run_fused(args[0], args[1])
        result = super().call_function(target, args, kwargs)
        # factory ops without a dtype (zeros, ones, full) make float32 even here: promote their
        # results once, so later in-place writes through views land in the tensor others read
        return _promote(result) if self.reference else result

    def _run_fused(self, inputs: list[Any], program: str) -> list[Any]:
        from graphopt.ops import program_of

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
        inputs = [_promote(x) for x in flat_inputs] if self.reference else list(flat_inputs)
        with torch.no_grad():
            out = self.run(*inputs, enable_io_processing=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def run_one(self, node: Node, env: dict[str, Any]) -> Any:
        """Evaluate ``node`` alone, reading its inputs from ``env`` (node name -> value)."""
        self.env = {n: env[n.name] for n in node.all_input_nodes}
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
