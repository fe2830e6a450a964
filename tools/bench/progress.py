"""What ``graphopt bench`` shows while it runs: the step it is on (model, mode, timing round),
how many steps are done, the time spent and an estimate of what is left.

On a terminal this is a live bar (rich); elsewhere (a log, CI, a pipe) one line per step, so a run
is never silent until its end. The estimate is the mean time of a finished step times the steps
left: steps differ (a compile takes seconds, a timing round less), so it is rough, and says so.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn


def clock(seconds: float) -> str:
    """``seconds`` as m:ss (h:mm:ss past an hour)."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Steps:
    """The run's steps: ``steps(text)`` starts the next one (finishing the one before);
    ``steps.finished(n)`` says that ``n`` steps are done whether or not they ran (a model that
    is unavailable skips its modes), so the count and the estimate stay right."""

    def __init__(
        self, total: int, show: Callable[[Steps, str], None], now: Callable[[], float]
    ) -> None:
        self.total, self.done, self._show, self._now = max(1, total), 0, show, now
        self.start = now()
        self._running = False

    def __call__(self, text: str) -> None:
        if self._running:
            self.done = min(self.total, self.done + 1)
        self._running = True
        self._show(self, text)

    def finished(self, count: int) -> None:
        if count > self.done:
            self.done, self._running = min(self.total, count), False

    def estimate(self) -> str:
        spent = self._now() - self.start
        if self.done == 0:
            return f"{clock(spent)} spent"
        left = spent / self.done * (self.total - self.done)
        return f"{clock(spent)} spent, about {clock(left)} left"


@contextlib.contextmanager
def progress(
    console: Any, total: int, now: Callable[[], float] = time.perf_counter
) -> Iterator[Steps]:
    """The ``Steps`` of a run of ``total`` steps, shown on ``console``: a live bar on a terminal,
    one printed line per step otherwise."""
    if getattr(console, "is_terminal", False):
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("{task.fields[estimate]}"),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("bench", total=max(1, total), estimate="")

            def live(steps: Steps, text: str) -> None:
                bar.update(task, description=text, completed=steps.done, estimate=steps.estimate())

            yield Steps(total, live, now)
        return

    def plain(steps: Steps, text: str) -> None:
        width = len(str(steps.total))
        console.print(
            f"[{steps.done + 1:>{width}}/{steps.total}] {text}  ({steps.estimate()})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )

    yield Steps(total, plain, now)
