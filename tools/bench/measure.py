"""Measuring one model: every mode built in this process on the same inputs, its compile time and
memory taken, its outputs checked against eager fp32, then all modes timed together.

A mode that cannot run is a finding, not a crash: its ``Result`` says ``unavailable`` or
``failed`` with the reason, or ``skipped`` when the run's time limit was spent before it started.
A graphopt mode also records the engine it runs on and, from its compile report, the backend
table (every candidate ``auto`` tried: time, error, kept / rejected and why) and its int8 layers.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt import zoo
from graphopt.tools.bench.inputs import input_sets, to_device
from graphopt.tools.bench.mode import ModeUnavailable, Runner, Setup
from graphopt.tools.bench.modes import MODES
from graphopt.tools.bench.timing import Settings, Timing, time_runners
from graphopt.verification import metrics

SKIPPED = "the run's time limit (--time-limit) was spent before this mode started"


@dataclass
class Result:
    model: str
    mode: str
    batch: int
    status: str = "ok"  # ok | unavailable | failed | skipped
    reason: str = ""
    inputs: str = ""  # the example inputs' shapes, e.g. "4x128 int64"
    params_m: float | None = None  # the model's parameters, in millions
    latency_ms: float | None = None  # median
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int = 0  # timed calls on the CPU; -1 on the GPU, where do_bench chooses
    compile_s: float | None = None
    peak_mem_mb: float | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    speedup: float | None = None  # eager latency / this latency
    backend: str | None = None  # the engine a graphopt mode runs on (aten, inductor, ...)
    pipeline: str | None = None  # a graphopt mode's pipeline, as its compiled module states it
    # the compile report's backend table: one dict per candidate (see backends.select.BackendRow)
    backends: list[dict[str, Any]] = field(default_factory=list)
    int8_layers: str | None = None  # "int8 / quantizable" from the int8 pass, when it ran


def bench_model(
    name: str,
    modes: Sequence[str],
    batch: int | None,
    settings: Settings,
    on_step: Callable[[str], None] | None = None,
    deadline: float | None = None,
) -> list[Result]:
    """Every mode of the zoo model ``name``, in this process, on the same inputs: ``batch`` of
    them, or the zoo's own batch (and sequence length) for the model when ``batch`` is None.
    No mode starts after ``deadline`` (a ``time.perf_counter()`` value): those are skipped.
    ``on_step`` is told each mode as it is built and each timing round as it starts."""
    if batch is None:
        batch = default_batch(name)
    if _past(deadline):  # not even built: a full-size model takes seconds to build
        return [Result(name, m, batch, "skipped", SKIPPED) for m in modes]
    try:
        model, inputs = zoo.get(name, batch=batch)
    except zoo.ModelUnavailable as exc:
        return [Result(name, m, batch, "unavailable", str(exc)) for m in modes]
    about = {"inputs": describe_inputs(inputs), "params_m": _params_m(model)}
    model = model.eval().to(settings.device)
    inputs = to_device(inputs, settings.device)
    sets = [to_device(s, settings.device) for s in input_sets(inputs, settings.rotate)]
    check = sets[0]
    with torch.no_grad():
        reference = model(*check)
    setup = Setup(model, inputs, settings.device)
    results, runs = [], []
    for mode in modes:
        if on_step:
            on_step(mode)
        if _past(deadline):
            result, run = Result(name, mode, batch, "skipped", SKIPPED), None
        else:
            result, run = _prepare_mode(name, mode, batch, setup, check, reference, settings)
        result.__dict__.update(about)
        results.append(result)
        runs.append(run)
    ready = [(r, run) for r, run in zip(results, runs) if run is not None]
    try:
        rounds = None if on_step is None else (lambda i, n: on_step(f"timing, round {i}/{n}"))
        timings = time_runners([run for _, run in ready], sets, settings, rounds)
    except Exception as exc:  # a mode that worked once and then failed while timed
        for r, _ in ready:
            r.status, r.reason = "failed", f"while timing: {_one_line(exc)}"
        return results
    for (r, _), timing in zip(ready, timings):
        _record(r, timing)
    _speedups(results)
    return results


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() > deadline


def default_batch(name: str) -> int:
    """The batch size the zoo builds ``name`` with when none is given."""
    return int(inspect.signature(zoo.MODELS[name]).parameters["batch"].default)


def describe_inputs(inputs: Any) -> str:
    """The input tensors' shapes and dtypes: ``"4x128 int64"``, ``"8x3x32x32 float32"``."""
    leaves = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
    return ", ".join(
        f"{'x'.join(map(str, x.shape))} {str(x.dtype).removeprefix('torch.')}" for x in leaves
    )


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _record(result: Result, timing: Timing) -> None:
    result.latency_ms, result.p10_ms = timing.median_ms, timing.p10_ms
    result.p90_ms, result.reps = timing.p90_ms, timing.reps


def _speedups(results: Sequence[Result]) -> None:
    """Each measured mode's speedup over the measured eager mode, where there is one."""
    eager = next((r for r in results if r.mode == "eager" and r.latency_ms), None)
    for r in results:
        if eager and r.latency_ms:
            r.speedup = eager.latency_ms / r.latency_ms  # type: ignore[operator]


def _prepare_mode(
    name: str,
    mode: str,
    batch: int,
    setup: Setup,
    check: tuple[Any, ...],
    reference: Any,
    settings: Settings,
) -> tuple[Result, Runner | None]:
    """Build (compile) one mode, measure its compile time and memory, check its outputs."""
    result = Result(name, mode, batch)
    if mode not in MODES:
        result.status, result.reason = "failed", f"unknown mode {mode!r}"
        return result, None
    mem: dict[str, float] = {}
    try:
        with _memory(settings.device, mem):
            t0 = time.perf_counter()
            run = MODES[mode](setup)
            result.compile_s = time.perf_counter() - t0
            result.__dict__.update(output_errors(run(*check), reference))
            result.__dict__.update(compile_facts(run))
    except ModeUnavailable as exc:
        result.status, result.reason = "unavailable", str(exc)
        return result, None
    except Exception as exc:  # a mode failing is a finding to report, not a crash
        result.status, result.reason = "failed", _one_line(exc)
        return result, None
    result.peak_mem_mb = mem.get("peak_mem_mb")
    return result, run


def compile_facts(run: Runner) -> dict[str, Any]:
    """What a graphopt mode's compiled module says about itself: the engine it runs on, its
    pipeline, the backend table of its compile report and its int8 layers; nothing for other
    modes."""
    backend, report = getattr(run, "backend", None), getattr(run, "report", None)
    if backend is None or report is None:
        return {}
    facts: dict[str, Any] = {"backend": backend, "pipeline": getattr(run, "pipeline", None)}
    facts["backends"] = [asdict(row) for row in getattr(report, "backends", [])]
    for record in getattr(report, "records", []):
        if record.name == "int8" and "layers" in record.stats:
            layers = record.stats["layers"]
            kept = sum(1 for layer in layers if layer.get("precision") == "int8")
            kept = kept if record.status == "ok" else 0  # a rolled-back pass left none
            facts["int8_layers"] = f"{kept}/{len(layers)}"
    return facts


def output_errors(got: Any, want: Any) -> dict[str, float]:
    """Worst max-abs, relative-L2 and cosine over the float outputs, against eager fp32."""
    g, w = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(g) != len(w):
        raise RuntimeError(f"{len(g)} outputs instead of {len(w)}")
    pairs = [(a, b) for a, b in zip(g, w) if isinstance(b, torch.Tensor) and b.is_floating_point()]
    for a, b in pairs:
        if tuple(a.shape) != tuple(b.shape):
            raise RuntimeError(f"output shape {tuple(a.shape)} instead of {tuple(b.shape)}")
    return {
        "max_abs": max((metrics.max_abs(a, b) for a, b in pairs), default=0.0),
        "rel_l2": max((metrics.rel_l2(a, b) for a, b in pairs), default=0.0),
        "cosine": min((metrics.cosine(a, b) for a, b in pairs), default=1.0),
    }


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


@contextlib.contextmanager
def _memory(device: str, out: dict[str, float]) -> Iterator[None]:
    """GPU: peak allocated by torch. CPU: resident-set growth of the process during the mode."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mb()
        yield
        out["peak_mem_mb"] = max(0.0, _rss_mb() - base)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
