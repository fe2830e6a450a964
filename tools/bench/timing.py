"""Timing: the median (and p10/p90) latency of runners over rotating inputs, after warm-up.

CPU: ``time.perf_counter`` per call at a fixed thread count, the runners taking turns in rounds.
GPU: ``triton.testing.do_bench``, which chooses its own repetition count.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from graphopt.tools.bench.mode import Runner


@dataclass
class Settings:
    device: str = "cpu"
    threads: int = 1
    warmup: int = 3
    min_reps: int = 10
    min_time_s: float = 0.5
    rotate: int = 4  # input sets the timed calls rotate through
    rounds: int = 5  # CPU: modes take turns this many times

    def timing_steps(self) -> int:
        """Progress steps of timing one model's modes: a round each (the GPU times in one)."""
        return 1 if self.device == "cuda" else self.rounds


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int  # timed calls; -1 on the GPU, where do_bench chooses


def time_runners(
    runs: Sequence[Runner],
    sets: Sequence[tuple[Any, ...]],
    settings: Settings,
    on_round: Callable[[int, int], None] | None = None,
) -> list[Timing]:
    """Latency of each runner over rotating inputs, after warm-up.

    CPU: the runners take turns in ``settings.rounds`` rounds, so a slow spell of a shared machine
    lands on every mode rather than on whichever ran then. GPU: ``triton.testing.do_bench``.
    ``on_round(i, n)`` is told when round ``i`` of ``n`` starts (the GPU has one).
    """
    for run in runs:
        for i in range(settings.warmup):
            run(*sets[i % len(sets)])
    if settings.device == "cuda":
        if on_round:
            on_round(1, 1)
        return [_do_bench(run, sets, settings) for run in runs]
    times: list[list[float]] = [[] for _ in runs]
    reps = max(1, math.ceil(settings.min_reps / settings.rounds))
    budget = settings.min_time_s / settings.rounds
    for i in range(settings.rounds):
        if on_round:
            on_round(i + 1, settings.rounds)
        for run, out in zip(runs, times):
            _time_turn(run, sets, reps, budget, out)
    return [_summary(t) for t in times]


def _time_turn(
    run: Runner, sets: Sequence[tuple[Any, ...]], reps: int, budget_s: float, out: list[float]
) -> None:
    """One runner's turn: at least ``reps`` calls and ``budget_s`` seconds, appended to ``out``
    in milliseconds; the input rotates with the runner's own call count."""
    start, i = time.perf_counter(), 0
    while i < reps or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        run(*sets[len(out) % len(sets)])
        out.append((time.perf_counter() - t0) * 1e3)
        i += 1


def _summary(times: list[float]) -> Timing:
    # inclusive: p10 and p90 stay within the times measured (exclusive extrapolates past them)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def _do_bench(run: Runner, sets: Sequence[tuple[Any, ...]], settings: Settings) -> Timing:
    from triton.testing import do_bench

    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        run(*sets[state["i"] % len(sets)])

    rep_ms = max(100, int(settings.min_time_s * 1000))
    p10, p50, p90 = do_bench(call, warmup=25, rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
    return Timing(float(p50), float(p10), float(p90), -1)  # do_bench picks the count
