"""``graphopt bench``: its options, their parsing, and the run that measures and writes everything.

Two sweeps: the default, quick one (the zoo's small models, the modes a user compares first,
about 3 minutes on 2 cores) and ``--full``, the sweep docs/benchmarks.md records (every model,
every pipeline, the full-size models, latency against batch, compile time against depth). An
option given on the command line wins over either sweep's default.

The run writes results.json, results.md and the plots into ``--out``, and with ``--docs`` the
documentation page; it prints the main table, issue 15's targets and the backends graphopt tried.
The zoo's own models run at ``--batch``; the full-size ones (``zoo.EXTERNAL``: BERT-base, GPT-2,
ViT-base, ...) at the zoo's batch and sequence length, with fewer modes (``EXTERNAL_MODES``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config as inductor_config

from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.tools.bench import kernels, page, plots
from graphopt.tools.bench.environment import environment
from graphopt.tools.bench.measure import bench_model
from graphopt.tools.bench.modes import (
    DEFAULT_MODES,
    EXTERNAL_MODES,
    GPU_EXTRA_MODES,
    MODES,
    QUICK_MODES,
)
from graphopt.tools.bench.progress import progress
from graphopt.tools.bench.report import BenchReport
from graphopt.tools.bench.scaling import batch_scaling, compile_scaling, growth_exponent
from graphopt.tools.bench.tables import backend_table, markdown_table
from graphopt.tools.bench.targets import targets_table
from graphopt.tools.bench.timing import Settings

# -- options ---------------------------------------------------------------------------------------


# the defaults of the options that differ between the two sweeps (None: every model / the
# device's default modes)
QUICK = {
    "models": ",".join(zoo.ZOO),
    "modes": ",".join(QUICK_MODES),
    "scaling_batches": "",
    "depths": "",
    "min_time": 0.2,
    "rounds": 3,
}
FULL = {
    "models": None,
    "modes": None,
    "scaling_batches": "1,4,16,64,256",
    "depths": "2,4,8,16,32,48",
    "min_time": 0.5,
    "rounds": 5,
}


def add_arguments(p: Any) -> None:
    """The options of ``graphopt bench`` on the argparse parser ``p``."""
    p.add_argument(
        "--full",
        action="store_true",
        help="the full sweep that docs/benchmarks.md records (every model, the full-size ones "
        "included; every pipeline; latency against batch; compile time against depth): about "
        "an hour on 2 cores. Default: a quick sweep of the zoo's small models in the modes "
        f"{','.join(QUICK_MODES)}, about 3 minutes",
    )
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated; default the zoo ({','.join(zoo.ZOO)}); with --full also "
        f"{','.join(zoo.EXTERNAL)} (reported unavailable when torchvision/transformers are missing)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated; default {','.join(QUICK_MODES)}; with --full "
        f"{','.join(DEFAULT_MODES)} (+GPU modes on cuda)",
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
        "--min-time",
        type=float,
        default=None,
        help="seconds of timed calls per mode (CPU); default 0.2, with --full 0.5",
    )
    p.add_argument("--min-reps", type=int, default=10, help="timed calls per mode at least (CPU)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="CPU: modes take turns this many times; default 3, with --full 5",
    )
    p.add_argument(
        "--scaling-batches",
        default=None,
        help="batch sizes for the latency-vs-batch plot ('' to skip); default none, with --full "
        f"{FULL['scaling_batches']}",
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
        default=None,
        help="gpt depths for the compile-time plot ('' to skip); default none, with --full "
        f"{FULL['depths']}",
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


def sweep_defaults(args: Any) -> Any:
    """``args`` with the options left unset filled from the sweep it asks for (``--full`` or the
    quick one); returns ``args``."""
    for key, value in (FULL if getattr(args, "full", False) else QUICK).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


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
        sweep_defaults(args)
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

    def model_steps(self, model: str, settings: Settings) -> int:
        """Progress steps of ``model`` in the main table: one per mode, one per timing round."""
        return len(self.modes_for(model)) + settings.timing_steps()

    def steps(self, settings: Settings) -> int:
        """Progress steps: the main table's, one per scaled (model, batch), one per depth."""
        return (
            sum(self.model_steps(m, settings) for m in self.models)
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
    sweep_defaults(args)
    settings = Settings(
        device=args.device,
        threads=args.threads,
        min_reps=args.min_reps,
        min_time_s=args.min_time,
        rounds=args.rounds,
    )
    torch.set_num_threads(settings.threads)
    # compile times are cold: Inductor's caches (on disk from earlier runs, and in memory from
    # an earlier mode of this run) would serve torch.compile and graphopt's Inductor backend
    # unequally; every compile of the run generates its code
    # (patched for the run only: a caller in the same process keeps its caches)
    plan = Plan.from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # results.json and results.md are rewritten after every model: a run stopped from outside
    # (a time bound, a crash) leaves what it measured so far
    with inductor_config.patch(force_disable_caches=True):
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
    with progress(console, plan.steps(settings)) as step:
        done = 0
        for name in plan.models:
            report.results += bench_model(
                name,
                plan.modes_for(name),
                plan.batch_for(name),
                settings,
                lambda m, n=name: step(f"{n}: {m}"),
                deadline,
            )
            done += plan.model_steps(name, settings)
            step.finished(done)  # an unavailable model ran none of its steps
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
    env = report.env
    written = [plots.speedup_plot(report.results, out / "speedup.png", env)]
    if report.batch_scaling:
        written.append(plots.batch_plot(report.batch_scaling, out / "latency_vs_batch.png", env))
    if report.compile_scaling:
        written.append(
            plots.compile_plot(report.compile_scaling, out / "compile_vs_depth.png", env)
        )
    write_results(report, out, [p.name for p in written])
    return written


def write_results(report: BenchReport, out: Path, plot_names: Sequence[str] = ()) -> None:
    """results.json and results.md (linking ``plot_names``) into ``out``."""
    (out / "results.json").write_text(report.to_json())
    (out / "results.md").write_text(report.to_markdown(plot_names))
