"""``graphopt.compile``: capture, run the verified pipeline, return a callable module."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.backends.base import Engine, Handoff
from graphopt.backends.select import BackendRow, budget_of, choose_engine
from graphopt.errors import GraphoptError
from graphopt.frontends.capture import capture, signature_for, source_of
from graphopt.frontends.exported import as_args
from graphopt.pipeline.manager import Event, PassManager
from graphopt.pipeline.passes import PipelineItem
from graphopt.pipeline.report import Report
from graphopt.runtime.compiled import CompiledModule
from graphopt.verification.contracts import Contract
from graphopt.verification.interpreter import reference_run

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
    backend: str = "aten",
) -> CompiledModule:
    """Optimize ``model`` for inference and return a module that behaves like it.

    The model is captured in eval mode and never mutated. After every pass the graph is run on
    ``example_inputs`` and judged against a float64 run of the captured graph; a pass that breaks
    its contract is rolled back with a warning (``on_fail="rollback"``) or raises
    ``EquivalenceError`` (``on_fail="raise"``). ``.report`` on the result has the per-pass table.

    ``calibration_data`` (for ``int8``): an iterable of batches, each shaped like
    ``example_inputs`` (a tensor or a tuple of positional inputs). It is read once, batch by
    batch, and never copied: a generator or a DataLoader works, and only the first batch is
    kept (the per-layer sensitivity check runs on it). Without it, the example inputs are the
    only calibration batch. Under ``torch.distributed``, each process passes its own shard and
    the observers are all-reduced, so every process gets the same model.

    ``backend`` is the engine the optimized graph runs on: ``"aten"`` (the default: the graph
    itself, calling ATen and graphopt ops), ``"inductor"`` (torch.compile), ``"onnxruntime"``,
    any registered with ``graphopt.register_backend``, or ``"auto"``: every backend available
    here is built, verified against the float64 reference within the pipeline's budget, timed
    on the example inputs, and the fastest that passes is kept (``.report`` has the table). A
    backend that breaks the budget is never returned.

    ``model`` may be an ONNX file path or ``onnx.ModelProto``; ``example_inputs`` are then
    optional (synthesized from the ONNX input types) and every symbolic ONNX dim stays dynamic.
    """
    model, example_inputs = source_of(model, example_inputs)
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
        calibration=None if calibration_data is None else flat_batches(calibration_data, kwargs),
        engine=backend,
    )
    gm = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    info = gm.meta["graphopt_capture"]
    flat_inputs = pytree.tree_leaves((args, kwargs))
    optimized, report = manager.run(gm, flat_inputs)
    report.capture = info
    optimized.meta["graphopt_capture"] = info
    spec = ",".join(item.spec() for item in manager.items)
    signature = signature_for(args, kwargs, info)
    engine = None
    if backend != "aten":
        reference = manager.verifier.ref_outputs if manager.verifier else None
        engine, report.backends = run_on_backend(
            backend, optimized, gm, flat_inputs, signature, report, resolved, on_fail, reference
        )
    return CompiledModule(
        optimized, signature, report=report, pipeline=spec, target=resolved, engine=engine
    )


def run_on_backend(
    backend: str,
    optimized: GraphModule,
    captured: GraphModule,
    flat_inputs: list[Any],
    signature: Any,
    report: Report,
    target: str,
    on_fail: str,
    reference: list[Any] | None,
) -> tuple[Engine | None, list[BackendRow]]:
    """The engine for ``backend`` (None: aten, the graph itself) and the backend table. Engines
    are judged against the float64 run of the captured graph, within what the contracts of the
    passes that changed the graph allowed."""
    if reference is None:  # verify=False: the backends are still verified
        reference = reference_run(captured, flat_inputs)[0]
    budget = budget_of([Contract.parse(r.contract) for r in report.records if r.status == "ok"])
    handoff = Handoff.of(optimized, flat_inputs, signature)
    engine, rows = choose_engine(backend, handoff, target, reference, budget, on_fail=on_fail)
    return (None if engine.backend == "aten" else engine), rows


def flat_batches(
    batches: Iterable[Any], kwargs: dict[str, Any] | None = None
) -> Iterator[list[Any]]:
    """Calibration batches as the pass manager takes them: each batch (a tensor or a tuple of
    positional inputs, like ``example_inputs``) flattened with the example ``kwargs``, lazily:
    ``batches`` is read as the result is, once."""
    if not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, torch.Tensor)):
        raise GraphoptError(
            f"calibration_data is a {type(batches).__name__}; give an iterable of batches (a "
            "list, a generator or a DataLoader), each shaped like the example inputs"
        )
    return _flat_batches(batches, kwargs)


def _flat_batches(batches: Iterable[Any], kwargs: dict[str, Any] | None) -> Iterator[list[Any]]:
    for index, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list)):
            raise GraphoptError(
                f"calibration batch {index} is a {type(batch).__name__}; give each batch as the "
                "example inputs are given: a tensor, or a tuple of the model's positional inputs"
            )
        yield pytree.tree_leaves((as_args(batch), kwargs or {}))
