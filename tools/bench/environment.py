"""The environment record of a benchmark run: date, device, versions and the timing method."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any

import torch

import graphopt
from graphopt.tools.bench.timing import Settings


def environment(settings: Settings) -> dict[str, Any]:
    """What a reader needs to judge the figures: when, on what, with which versions, and how."""
    device = torch.cuda.get_device_name() if settings.device == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_kind": settings.device,
        "threads": settings.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "graphopt": graphopt.__version__,
        "method": method(settings),
    }


def method(settings: Settings) -> str:
    """How the latencies were taken, in one sentence."""
    if settings.device == "cuda":
        how = "(triton.testing.do_bench)"
    else:
        how = (
            f"(modes take turns in {settings.rounds} rounds; per mode >= {settings.min_reps} calls "
            f"and >= {settings.min_time_s} s; {settings.threads} thread(s))"
        )
    return "all modes in one process; warm-up then median of rotating random inputs " + how


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "not installed"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"
