"""The benchmark modes by name: eager PyTorch, torch.compile, graphopt pipelines (float, half,
pruned, int8) and the ONNX path, each a ``Mode`` (see ``mode.py``); and the default selections."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch

import graphopt
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


def graphopt_pipeline(pipeline: str, gpu_only: bool = False) -> Mode:
    """``graphopt.compile(model, inputs, pipeline=pipeline)``."""

    def make(s: Setup) -> Runner:
        if gpu_only and s.device != "cuda":
            raise ModeUnavailable(f"graphopt {pipeline} is measured on the GPU only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(s.model, s.inputs, pipeline=pipeline)

    return make


def graphopt_int8(pipeline: str) -> Mode:
    """graphopt with int8, calibrated on 8 random batches shaped like the example inputs."""

    def make(s: Setup) -> Runner:
        g = torch.Generator().manual_seed(11)
        calib = [tuple(random_like(x, g) for x in s.inputs) for _ in range(8)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(s.model, s.inputs, pipeline=pipeline, calibration_data=calib)

    return make


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(model).to(dtype)


def _cast_input(x: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


MODES: dict[str, Mode] = {
    "eager": eager(None),
    "eager-fp16": eager(torch.float16),
    "eager-bf16": eager(torch.bfloat16),
    "torch.compile": torch_compile(None),
    "torch.compile-max-autotune": torch_compile("max-autotune"),
    "torch.compile-fp16": torch_compile(None, torch.float16),
    **{f"graphopt{level}": graphopt_pipeline(level) for level in OPT_LEVELS},
    "graphopt-O2-fp16": graphopt_pipeline(half_pipeline("-O2", "fp16", 0.999), gpu_only=True),
    "graphopt-O2-bf16": graphopt_pipeline(half_pipeline("-O2", "bf16", 0.999), gpu_only=True),
    # pruning is judged for speed here: random-init zoo models lose accuracy when pruned and
    # need graphopt.recover, so the budget is off (min_cosine=0) in these modes
    "graphopt-O1-channel30": graphopt_pipeline("-O1,prune{kind=channel,amount=0.3,min_cosine=0.0}"),
    "graphopt-O1-2:4": graphopt_pipeline(
        "-O1,prune{kind=2:4,amount=0.5,min_cosine=0.0}", gpu_only=True
    ),
    "graphopt-O2-int8": graphopt_int8("-O2,int8"),
    "graphopt-O2-int8-dynamic": graphopt_int8("-O2,int8{act=dynamic}"),
    "onnxruntime": onnx_modes.onnxruntime,
    # the ONNX path: ORT on the original file (above), graphopt on the graph imported from it,
    # ORT on graphopt's export of that graph, and ORT on graphopt's int8 (QDQ) export; that one
    # is int8{measure=false}: graphopt's speed measurement judges its own kernels, not ORT's
    "onnx-graphopt-O2": onnx_modes.graphopt_onnx("-O2"),
    "onnxruntime-graphopt-O2": onnx_modes.ort_on_export(onnx_modes.graphopt_onnx("-O2")),
    "onnxruntime-graphopt-O2-int8": onnx_modes.ort_on_export(
        graphopt_int8("-O2,int8{measure=false}")
    ),
}
ONNX_MODES = [
    "onnxruntime",
    "onnx-graphopt-O2",
    "onnxruntime-graphopt-O2",
    "onnxruntime-graphopt-O2-int8",
]
DEFAULT_MODES = [
    "eager",
    "torch.compile",
    *(f"graphopt{level}" for level in OPT_LEVELS),
    "graphopt-O2-int8",
    "graphopt-O2-int8-dynamic",
    "graphopt-O1-channel30",
    "onnxruntime",
]
GPU_EXTRA_MODES = [
    "eager-fp16",
    "eager-bf16",
    "torch.compile-fp16",
    "torch.compile-max-autotune",
    "graphopt-O2-fp16",
    "graphopt-O2-bf16",
    "graphopt-O1-2:4",
]
