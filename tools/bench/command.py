"""``graphopt bench``: its options, their parsing, and the run that measures and writes everything.

The run writes results.json, results.md and the plots into ``--out``, and with ``--docs`` the
documentation page; it prints the main table, issue 15's targets and the backends graphopt tried.
The zoo's own models run at ``--batch``; the full-size ones (``zoo.EXTERNAL``: BERT-base, GPT-2,
ViT-base, ...) at the zoo's batch and sequence length, with fewer modes (``EXTERNAL_MODES``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.tools.bench import kernels, page, plots
from graphopt.tools.bench.environment import environment
from graphopt.tools.bench.measure import bench_model
from graphopt.tools.bench.modes import DEFAULT_MODES, EXTERNAL_MODES, GPU_EXTRA_MODES, MODES
from graphopt.tools.bench.report import BenchReport
from graphopt.tools.bench.scaling import batch_scaling, compile_scaling, growth_exponent
from graphopt.tools.bench.tables import backend_table, markdown_table
from graphopt.tools.bench.targets import targets_table
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
    p.add_argument(
        "--external-modes",
        default=None,
        help="modes of the full-size models (zoo.EXTERNAL); default those of --modes when it is "
        f"given, else {','.join(EXTERNAL_MODES)}",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument(
        "--batch", type=int, default=8, help="batch size of the zoo's own models in the main table"
    )
    p.add_argument(
        "--external-batch",
        type=int,
        default=None,
        help="batch size of the full-size models (default the zoo's: 4; BERT-base and GPT-2 at "
        "128 tokens, ViT-base at 224x224)",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds after which no new mode starts: the rest is reported as skipped, and "
        "every table is still written (default: none)",
    )
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
    external_modes: list[str] = field(default_factory=list)
    external_batch: int | None = None  # None: the zoo's own
    time_limit_s: float | None = None

    @classmethod
    def from_args(cls, args: Any) -> Plan:
        batches = parse_ints(args.scaling_batches) if args.scaling_batches else []
        external = args.external_modes or args.modes or ",".join(EXTERNAL_MODES)
        return cls(
            models=resolve_models(args.models),
            modes=resolve_modes(args.modes, args.device),
            batch=args.batch,
            scaling_batches=batches,
            scaling_models=resolve_models(args.scaling_models) if batches else [],
            scaling_modes=resolve_modes(args.scaling_modes, args.device) if batches else [],
            depths=parse_ints(args.depths) if args.depths else [],
            external_modes=resolve_modes(external, args.device),
            external_batch=args.external_batch,
            time_limit_s=args.time_limit,
        )

    def modes_for(self, model: str) -> list[str]:
        return self.external_modes if model in zoo.EXTERNAL else self.modes

    def batch_for(self, model: str) -> int | None:
        """``model``'s batch size in the main table (None: the zoo's own)."""
        return self.external_batch if model in zoo.EXTERNAL else self.batch

    def steps(self) -> int:
        """Progress steps: one per (model, mode), per scaled (model, batch), per depth."""
        return (
            sum(len(self.modes_for(m)) for m in self.models)
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
    # results.json and results.md are rewritten after every model: a run stopped from outside
    # (a time bound, a crash) leaves what it measured so far
    report = measure(plan, settings, console, lambda partial: write_results(partial, out))
    report.kernels, report.kernels_note = kernels.kernel_results(args.kernels, settings.device)
    written = write(report, out)
    if args.docs:
        page.write_docs(Path(args.docs), report, written, args)
    for table in _summary(report):
        # soft_wrap: a table line stays one line at any terminal width (and in logs)
        console.print(table, markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(written)} plot(s)")
    return 0


def _summary(report: BenchReport) -> list[str]:
    """What the run prints: the main table (compile time included), the targets, the backends."""
    tables = [markdown_table(report.results)]
    targets = targets_table(report.results, report.env.get("device_kind", "cpu"))
    if targets:
        tables.append("Targets (issue 15)\n" + targets)
    if any(r.backends for r in report.results):
        tables.append("Backends tried by graphopt\n" + backend_table(report.results))
    return tables


def measure(
    plan: Plan,
    settings: Settings,
    console: Any,
    on_model: Callable[[BenchReport], None] | None = None,
) -> BenchReport:
    """Every measurement of ``plan`` but the kernels, with a progress bar on ``console``; no
    mode starts once ``plan.time_limit_s`` has passed. ``on_model`` sees the report so far after
    each model of the main table."""
    report = BenchReport(environment(settings), [])
    limit = plan.time_limit_s
    deadline = None if limit is None else time.perf_counter() + limit
    with _progress(console, plan.steps()) as step:
        for name in plan.models:
            report.results += bench_model(
                name,
                plan.modes_for(name),
                plan.batch_for(name),
                settings,
                lambda m, n=name: step(f"{n}: {m}"),
                deadline,
            )
            if on_model:
                on_model(report)
        if plan.scaling_batches:
            report.batch_scaling = batch_scaling(
                plan.scaling_models,
                plan.scaling_modes,
                plan.scaling_batches,
                settings,
                step,
                deadline,
            )
        if plan.depths:
            report.compile_scaling = compile_scaling(plan.depths, settings, step, deadline)
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
    write_results(report, out, [p.name for p in written])
    return written


def write_results(report: BenchReport, out: Path, plot_names: Sequence[str] = ()) -> None:
    """results.json and results.md (linking ``plot_names``) into ``out``."""
    (out / "results.json").write_text(report.to_json())
    (out / "results.md").write_text(report.to_markdown(plot_names))


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
