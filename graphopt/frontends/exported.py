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
    lift_state(gm, name)
    return gm


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
