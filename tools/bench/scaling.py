"""How latency grows with the batch size, and graphopt's compile time with the model's depth."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import graphopt
from graphopt import zoo
from graphopt.tools.bench.inputs import to_device
from graphopt.tools.bench.measure import Result, bench_model
from graphopt.tools.bench.timing import Settings


def batch_scaling(
    models: Sequence[str],
    modes: Sequence[str],
    batches: Sequence[int],
    settings: Settings,
    progress: Callable[[str], None],
    deadline: float | None = None,
) -> list[Result]:
    """Every mode of every model at every batch size (none started after ``deadline``)."""
    out = []
    for name in models:
        for batch in batches:
            progress(f"batch scaling: {name} batch {batch}")
            out += bench_model(name, modes, batch, settings, deadline=deadline)
    return out


def compile_scaling(
    depths: Sequence[int],
    settings: Settings,
    progress: Callable[[str], None],
    deadline: float | None = None,
) -> list[dict[str, Any]]:
    """graphopt -O1 compile time (and graph size) for zoo GPT decoders of growing depth, up to
    the first depth that would start after ``deadline``."""
    rows = []
    for depth in depths:
        progress(f"compile scaling: gpt with {depth} layers")
        if deadline is not None and time.perf_counter() > deadline:
            break
        model, inputs = zoo.gpt(batch=2, layers=depth)
        model, inputs = model.to(settings.device), to_device(inputs, settings.device)
        t0 = time.perf_counter()
        compiled = graphopt.compile(model, inputs, pipeline="-O1")
        total = time.perf_counter() - t0
        nodes = compiled.report.records[0].nodes_before if compiled.report.records else 0
        passes = sum(r.time_s + r.verify_s for r in compiled.report.records)
        rows.append({"layers": depth, "nodes": nodes, "compile_s": total, "passes_s": passes})
    return rows


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of log(y) against log(x): 1.0 is linear growth."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None
