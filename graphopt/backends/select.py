"""Choosing the engine: build the candidates, verify each against the float64 reference within
the pipeline's budget, time them in turns in one process, keep the fastest that passed.

The budget is what the pipeline's contracts allowed (``budget_of``): every lossy pass's own
budget (int8's cosine, pruning's cosine, ...) judged against the float64 reference, and the
rounding floor of the graph's compute dtype, judged like a ``rounding`` pass: an engine's error
may be at most ``max(2 x the aten backend's error, the dtype's floor)``. ``aten`` (the graph
itself, calling ATen and ``graphopt::`` ops) is the reference executor and always a candidate.
A candidate that breaks the budget is rejected, never returned.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from graphopt.backends.base import (
    AUTO,
    Backend,
    BackendError,
    Engine,
    Handoff,
    ValueJudge,
    backend_named,
    outputs_of,
    registered_backends,
)
from graphopt.errors import EquivalenceError, first_line
from graphopt.verification import metrics
from graphopt.verification.contracts import Contract
from graphopt.verification.verify import judge_value

ATEN = "aten"


class BackendWarning(UserWarning):
    """A backend asked for by name was rejected; the model runs on ``aten`` instead."""


@dataclass
class BackendRow:
    """One line of the report's backend table."""

    backend: str
    status: str  # kept | passed | rejected | unavailable | unsupported | failed
    time_ms: float | None = None  # median per call on the example inputs
    error: float | None = None  # worst rel_max of the outputs against float64
    build_s: float | None = None
    why: str = ""


def budget_of(contracts: Sequence[Contract]) -> list[Contract]:
    """What an engine's outputs are held to, from the contracts of the passes that changed the
    graph: each lossy budget, and one rounding contract at the widest compute dtype named."""
    lossy = [c for c in contracts if c.kind == "lossy"]
    dtypes = [c.dtype for c in contracts if c.kind == "rounding" and c.dtype]
    floor = min(dtypes, key=_floor_rank) if dtypes else None
    return [*dict.fromkeys(lossy), Contract.rounding(floor)]


def _floor_rank(dtype: str) -> float:
    return -metrics.rounding_floor(getattr(torch, dtype))


def judge(
    budget: Sequence[Contract],
    outputs: Sequence[Any],
    aten: Sequence[Any],
    reference: Sequence[Any],
) -> tuple[bool, float, str]:
    """(ok, worst error against float64, why not) of an engine's outputs."""
    if len(outputs) != len(aten):
        return False, float("inf"), f"{len(outputs)} outputs instead of {len(aten)}"
    error = 0.0
    for i, (out, before, ref) in enumerate(zip(outputs, aten, reference)):
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out)
        if isinstance(before, torch.Tensor) and out.device != before.device:
            out = out.to(before.device)
        if out.is_floating_point() and isinstance(ref, torch.Tensor) and out.shape == ref.shape:
            error = max(error, metrics.rel_max(out, ref))
        for contract in budget:
            ok, _, why = judge_value(contract, out, before, ref)
            if not ok:
                return False, error, f"output {i} {why}"
    return True, error, ""


def choose_engine(
    request: str,
    handoff: Handoff,
    target: str,
    reference: Sequence[Any],
    budget: Sequence[Contract],
    *,
    on_fail: str = "rollback",
) -> tuple[Engine, list[BackendRow]]:
    """The engine to run the compiled model on, and the report's backend table.

    ``request`` is a backend name, or ``auto``: every registered backend available for
    ``target`` is built, verified and timed, and the fastest that keeps the budget is kept.
    A named backend that breaks the budget raises ``EquivalenceError`` (``on_fail="raise"``) or
    falls back to ``aten`` with a ``BackendWarning``; one that cannot run here raises
    ``BackendError``."""
    names = list(registered_backends()) if request == AUTO else [request]
    if request != AUTO:
        backend_named(request)  # an unknown name is an error before anything is built
    if ATEN not in names:
        names.insert(0, ATEN)
    rows: dict[str, BackendRow] = {}
    engines: dict[str, tuple[Backend, Engine]] = {}
    aten_out: list[Any] = []
    for name in names:
        backend = backend_named(name)
        row = rows[name] = BackendRow(name, "rejected")
        why = backend.unavailable(target)
        status = "unavailable"
        if why is None:
            why, status = backend.unsupported(handoff, target), "unsupported"
        if why is not None:
            row.status, row.why = status, why
            continue
        t0 = time.perf_counter()
        try:
            engine = backend.build(handoff, target)
            outputs = outputs_of(engine.run(*handoff.example))
        except Exception as exc:  # an engine that fails to build or run is not kept
            row.status, row.why = "failed", f"{type(exc).__name__}: {first_line(exc)}"
            if name == ATEN:
                raise
            continue
        row.build_s = time.perf_counter() - t0
        if name == ATEN:
            aten_out = outputs
        ok, row.error, why = judge(budget, outputs, aten_out, reference)
        if not ok:
            where = backend.diagnose(engine, handoff, value_judge(budget))
            row.why = why + (f"; {where}" if where else "")
            continue
        row.status = "passed"
        engines[name] = (backend, engine)
    if request != AUTO:
        _explain_request(request, rows[request], on_fail)
    candidates = {n: e for n, (_, e) in engines.items() if request in (AUTO, n) or n == ATEN}
    times = time_in_turns({n: _runner(e, handoff) for n, e in candidates.items()})
    for name, seconds in times.items():
        rows[name].time_ms = seconds * 1e3
    wanted = request if request in candidates else ATEN
    kept = min(times, key=times.__getitem__) if request == AUTO else wanted
    rows[kept].status = "kept"
    return candidates[kept], list(rows.values())


def _explain_request(request: str, row: BackendRow, on_fail: str) -> None:
    if row.status in ("unavailable", "unsupported", "failed"):
        raise BackendError(f"backend {request!r} is {row.status} here: {row.why}")
    if row.status == "rejected":
        message = (
            f"backend {request!r} broke the pipeline's budget: {row.why}. The model runs on "
            "'aten' (the verified graph itself); report the difference"
        )
        if on_fail == "raise":
            raise EquivalenceError(message, pass_name=f"backend:{request}", kind="backend")
        warnings.warn(message, BackendWarning, stacklevel=4)


def value_judge(budget: Sequence[Contract]) -> ValueJudge:
    """``judge(value, aten, ref) -> (ok, why)`` for one intermediate value, held to the budget
    as an output is: ``aten`` is the aten backend's value of the same node, ``ref`` its float64
    value. An integer (quantized) value may differ from aten's by one step: a tie rounded the
    other way, or ONNX's saturation at -128 where graphopt clamps at -127."""

    def one(value: Any, before: Any, ref: Any) -> tuple[bool, str]:
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            return _within_one_step(value, before)
        for contract in budget:
            ok, _, why = judge_value(contract, value, before, ref)
            if not ok:
                return False, why
        return True, ""

    return one


def _within_one_step(value: torch.Tensor, before: Any) -> tuple[bool, str]:
    if not isinstance(before, torch.Tensor) or before.shape != value.shape:
        return False, f"shape {tuple(value.shape)} instead of {tuple(getattr(before, 'shape', ()))}"
    steps = (value.long() - before.long()).abs().max().item() if value.numel() else 0
    return steps <= 1, f"differs from the aten backend's value by up to {steps} steps"


def _runner(engine: Engine, handoff: Handoff) -> Any:
    inputs = handoff.example
    return lambda: engine.run(*inputs)


BLOCK_S = 0.01  # about this long, each candidate's block of calls in a round of time_in_turns


def time_in_turns(fns: dict[str, Any], seconds: float = 1.5) -> dict[str, float]:
    """Median seconds per call of each candidate, timed in turns for about ``seconds`` in all:
    each round runs every candidate for a block of calls (so a busy spell of the machine hits
    them all alike), 3 to 51 rounds.

    The first call of each block is not counted. Engines keep their own thread pools (torch's
    OpenMP threads, ONNX Runtime's), and right after another engine ran, a call pays for waking
    its pool and competes with the other pool's threads still spinning: timed call by call in
    turns, that made ONNX Runtime measure up to 3x slower than it runs on its own (the zoo MLP:
    0.13 against 0.045 ms), and ``auto`` kept the wrong engine. A block of about 10 ms, its
    first call left out, is what the engine costs when it is the only one running."""
    if not fns:
        return {}
    with torch.no_grad():
        once = {}
        for name, fn in fns.items():  # warm-up, and a first estimate
            fn()
            t0 = time.perf_counter()
            fn()
            _sync()
            once[name] = time.perf_counter() - t0
        # a call of 10 ms or more is its own block: waking a pool is noise next to it
        block = {n: 1 if t >= BLOCK_S else int(min(50, max(3, BLOCK_S / max(t, 1e-6)))) for n, t in once.items()}  # fmt: skip
        per_round = sum(once[n] * block[n] for n in fns)
        rounds = int(min(51, max(3, seconds / max(per_round, 1e-6))))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                if block[name] > 1:
                    fn()  # wakes this engine's threads; not counted
                    _sync()
                for _ in range(max(1, block[name] - 1)):
                    t0 = time.perf_counter()
                    fn()
                    _sync()
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
