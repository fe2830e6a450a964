"""torch.export, the one way every frontend (and graphopt.load) turns a program into the IR.

``export_program`` exports a module (non-strict); ``graph_of`` turns the exported program into
graphopt's IR: functionalized where it writes in place, unlifted (parameters and buffers are
``get_attr`` nodes), export's guards dropped (``normalize``), and model state threaded through
as graph inputs and outputs (graphopt.ir.state).
"""

from __future__ import annotations

import inspect
import io
import logging
import operator
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from typing import Any

import torch
from torch.export import Dim
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.errors import CaptureError, first_line
from graphopt.ir.graph import written_args
from graphopt.ir.state import describe_write, lift_state

aten = torch.ops.aten

# Trace-time checks that export leaves in the graph; graphopt checks inputs itself at call time
# (graphopt.runtime.compiled.InputSignature), so they are dropped at capture.
_TRACE_CHECKS = (aten._assert_tensor_metadata.default,)


class StaticShapeWarning(UserWarning):
    """The batch dimension could not be made dynamic; the model is captured with static shapes."""


class TrainModeWarning(UserWarning):
    """The model was in train() mode with layers that behave differently in eval mode (batch
    norm, dropout); graphopt captured their eval-mode behaviour (it optimizes for inference)."""


def as_args(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise CaptureError(
            f"example_inputs must be a tensor or a tuple of the model's positional arguments, "
            f"got {type(example_inputs).__name__}; pass e.g. (torch.randn(8, 3, 224, 224),)"
        )
    return example_inputs


def graph_of(ep: Any, name: str) -> GraphModule:
    """The IR of an exported program: functional (in-place ops turned into data flow by
    torch.export's functionalization, only where the program has any), guards dropped, and
    the buffers and inputs the model updates threaded through as graph inputs and outputs
    (graphopt.ir.state)."""
    writes = [n for n in ep.graph_module.graph.nodes if written_args(n)]
    if writes:
        try:
            with quiet_failures():
                ep = ep.run_decompositions({})
        except Exception as exc:
            raise CaptureError(
                f"{name}.forward writes into tensors in place ({describe_write(writes[0])}) and "
                f"torch.export could not turn that into data flow: {type(exc).__name__}: "
                f"{first_line(exc)}. Write it out of place (y = x + 1 instead of x += 1)"
            ) from None
    gm = ep.module()
    normalize(gm)
    inline_wrapped_regions(gm, name)
    lift_state(gm, name)
    return gm


def _wrappers() -> dict[Any, str]:
    """torch.export's higher-order ops that wrap a region of the forward in a context manager,
    by what they do (the names vary across torch versions: absent ones are left out)."""
    hop = torch.ops.higher_order
    found = {}
    for attr, what in (("wrap_with_autocast", "autocast"), ("wrap_with_set_grad_enabled", "grad")):
        if hasattr(hop, attr):
            found[getattr(hop, attr)] = what
    return found


def inline_wrapped_regions(gm: GraphModule, name: str) -> None:
    """Inline the regions torch.export keeps as submodules called through a higher-order op:
    ``with torch.autocast(..., enabled=False)`` (EfficientViT computes its attention so) and
    ``with torch.set_grad_enabled(...)``. For inference in fp32 both are no-ops, and inlined,
    the region is ordinary ops that every pass, the float64 reference run and every backend
    handle. A region that turns autocast *on* would compute in lower precision than the rest:
    it is refused (``CaptureError``) rather than compiled to different numbers."""
    wrappers = _wrappers()
    for node in list(gm.graph.nodes):
        what = wrappers.get(node.target) if node.op == "call_function" else None
        if what is None:
            continue
        if what == "autocast":
            _device, _dtype, enabled, *_ = node.args[:4]
            if enabled:
                raise CaptureError(
                    f"{name}.forward runs a region under torch.autocast(enabled=True) "
                    f"(node %{node.name}); graphopt compiles in the model's own precision. "
                    "Remove the autocast context and ask for half precision with the "
                    "'precision' pass (pipeline '-O2,precision{dtype=bf16}')"
                )
            body_at, args = 4, node.args[5:]
        else:
            body_at, args = 1, node.args[2:]
        holder = node.args[body_at]
        body = getattr(gm, holder.target) if isinstance(holder, torch.fx.Node) else holder
        results = _inline(gm, node, body, args)
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(results[user.args[1]])
                gm.graph.erase_node(user)
        if node.users:
            raise CaptureError(
                f"{name}.forward: cannot inline the {what} region %{node.name} (its results are "
                "used other than one by one); remove the context manager from the forward"
            )
        gm.graph.erase_node(node)
        if isinstance(holder, torch.fx.Node) and not holder.users:
            gm.graph.erase_node(holder)
            if not any(n.op == "get_attr" and n.target == holder.target for n in gm.graph.nodes):
                delattr(gm, holder.target)
    gm.graph.lint()
    gm.recompile()


def _inline(gm: GraphModule, at: torch.fx.Node, body: GraphModule, args: Any) -> list[Any]:
    """Copy ``body``'s nodes into ``gm`` before ``at``, its placeholders bound to ``args``;
    returns what its output node returns, mapped (a region's constants become ``gm``'s)."""
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    env.update(zip(placeholders, args))
    out: Any = ()
    with gm.graph.inserting_before(at):
        for sub in body.graph.nodes:
            if sub.op == "placeholder":
                continue
            if sub.op == "output":
                out = pytree.tree_map(lambda a: env[a] if isinstance(a, torch.fx.Node) else a,
                                      sub.args[0])  # fmt: skip
                continue
            if sub.op == "get_attr":
                value = body
                for part in str(sub.target).split("."):
                    value = getattr(value, part)
                target = f"{at.name}_{str(sub.target).replace('.', '_')}"
                if isinstance(value, torch.nn.Parameter):
                    gm.register_parameter(target, value)
                elif isinstance(value, torch.Tensor):
                    gm.register_buffer(target, value)
                else:
                    setattr(gm, target, value)
                new = gm.graph.get_attr(target)
                new.meta = dict(sub.meta)
            else:
                new = gm.graph.node_copy(sub, lambda n: env[n])
            env[sub] = new
    return list(out) if isinstance(out, (tuple, list)) else [out]


_NOISY_LOGGERS = (
    "torch.fx.experimental.symbolic_shapes",
    "torch._export",
    "torch.export",
    "torch._dynamo",
)


@contextmanager
def quiet_failures() -> Iterator[None]:
    """On a failed trace torch logs and prints whole graphs to stderr; graphopt's own error says
    what matters, so that output is dropped on failure and passed through on success."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    printed = io.StringIO()
    try:
        with redirect_stderr(printed):
            yield
        sys.stderr.write(printed.getvalue())
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_program(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic: Any
) -> Any:
    """``torch.export.export`` (non-strict), quiet unless it fails."""
    with quiet_failures():
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)


def batch_dims(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    def spec(x: Any) -> Any:
        return {0: Dim.DYNAMIC} if isinstance(x, torch.Tensor) and x.dim() >= 1 else None

    if not kwargs:
        return tuple(pytree.tree_map(spec, a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    return {k: pytree.tree_map(spec, v) for k, v in bound.arguments.items()}


def has_symbolic_batch(gm: GraphModule) -> bool:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor) and val.dim() >= 1:
            if not isinstance(val.shape[0], int):
                return True
    return False


def normalize(gm: GraphModule) -> None:
    """Drop export's trace-time guards and per-call input validation, which graphopt replaces by
    its own input checks (cheaper, and with messages that say expected versus got)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
        elif node.op == "call_function" and node.target in _TRACE_CHECKS:
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    # export's per-call range check; graphopt.runtime.compiled.InputSignature checks inputs instead
    gm.validate_inputs = False
    gm.graph.lint()
    gm.recompile()
