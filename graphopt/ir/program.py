"""The reference decomposition of a fused group, as data.

A fused group is one ``graphopt::fused(inputs, program)`` call. ``program`` is the JSON text of a
:class:`Program`: the group's ATen calls in order, each argument either a reference to one of the
group's inputs, a reference to an earlier call's result, or a literal. Keeping the decomposition
inside the call's arguments makes the graph self-contained: it saves with ``torch.export.save``,
runs on any device through the ATen reference (:meth:`Program.run`), can be expanded back into
nodes for the interpreter (:meth:`Program.to_graph`), and is the input of the Triton code
generator (``graphopt.kernels.codegen``), whose disk cache is keyed by :meth:`Program.key`.

JSON encoding of arguments::

    {"in": k}            the group's k-th input tensor
    {"node": j}          the result of the j-th call
    {"item": [j, i]}     element i of the j-th call's tuple result
    {"dtype": "float16"} a torch.dtype
    {"float": "inf"}     inf, -inf or nan
    {"memory_format": "contiguous_format"}, {"device": "cuda"}, {"layout": "strided"}
    numbers, bools, None, strings and lists as themselves
"""

from __future__ import annotations

import hashlib
import json
import math
import operator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch.fx import Graph, GraphModule

from graphopt.errors import SerializationError


@dataclass(frozen=True)
class Ref:
    """An argument that names a tensor: ``("in", k)``, ``("node", j)`` or ``("item", j, i)``."""

    kind: str
    index: int
    item: int = 0


@dataclass(frozen=True)
class Call:
    op: str  # "aten.add.Tensor"
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...] = ()

    @property
    def overload(self) -> torch._ops.OpOverload:
        return resolve_op(self.op)


def op_name(target: Any) -> str:
    """``torch.ops.aten.add.Tensor`` -> ``"aten.add.Tensor"``."""
    ns = target.namespace
    name = target._schema.name.split("::", 1)[1]
    overload = target._overloadname
    return f"{ns}.{name}.{overload}"


def resolve_op(name: str) -> torch._ops.OpOverload:
    ns, op, overload = name.split(".")
    try:
        return getattr(getattr(getattr(torch.ops, ns), op), overload)
    except AttributeError as exc:
        raise SerializationError(
            f"fused program names op {name!r}, which this torch does not have; "
            "recompile the model with this torch version"
        ) from exc


def _encode(value: Any) -> Any:
    if isinstance(value, Ref):
        if value.kind == "item":
            return {"item": [value.index, value.item]}
        return {value.kind: value.index}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": str(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": value.type}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    raise SerializationError(f"cannot put {type(value).__name__} {value!r} in a fused program")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_decode(v) for v in value)
    if not isinstance(value, dict):
        return value
    ((key, v),) = value.items()
    if key in ("in", "node"):
        return Ref(key, int(v))
    if key == "item":
        return Ref("item", int(v[0]), int(v[1]))
    if key == "float":
        return float(v)
    if key == "dtype":
        return getattr(torch, v)
    if key == "memory_format":
        return getattr(torch, v)
    if key == "device":
        return torch.device(v)
    if key == "layout":
        return getattr(torch, v)
    raise SerializationError(f"unknown fused-program argument {value!r}")


@dataclass(frozen=True)
class Program:
    """A straight-line list of ATen calls over ``n_inputs`` tensors, returning ``outputs``."""

    n_inputs: int
    calls: tuple[Call, ...]
    outputs: tuple[Ref, ...]

    # -- text form ------------------------------------------------------------------------
    def to_json(self) -> str:
        doc = {
            "v": 1,
            "inputs": self.n_inputs,
            "calls": [
                [c.op, _encode(list(c.args)), {k: _encode(v) for k, v in c.kwargs}]
                for c in self.calls
            ],
            "outputs": [_encode(r) for r in self.outputs],
        }
        return json.dumps(doc, separators=(",", ":"))

    @staticmethod
    def from_json(text: str) -> Program:
        try:
            doc = json.loads(text)
            calls = tuple(
                Call(
                    op,
                    tuple(_decode(a) for a in args),
                    tuple((k, _decode(v)) for k, v in kw.items()),
                )
                for op, args, kw in doc["calls"]
            )
            return Program(int(doc["inputs"]), calls, tuple(_decode(r) for r in doc["outputs"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SerializationError(f"malformed fused program: {exc}") from exc

    @cached_property
    def key(self) -> str:
        """Structural hash: equal for equal programs, whatever graph they came from."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:20]

    # -- running --------------------------------------------------------------------------
    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The ATen reference: run the calls one by one (works on real and fake tensors)."""
        results: list[Any] = []

        def get(a: Any) -> Any:
            if isinstance(a, Ref):
                if a.kind == "in":
                    return inputs[a.index]
                if a.kind == "node":
                    return results[a.index]
                return results[a.index][a.item]
            if isinstance(a, tuple):
                return [get(v) for v in a]
            return a

        for call in self.calls:
            args = [get(a) for a in call.args]
            kwargs = {k: get(v) for k, v in call.kwargs}
            results.append(call.overload(*args, **kwargs))
        # outputs are fresh tensors: never an input itself, never one tensor twice
        outs: list[torch.Tensor] = []
        for r in self.outputs:
            t = get(r)
            if r.kind == "in" or any(t is o for o in outs):
                t = t.clone()
            outs.append(t)
        return outs

    def to_graph(self) -> GraphModule:
        """The decomposition as an FX graph (placeholders ``in0..``; output: a list)."""
        graph = Graph()
        ins = [graph.placeholder(f"in{k}") for k in range(self.n_inputs)]
        nodes: list[Any] = []

        def get(a: Any) -> Any:
            if isinstance(a, Ref):
                if a.kind == "in":
                    return ins[a.index]
                if a.kind == "node":
                    return nodes[a.index]
                return graph.call_function(operator.getitem, (nodes[a.index], a.item))
            if isinstance(a, tuple):
                return [get(v) for v in a]
            return a

        for call in self.calls:
            args = tuple(get(a) for a in call.args)
            kwargs = {k: get(v) for k, v in call.kwargs}
            nodes.append(graph.call_function(call.overload, args, kwargs))
        graph.output([get(r) for r in self.outputs])
        return GraphModule(torch.nn.Module(), graph)

    @property
    def ops(self) -> list[str]:
        return [c.op for c in self.calls]
