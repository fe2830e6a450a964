"""The benchmark modes by name: eager PyTorch, torch.compile, graphopt pipelines (float, half,
pruned, int8) on each backend (``graphopt-O2-inductor``, ``graphopt-O2-int8-auto``, ...) and the
ONNX path, each a ``Mode`` (see ``mode.py``); and the default selections."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

import graphopt
from graphopt.backends.base import AUTO, BackendError, backend_named
from graphopt.backends.select import ATEN
from graphopt.pipeline.parse import OPT_LEVELS, half_pipeline
from graphopt.tools.bench import onnx_modes
from graphopt.tools.bench.inputs import random_like
from graphopt.tools.bench.mode import Mode, ModeUnavailable, Runner, Setup


def eager(dtype: torch.dtype | None) -> Mode:
    """The model as it is; in ``dtype`` (a cast copy, GPU only) when one is given."""

    def make(s: Setup) -> Runner:
        if dtype is not None and s.device != "cuda":
            raise ModeUnavailable(f"eager {dtype} is measured on the GPU only")
        model = s.model if dtype is None else _cast(s.model, dtype)

        def run(*args: Any) -> Any:
            with torch.no_grad():
                return model(*(_cast_input(a, dtype) for a in args))

        return run

    return make


def torch_compile(mode: str | None, dtype: torch.dtype | None = None) -> Mode:
    """``torch.compile(model, mode=mode)``, compiled cold when the mode is built."""

    def make(s: Setup) -> Runner:
        if (mode == "max-autotune" or dtype is not None) and s.device != "cuda":
            raise ModeUnavailable(f"torch.compile {mode or dtype} is measured on the GPU only")
        torch._dynamo.reset()  # a cold compile each time: no reuse of another batch's graphs
        compiled = torch.compile(s.model if dtype is None else _cast(s.model, dtype), mode=mode)

        def run(*args: Any) -> Any:
            with torch.no_grad():
                return compiled(*(_cast_input(a, dtype) for a in args))

        run(*s.inputs)  # compile now, so compile time is measured here
        return run

    return make


def graphopt_mode(
    pipeline: str, *, backend: str = "aten", int8: bool = False, gpu_only: str | None = None
) -> Mode:
    """``graphopt.compile(model, inputs, pipeline=pipeline, backend=backend)``; with ``int8``,
    calibrated on 8 random batches shaped like the example inputs. ``gpu_only`` names what
    makes the mode GPU-only (e.g. ``"fp16"``): unavailable elsewhere, with that reason.

    A backend that cannot run here (not registered, a package missing, a device it does not
    serve) makes the mode unavailable with the backend's reason; a named backend that ``auto``'s
    checks reject (the model would fall back to aten) makes it fail with the rejection."""

    def make(s: Setup) -> Runner:
        if gpu_only and s.device != "cuda":
            raise ModeUnavailable(f"graphopt {gpu_only} is measured on the GPU only")
        why = backend_unavailable(backend, s.device)
        if why is not None:
            raise ModeUnavailable(why)
        calib = calibration_batches(s.inputs) if int8 else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = graphopt.compile(
                s.model, s.inputs, pipeline=pipeline, backend=backend, calibration_data=calib
            )
        if backend != AUTO and compiled.backend != backend:
            row = next((r for r in compiled.report.backends if r.backend == backend), None)
            raise RuntimeError(f"backend {backend!r} rejected: {row.why if row else 'unknown'}")
        return compiled

    return make


def backend_unavailable(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here (unknown name, package missing), or None."""
    if backend == AUTO:
        return None
    try:
        why = backend_named(backend).unavailable(device)
    except BackendError as exc:  # not registered (yet): e.g. "unknown backend 'inductor'; ..."
        return str(exc)
    return None if why is None else f"backend {backend!r} unavailable: {why}"


def calibration_batches(inputs: tuple[Any, ...], n: int = 8) -> list[tuple[Any, ...]]:
    """``n`` random batches shaped like ``inputs``, the same for every int8 mode."""
    g = torch.Generator().manual_seed(11)
    return [tuple(random_like(x, g) for x in inputs) for _ in range(n)]


def int8_mode(backend: str) -> Mode:
    """``-O2,int8`` on ``backend``, calibrated as every int8 mode is. The int8 pass's speed
    check (``measure``) times graphopt's own int8 ops only when they are what runs (``aten``);
    under another engine the engine's int8 kernels are judged whole (``auto`` times every
    candidate, and the bench times the mode)."""
    return graphopt_mode("-O2,int8", backend=backend, int8=True)


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


def _cast_input(x: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


# the engines a graphopt mode can run on (graphopt.compile's ``backend``); ``auto`` keeps the
# fastest that passes verification and reports every candidate (``Result.backends``)
BACKENDS = (AUTO, ATEN, "inductor", "onnxruntime")
FP16 = half_pipeline("-O2", "fp16", 0.999)

MODES: dict[str, Mode] = {
    "eager": eager(None),
    "eager-fp16": eager(torch.float16),
    "eager-bf16": eager(torch.bfloat16),
    "torch.compile": torch_compile(None),
    "torch.compile-max-autotune": torch_compile("max-autotune"),
    "torch.compile-fp16": torch_compile(None, torch.float16),
    **{f"graphopt{level}": graphopt_mode(level) for level in OPT_LEVELS},
    "graphopt-O2-fp16": graphopt_mode(FP16, gpu_only="fp16"),
    "graphopt-O2-bf16": graphopt_mode(half_pipeline("-O2", "bf16", 0.999), gpu_only="bf16"),
    # pruning is judged for speed here: random-init zoo models lose accuracy when pruned and
    # need graphopt.recover, so the budget is off (min_cosine=0) in these modes
    "graphopt-O1-channel30": graphopt_mode("-O1,prune{kind=channel,amount=0.3,min_cosine=0.0}"),
    "graphopt-O1-2:4": graphopt_mode(
        "-O1,prune{kind=2:4,amount=0.5,min_cosine=0.0}", gpu_only="2:4 sparsity"
    ),
    "graphopt-O2-int8": graphopt_mode("-O2,int8", int8=True),
    "graphopt-O2-int8-dynamic": graphopt_mode("-O2,int8{act=dynamic}", int8=True),
    # -O2 on each backend: float, int8 (see int8_mode) and, on the GPU, fp16
    **{f"graphopt-O2-{b}": graphopt_mode("-O2", backend=b) for b in BACKENDS},
    **{f"graphopt-O2-int8-{b}": int8_mode(b) for b in BACKENDS},
    **{f"graphopt-O2-fp16-{b}": graphopt_mode(FP16, backend=b, gpu_only="fp16") for b in BACKENDS},
    "onnxruntime": onnx_modes.onnxruntime,
    # the ONNX path: ORT on the original file (above), graphopt on the graph imported from it,
    # ORT on graphopt's export of that graph, and ORT on graphopt's int8 (QDQ) export; that one
    # is int8{measure=false}: graphopt's speed measurement judges its own kernels, not ORT's
    "onnx-graphopt-O2": onnx_modes.graphopt_onnx("-O2"),
    "onnxruntime-graphopt-O2": onnx_modes.ort_on_export(onnx_modes.graphopt_onnx("-O2")),
    "onnxruntime-graphopt-O2-int8": onnx_modes.ort_on_export(
        graphopt_mode("-O2,int8{measure=false}", int8=True)
    ),
}
ONNX_MODES = [
    "onnxruntime",
    "onnx-graphopt-O2",
    "onnxruntime-graphopt-O2",
    "onnxruntime-graphopt-O2-int8",
]
# the quick default sweep (``graphopt bench`` with no --full): what a user compares first, graphopt
# at -O2 on its own executor and on the fastest verified backend against eager, torch.compile and
# ONNX Runtime
QUICK_MODES = ["eager", "torch.compile", "onnxruntime", "graphopt-O2", "graphopt-O2-auto"]
# --full, the zoo's own (small) models: every pipeline, and auto for float and int8 (auto's backend table
# has each engine's time and error, so the per-backend modes are left to --modes)
DEFAULT_MODES = [
    "eager",
    "torch.compile",
    *(f"graphopt{level}" for level in OPT_LEVELS),
    "graphopt-O2-int8",
    "graphopt-O2-int8-dynamic",
    "graphopt-O1-channel30",
    "onnxruntime",
    "graphopt-O2-auto",
    "graphopt-O2-int8-auto",
]
# the full-size models (zoo.EXTERNAL: BERT-base, GPT-2, ViT-base, ...): what the targets
# compare (auto against eager, torch.compile and ONNX Runtime; auto's compile time against
# torch.compile's), as one of these costs minutes per mode on the CPU
EXTERNAL_MODES = [
    "eager",
    "torch.compile",
    "onnxruntime",
    "graphopt-O2-auto",
    "graphopt-O2-int8-auto",
]
GPU_EXTRA_MODES = [
    "eager-fp16",
    "eager-bf16",
    "torch.compile-fp16",
    "torch.compile-max-autotune",
    "graphopt-O2-fp16",
    "graphopt-O2-bf16",
    "graphopt-O1-2:4",
    "graphopt-O2-fp16-auto",
]
