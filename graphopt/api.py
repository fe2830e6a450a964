"""``graphopt.compile``: capture, run the verified pipeline, return a callable module."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.errors import CaptureError, GraphoptError
from graphopt.frontends import onnx_import
from graphopt.frontends.capture import capture
from graphopt.frontends.exported import as_args
from graphopt.frontends.signature import InputSignature
from graphopt.pipeline.manager import Event, PassManager
from graphopt.pipeline.passes import PipelineItem
from graphopt.runtime.compiled import CompiledModule

TARGETS = ("auto", "cpu", "cuda")


def resolve_target(target: str, model: torch.nn.Module, args: tuple[Any, ...]) -> str:
    if target not in TARGETS:
        raise GraphoptError(f"target={target!r} is not one of {', '.join(TARGETS)}")
    tensors = [t for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
    tensors += list(model.parameters())[:1]
    on_cuda = any(t.is_cuda for t in tensors)
    if target == "auto":
        return "cuda" if on_cuda else "cpu"
    if target == "cuda" and not torch.cuda.is_available():
        raise GraphoptError("target='cuda' but no CUDA device is available; use target='cpu'")
    return target


def compile(
    model: Any,
    example_inputs: Any = None,
    *,
    example_kwargs: dict[str, Any] | None = None,
    pipeline: str | Sequence[PipelineItem | str] = "-O1",
    target: str = "auto",
    verify: bool = True,
    on_fail: str = "rollback",
    max_rewrites: int | None = None,
    dynamic_batch: bool = True,
    on_event: Event | None = None,
    calibration_data: Iterable[Any] | None = None,
) -> CompiledModule:
    """Optimize ``model`` for inference and return a module that behaves like it.

    The model is captured in eval mode and never mutated. After every pass the graph is run on
    ``example_inputs`` and judged against a float64 run of the captured graph; a pass that breaks
    its contract is rolled back with a warning (``on_fail="rollback"``) or raises
    ``EquivalenceError`` (``on_fail="raise"``). ``.report`` on the result has the per-pass table.

    ``calibration_data`` (for ``int8``): an iterable of batches, each shaped like
    ``example_inputs`` (a tensor or a tuple of positional inputs). Without it, the example
    inputs are the only calibration batch. Under ``torch.distributed``, each process passes its
    own shard and the observers are all-reduced, so every process gets the same model.

    ``model`` may be an ONNX file path or ``onnx.ModelProto``; ``example_inputs`` are then
    optional (synthesized from the ONNX input types) and every symbolic ONNX dim stays dynamic.
    """
    if onnx_import.is_onnx_source(model):  # an ONNX file or ModelProto: import it first
        model = onnx_import.load_onnx(model)
    if example_inputs is None and isinstance(model, onnx_import.OnnxModule):
        example_inputs = model.example_inputs()
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"graphopt.compile takes a torch.nn.Module or an ONNX file, got {type(model).__name__}; wrap a "
            "function in an nn.Module"
        )
    args = as_args(example_inputs)
    kwargs = dict(example_kwargs or {})
    resolved = resolve_target(target, model, args)
    manager = PassManager(
        pipeline,
        verify=verify,
        on_fail=on_fail,
        max_rewrites=max_rewrites,
        target=resolved,
        on_event=on_event,
    )
    if calibration_data is not None:
        manager.ctx.calibration = [
            pytree.tree_leaves((as_args(batch), kwargs)) for batch in calibration_data
        ]
    gm = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    info = gm.meta["graphopt_capture"]
    flat_inputs = pytree.tree_leaves((args, kwargs))
    optimized, report = manager.run(gm, flat_inputs)
    report.capture = info
    optimized.meta["graphopt_capture"] = info
    spec = ",".join(item.spec() for item in manager.items)
    signature = InputSignature.of(args, kwargs, info["dynamic_batch"])
    if "dynamic_dims" in info:  # ONNX: every symbolic dim may vary, not only dim 0
        signature = onnx_import.input_signature(args, info)
    return CompiledModule(optimized, signature, report=report, pipeline=spec, target=resolved)
