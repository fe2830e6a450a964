"""Model state in the IR: every graph that graphopt optimizes is a pure function.

A model whose forward updates its buffers (``self.calls += 1``) or writes into its inputs
(``x.mul_(2)``) is functionalized at capture, and the write-backs that torch.export leaves as
in-place ``copy_`` calls become data flow::

    before:  %calls = get_attr[calls]; %add = add(%calls, 1); copy_(%calls, %add); return [%y]
    after:   %state_calls = input; %add = add(%state_calls, 1); return [%y, %add]

Each updated buffer becomes an extra input (its value before the call; the placeholder carries
``meta["graphopt_state"] = "calls"``) and an extra output (its value after); each input the model
writes adds an output too. The output node's ``meta["graphopt_effects"]`` says what the trailing
outputs are. The buffers live on the graph module under their own names, as a copy taken at
capture (never the user's tensor). ``StateBinding`` is how a compiled model calls such a graph:
it passes the buffers in and writes the results back after every call, once, as eager does.
Passes, the interpreter and the verifier only see a pure graph; the interpreter gives every run
fresh copies of the state (``with_state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen
from torch.utils import _pytree as pytree

from graphopt.errors import CaptureError
from graphopt.ir.graph import alias_root, attr_path, short_target, written_args

aten = torch.ops.aten

STATE = "graphopt_state"  # placeholder meta: the buffer a state input holds
EFFECTS = "graphopt_effects"  # output meta: [("buffer", name) | ("input", flat index), ...]
IO = "graphopt_io"  # gm.meta: (in_spec, out_spec) of the user's inputs and outputs

Effect = tuple[str, Any]


def state_placeholders(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder" and STATE in n.meta]


def user_placeholders(gm: GraphModule) -> list[Node]:
    """The placeholders the caller feeds: every one but the state inputs."""
    return [n for n in gm.graph.nodes if n.op == "placeholder" and STATE not in n.meta]


def effects(gm: GraphModule) -> list[Effect]:
    """What the graph's trailing outputs write: a buffer (by name) or an input (flat index)."""
    return list(gm.graph.output_node().meta.get(EFFECTS, []))


def is_stateful(gm: GraphModule) -> bool:
    return bool(effects(gm)) or bool(state_placeholders(gm))


def with_state(gm: GraphModule, flat_inputs: Sequence[Any]) -> list[Any]:
    """The graph's full input list: the user's inputs, then fresh copies of the state buffers
    (unless the caller passed the state already). Runs never advance the stored state."""
    states = state_placeholders(gm)
    if not states or len(flat_inputs) != len(user_placeholders(gm)):
        return list(flat_inputs)
    fresh = [attr_path(gm, n.meta[STATE]).detach().clone() for n in states]
    return [*flat_inputs, *fresh]


def describe_write(node: Node) -> str:
    """``%add_ (aten.add_.Tensor) at model.py:12: `b += ...```: a write, for error messages."""
    trace = node.meta.get("stack_trace", "").strip().splitlines()
    source = f" at {trace[-2].strip()}: `{trace[-1].strip()}`" if len(trace) >= 2 else ""
    return f"%{node.name} ({short_target(node)}){source}"


def lift_state(gm: GraphModule, model_name: str) -> None:
    """Turn the write-backs of a functionalized capture into graph inputs and outputs (above).

    Raises ``CaptureError`` for a write into a parameter (graphopt folds parameters as
    constants) and for any in-place op functionalization left behind."""
    graph = gm.graph
    writes = [
        n
        for n in graph.nodes
        if n.op == "call_function"
        and n.target is aten.copy_.default
        and not n.users
        and isinstance(n.args[0], Node)
        and n.args[0].op in ("get_attr", "placeholder")
    ]
    if writes:
        _lift(gm, writes, model_name)
    leftover = [n for n in graph.nodes if written_args(n)]
    if leftover:
        raise CaptureError(
            f"{model_name}: the captured graph still writes into tensors in place after "
            f"functionalization: {', '.join(describe_write(n) for n in leftover[:3])}. Write that "
            "code out of place (y = x + 1 instead of x += 1)"
        )


def _lift(gm: GraphModule, writes: list[Node], model_name: str) -> None:
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = graph.output_node()
    outs = list(output.args[0])
    io = (getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None))
    found: list[Effect] = []
    last = placeholders[-1] if placeholders else None
    for write in writes:
        dst, value = write.args[0], write.args[1]
        graph.erase_node(write)
        if dst.op == "placeholder":
            found.append(("input", placeholders.index(dst)))
            outs.append(value)
            continue
        target = str(dst.target)
        tensor = attr_path(gm, target)
        if isinstance(tensor, torch.nn.Parameter):
            raise CaptureError(
                f"{model_name}.forward writes into its parameter {target!r} in place; graphopt "
                "treats parameters as constants. Register it as a buffer if it is state"
            )
        _own_copy(gm, target, tensor)
        # state inputs go after the user's, so the user's keep their positions
        anchor = (
            graph.inserting_after(last)
            if last is not None
            else graph.inserting_before(next(iter(graph.nodes)))
        )
        with anchor:
            state = graph.placeholder("state_" + "".join(c if c.isalnum() else "_" for c in target))
        state.meta = {"val": dst.meta.get("val"), STATE: target}
        last = state
        for reader in [n for n in graph.nodes if n.op == "get_attr" and n.target == target]:
            reader.replace_all_uses_with(state)
            graph.erase_node(reader)
        found.append(("buffer", target))
        outs.append(state if value is dst else value)
    output.args = (tuple(outs),)
    output.meta[EFFECTS] = found
    gm.meta[IO] = io
    graph.set_codegen(CodeGen())  # flat: user inputs then state in, everything out
    for name in ("_in_spec", "_out_spec"):
        if name in vars(gm):
            delattr(gm, name)
    graph.lint()
    gm.recompile()


def _own_copy(gm: GraphModule, target: str, tensor: torch.Tensor) -> None:
    """Give the graph its own copy of a state buffer: the user's model is never written."""
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    copy = tensor.detach().clone()
    if leaf in module._buffers:
        module._buffers[leaf] = copy
    else:
        setattr(module, leaf, copy)


class StateBinding:
    """How a compiled model calls a graph through its flat calling convention (a stateful graph,
    or a backend's engine): the user's inputs (flattened as at capture) and the state buffers go
    in; the user's outputs come back, and the new buffer values and written inputs are copied
    to where eager would have written them, once per call."""

    def __init__(self, gm: GraphModule) -> None:
        # a stateless graph keeps torch.export's pytree calling convention: its specs are the
        # graph module's own
        specs = gm.meta.get(IO) or (getattr(gm, "_in_spec", None), getattr(gm, "_out_spec", None))
        self.in_spec, self.out_spec = specs
        self.buffers = [n.meta[STATE] for n in state_placeholders(gm)]
        self.effects = effects(gm)
        # results that are (views of) a tensor the write-back overwrites are copied first: a
        # swap of two buffers, or an output that is the state itself, must not see the write
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        overwritten = set(state_placeholders(gm)) | {
            placeholders[t] for kind, t in self.effects if kind == "input"
        }
        outs = gm.graph.output_node().args[0]
        self.copy_first = {
            i for i, o in enumerate(outs) if isinstance(o, Node) and alias_root(o) in overwritten
        }
        # no state and no writes: a plain call is fn's outputs in the user's structure
        self.pure = not self.buffers and not self.effects
        # the common output structures, rebuilt without pytree: one tensor, or a flat tuple
        spec = self.out_spec
        self._unflat: Any = None
        if spec is not None and spec == pytree.tree_flatten(0)[1]:
            self._unflat = lambda outs: outs[0]
        elif spec is not None and spec == pytree.tree_flatten(tuple(range(spec.num_leaves)))[1]:
            self._unflat = tuple

    def __call__(
        self,
        fn: Any,
        gm: GraphModule,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        plain: bool = False,
    ) -> Any:
        """``plain``: the caller has checked that ``args`` are tensors and there are no
        ``kwargs``, so they are the flat inputs as they are (no pytree on the hot path)."""
        if plain and self.pure:
            outs = fn(*args)
            if self._unflat is not None:
                return self._unflat(outs)
            return pytree.tree_unflatten(list(outs), self.out_spec) if self.out_spec else list(outs)
        if plain:
            leaves = list(args)
        elif self.in_spec is None:
            leaves = pytree.tree_leaves((args, kwargs))
        else:
            leaves = _flatten((args, kwargs), self.in_spec)
        state = [attr_path(gm, t) for t in self.buffers]
        outs = list(fn(*leaves, *state))
        n = len(outs) - len(self.effects)
        outs = [o.clone() if i in self.copy_first else o for i, o in enumerate(outs)]
        dests = [attr_path(gm, t) if kind == "buffer" else leaves[t] for kind, t in self.effects]
        for dest, value in zip(dests, outs[n:]):
            dest.copy_(value)
        user = outs[:n]
        return pytree.tree_unflatten(user, self.out_spec) if self.out_spec is not None else user


def _flatten(tree: Any, spec: Any) -> list[Any]:
    from torch.fx._pytree import tree_flatten_spec

    return list(tree_flatten_spec(tree, spec))


class StatefulProgram(torch.nn.Module):
    """A stateful graph as a module that updates its buffers in place, as the user's model did:
    the form torch.export saves (``graphopt.save``) and capture turns back into a pure graph."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.binding = StateBinding(gm)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.binding(self.gm, self.gm, args, kwargs)
