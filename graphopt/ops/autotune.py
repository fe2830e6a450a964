"""Keep only what is faster: measure candidate implementations once per shape, cache the choice.

This is the one home of that policy. Passes ask :func:`why_not_faster` whether a rewrite (a
fused op, an int8 or pruned layer, a whole graph) beats what it replaces on the target by
:data:`MARGIN`; graphopt's custom ops ask :func:`choose` whether a Triton kernel beats the ATen
implementation for the shapes they are called with. Each decision is measured once and cached
in memory and on disk (``$GRAPHOPT_CACHE_DIR/choices.json``, default ``~/.cache/graphopt``),
keyed by the device, the torch version and :func:`cache_key` (what is decided, its options,
the shapes and dtypes).

Timing: on CUDA ``triton.testing.do_bench`` medians; on the CPU the fastest of repeated
``perf_counter`` runs after a warm-up, with the candidates taking turns (interference from
other processes only adds time, so the minimum is the steadiest figure on a shared machine).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from graphopt.kernels.cache import cache_dir

_MEMORY: dict[str, dict[str, Any]] = {}


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def _disk_path() -> Path:
    return cache_dir() / "choices.json"


def _load_disk() -> dict[str, Any]:
    try:
        return json.loads(_disk_path().read_text())
    except (OSError, ValueError):
        return {}


def _save_disk(key: str, entry: dict[str, Any]) -> None:
    path = _disk_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        table = _load_disk()
        table[key] = entry
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home only costs re-measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device | str, reps: int = 15) -> float:
    """Seconds of one call of ``fn`` on ``device`` (see :func:`measure_all`)."""
    return measure_all({"fn": fn}, device, reps)["fn"]


def measure_all(
    fns: dict[str, Callable[[], Any]], device: torch.device | str, reps: int = 15
) -> dict[str, float]:
    """Seconds per call of each candidate (CUDA: median; CPU: fastest), measured in turns."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        # short windows: a choice needs a clear winner, not a third significant digit, and
        # every choice adds to compile time
        return {
            name: do_bench(fn, warmup=5, rep=20, return_mode="median") / 1e3
            for name, fn in fns.items()
        }
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():  # warm-up
            fn()
            fn()
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    # the fastest run: interference from other processes only ever adds time
    return {name: min(ts) for name, ts in times.items()}


def choose(
    key: str,
    candidates: dict[str, Callable[[], Any]],
    device: torch.device | str,
    *,
    reps: int = 15,
) -> tuple[str, dict[str, float]]:
    """The fastest candidate's name and every candidate's seconds (cached per ``key``, made by
    :func:`cache_key`).

    The first candidate is the baseline and wins ties: a new implementation must be strictly
    faster to be chosen.
    """
    full_key = f"{device_name(device)}|torch {torch.__version__}|{key}"
    entry = _MEMORY.get(full_key)
    if entry is None:
        entry = _load_disk().get(full_key)
    if entry is None or entry.get("choice") not in candidates:
        times = measure_all(candidates, device, reps)
        baseline = next(iter(candidates))
        best = min(times, key=lambda n: (times[n], n != baseline))
        entry = {"choice": best, "times": times}
        _save_disk(full_key, entry)
    _MEMORY[full_key] = entry
    return entry["choice"], dict(entry["times"])


def shape_key(*tensors: Any) -> str:
    """``float16[32,128,768]:s`` per tensor (``:n`` when not contiguous), for cache keys."""
    parts = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dtype = str(t.dtype).removeprefix("torch.")
            dims = ",".join(str(d) for d in t.shape)
            parts.append(f"{dtype}[{dims}]{'' if t.is_contiguous() else ':n'}")
        else:
            parts.append(repr(t))
    return " ".join(parts)


def cache_key(what: str, *args: Any, **options: Any) -> str:
    """The key of one cached choice (every key is made here): ``what`` is decided (an op, a
    rule, a pass), then its ``options`` as ``name=value``, then each argument: a tensor as
    :func:`shape_key` writes it, a list or tuple of tensors element by element, any other value
    by its repr, hashed when longer than 64 characters (a program's text). :func:`choose` adds
    the device and the torch version."""
    parts = [what, *(f"{k}={v}" for k, v in options.items())]
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) for t in a):
            parts.append(f"[{shape_key(*a)}]")
        elif isinstance(a, torch.Tensor) or len(text := repr(a)) <= 64:
            parts.append(shape_key(a))
        else:
            parts.append("#" + hashlib.sha256(text.encode()).hexdigest()[:16])
    return " ".join(parts)


# a rewrite must win by this fraction: timing noise must not flip a compile's result
MARGIN = 0.03


def why_not_faster(
    key: str | None,
    baseline: Callable[[], Any],
    candidate: Callable[[], Any],
    device: torch.device | str,
    *,
    names: tuple[str, str] = ("ATen", "fused"),
    reps: int = 15,
) -> str | None:
    """Keep only what measures faster: None when ``candidate`` runs at least :data:`MARGIN`
    faster than ``baseline`` on ``device``; otherwise the near-miss reason with both times,
    ``not faster on <device>: fused 0.085 ms vs ATen 0.054 ms``, or, for a candidate faster by
    less than the margin, ``not faster by the 3% margin on <device>: fused 0.534 ms vs ATen
    0.540 ms (needed under 0.524 ms)`` (``names`` = the baseline's and the candidate's names).

    Measured once per ``key`` (from :func:`cache_key`) and cached; ``key=None`` measures every
    time (whole graphs, which have no key). The candidates are timed as ``aten`` and ``fused``,
    the names the cache records.
    """
    fns = {"aten": baseline, "fused": candidate}
    if key is None:
        times = measure_all(fns, device, reps)
    else:
        _, times = choose(key, fns, device, reps=reps)
    if times["fused"] < times["aten"] * (1 - MARGIN):
        return None
    base, new = names
    both = f"{new} {times['fused'] * 1e3:.3f} ms vs {base} {times['aten'] * 1e3:.3f} ms"
    if times["fused"] < times["aten"]:  # faster, but within the noise the margin allows for
        bar = times["aten"] * (1 - MARGIN) * 1e3
        return (
            f"not faster by the {MARGIN:.0%} margin on {device_name(device)}: {both} "
            f"(needed under {bar:.3f} ms)"
        )
    return f"not faster on {device_name(device)}: {both}"
