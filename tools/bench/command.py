"""``graphopt bench``: its options, their parsing, and the run that measures and writes everything.

The run writes results.json, results.md and the plots into ``--out``, and with ``--docs`` the
documentation page; it prints the main table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.tools.bench import kernels, page, plots
from graphopt.tools.bench.environment import environment
from graphopt.tools.bench.measure import bench_model
from graphopt.tools.bench.modes import DEFAULT_MODES, GPU_EXTRA_MODES, MODES
from graphopt.tools.bench.report import BenchReport
from graphopt.tools.bench.scaling import batch_scaling, compile_scaling, growth_exponent
from graphopt.tools.bench.tables import markdown_table
from graphopt.tools.bench.timing import Settings

# -- options ---------------------------------------------------------------------------------------


def add_arguments(p: Any) -> None:
    """The options of ``graphopt bench`` on the argparse parser ``p``."""
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated; default the zoo ({','.join(zoo.ZOO)}) and "
        f"{','.join(zoo.EXTERNAL)} (reported unavailable when torchvision/transformers are missing)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated; default {','.join(DEFAULT_MODES)} (+GPU modes on cuda)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=8, help="batch size of the main table")
    p.add_argument(
        "--out", default="bench-out", help="folder for results.json, results.md and plots"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads, the same for every mode (default 1: on small shared machines the "
        "thread pools of different runtimes disturb each other's timings)",
    )
    p.add_argument(
        "--min-time", type=float, default=0.5, help="seconds of timed calls per mode (CPU)"
    )
    p.add_argument("--min-reps", type=int, default=10, help="timed calls per mode at least (CPU)")
    p.add_argument("--rounds", type=int, default=5, help="CPU: modes take turns this many times")
    p.add_argument(
        "--scaling-batches",
        default="1,4,16,64,256",
        help="batch sizes for the latency-vs-batch plot ('' to skip)",
    )
    p.add_argument(
        "--scaling-models", default="resnet,bert", help="models for the latency-vs-batch plot"
    )
    p.add_argument(
        "--scaling-modes",
        default="eager,torch.compile,graphopt-O1,onnxruntime",
        help="modes for the latency-vs-batch plot",
    )
    p.add_argument(
        "--depths",
        default="2,4,8,16,32,48",
        help="gpt depths for the compile-time plot ('' to skip)",
    )
    p.add_argument(
        "--docs", default=None, help="also write this markdown page (e.g. docs/benchmarks.md)"
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "yes", "no"),
        default="auto",
        help="kernel microbenchmarks (copy bandwidth, norms, GEMM epilogue, attention); "
        "auto: on cuda only",
    )


def parse_list(text: str | None, default: Sequence[str]) -> list[str]:
    """Comma-separated names; ``default`` when ``text`` is missing or blank."""
    if text is None or text.strip() == "":
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_ints(text: str) -> list[int]:
    """Comma-separated positive integers, or ``GraphoptError`` saying what was expected."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GraphoptError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GraphoptError(f"expected positive integers, got {text!r}")
    return values


def resolve_modes(text: str | None, device: str) -> list[str]:
    """The modes named in ``text`` (default: the device's defaults), eager always among them:
    every speedup and error is relative to it."""
    default = DEFAULT_MODES + (GPU_EXTRA_MODES if device == "cuda" else [])
    modes = parse_list(text, default)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise GraphoptError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    if "eager" not in modes:
        modes.insert(0, "eager")
    return modes


def resolve_models(text: str | None) -> list[str]:
    """The zoo models named in ``text`` (default: every zoo model, ``zoo.MODELS``)."""
    models = parse_list(text, list(zoo.MODELS))
    unknown = [m for m in models if m not in zoo.MODELS]
    if unknown:
        raise GraphoptError(
            f"unknown model(s) {', '.join(unknown)}; models: {', '.join(zoo.MODELS)}"
        )
    return models


@dataclass
class Plan:
    """What a run measures, resolved (and so checked) from the options before anything runs."""

    models: list[str]
    modes: list[str]
    batch: int
    scaling_batches: list[int]
    scaling_models: list[str]
    scaling_modes: list[str]
    depths: list[int]

    @classmethod
    def from_args(cls, args: Any) -> Plan:
        batches = parse_ints(args.scaling_batches) if args.scaling_batches else []
        return cls(
            models=resolve_models(args.models),
            modes=resolve_modes(args.modes, args.device),
            batch=args.batch,
            scaling_batches=batches,
            scaling_models=resolve_models(args.scaling_models) if batches else [],
            scaling_modes=resolve_modes(args.scaling_modes, args.device) if batches else [],
            depths=parse_ints(args.depths) if args.depths else [],
        )

    def steps(self) -> int:
        """Progress steps: one per (model, mode), per scaled (model, batch), per depth."""
        return (
            len(self.models) * len(self.modes)
            + len(self.scaling_batches) * len(self.scaling_models)
            + len(self.depths)
        )


# -- the run ---------------------------------------------------------------------------------------


def run(args: Any, console: Any) -> int:
    """``graphopt bench``: measure, write results.json, results.md, the plots (and the docs page),
    print the main table."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise GraphoptError(
            "--device cuda but torch.cuda.is_available() is False; use --device cpu"
        )
    settings = Settings(
        device=args.device,
        threads=args.threads,
        min_reps=args.min_reps,
        min_time_s=args.min_time,
        rounds=args.rounds,
    )
    torch.set_num_threads(settings.threads)
    plan = Plan.from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = measure(plan, settings, console)
    report.kernels, report.kernels_note = kernels.kernel_results(args.kernels, settings.device)
    written = write(report, out)
    if args.docs:
        page.write_docs(Path(args.docs), report, written, args)
    console.print(markdown_table(report.results), markup=False, highlight=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(written)} plot(s)")
    return 0


def measure(plan: Plan, settings: Settings, console: Any) -> BenchReport:
    """Every measurement of ``plan`` but the kernels, with a progress bar on ``console``."""
    report = BenchReport(environment(settings), [])
    with _progress(console, plan.steps()) as step:
        for name in plan.models:
            report.results += bench_model(
                name, plan.modes, plan.batch, settings, lambda m, n=name: step(f"{n}: {m}")
            )
        if plan.scaling_batches:
            report.batch_scaling = batch_scaling(
                plan.scaling_models, plan.scaling_modes, plan.scaling_batches, settings, step
            )
        if plan.depths:
            report.compile_scaling = compile_scaling(plan.depths, settings, step)
            report.compile_exponent = growth_exponent(
                [r["nodes"] for r in report.compile_scaling],
                [r["compile_s"] for r in report.compile_scaling],
            )
    return report


def write(report: BenchReport, out: Path) -> list[Path]:
    """The plots, results.json and results.md into ``out``; returns the plots' paths."""
    written = [plots.speedup_plot(report.results, out / "speedup.png")]
    if report.batch_scaling:
        written.append(plots.batch_plot(report.batch_scaling, out / "latency_vs_batch.png"))
    if report.compile_scaling:
        written.append(plots.compile_plot(report.compile_scaling, out / "compile_vs_depth.png"))
    (out / "results.json").write_text(report.to_json())
    (out / "results.md").write_text(report.to_markdown([p.name for p in written]))
    return written


@contextlib.contextmanager
def _progress(console: Any, total: int) -> Iterator[Callable[[str], None]]:
    """A transient progress bar of ``total`` steps; yields ``step(text)``, which shows ``text``
    and advances one step."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("bench", total=total)
        yield lambda text: bar.update(task, description=text, advance=1)
