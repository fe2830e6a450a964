"""``graphopt``: compile a model and print the per-pass report.

graphopt compile resnet --pipeline -O1
graphopt compile path/to/file.py:factory --pipeline "cleanup,fold-bn" --save out.graphopt
graphopt compile bert --pipeline "-O2,int8" --calib batches.pt
graphopt debug mlp --pipeline -O1 --print-changed --compare-nodes
graphopt report resnet --pipeline -O1 -o report.html
graphopt demo
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.pipeline.report import PassRecord, Report
from graphopt.tools import bench, debug, report

console = Console(width=None if sys.stdout.isatty() else 110)


def load_model(spec: str, batch: int | None) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A zoo name, ``path/to/file.py:factory`` where ``factory()`` returns (model, inputs), or
    ``path/to/model.onnx`` (the imported module, with inputs synthesized from its input types)."""
    kwargs = {} if batch is None else {"batch": batch}
    if spec.endswith(".onnx"):
        module = graphopt.load_onnx(spec)
        return module, module.example_inputs(batch=batch)
    if ":" not in spec:
        return zoo.get(spec, **kwargs)
    path, _, name = spec.rpartition(":")
    if not Path(path).is_file():
        raise GraphoptError(
            f"model file {path} not found (MODEL is a zoo name or path/to/file.py:factory)"
        )
    factory = getattr(debug.import_file(path, spec), name, None)
    if not callable(factory):
        raise GraphoptError(
            f"{path} has no callable {name!r}; define {name}() returning (model, example_inputs)"
        )
    result = factory(**kwargs)
    if not (
        isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
    ):
        raise GraphoptError(
            f"{spec}: {name}() must return (model, example_inputs), got {type(result).__name__}"
        )
    model, inputs = result
    return model, inputs if isinstance(inputs, tuple) else (inputs,)


def report_table(title: str, report: Report) -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in [("pass", "left"), ("time", "right"), ("nodes", "right"),
                            ("rewrites", "right"), ("error vs f64", "right"), ("status", "left")]:  # fmt: skip
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    base = "-" if report.baseline_error is None else f"{report.baseline_error:.2e}"
    table.add_row(
        "captured",
        "",
        "",
        "",
        base,
        "dynamic batch" if report.capture.get("dynamic_batch") else "static shapes",
    )
    for r in report.records:
        table.add_row(r.name, f"{r.time_s * 1e3:.1f} ms", r.nodes_text(),
                      str(r.rewrites), "-" if r.error is None else f"{r.error:.2e}", _status(r))  # fmt: skip
    return table


def _status(r: PassRecord) -> str:
    color = {"ok": "green", "rolled back": "red", "skipped": "yellow"}.get(r.status, "dim")
    return f"[{color}]{r.status}[/{color}]"


def compile_and_report(
    name: str,
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    args: argparse.Namespace,
    calibration: debug.Calibration | None = None,
) -> graphopt.CompiledModule:
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:  # fmt: skip
        task = progress.add_task(f"{name}: capturing", total=None)

        def on_event(kind: str, pass_name: str, record: PassRecord | None) -> None:
            if kind == "start":
                progress.update(task, description=f"{name}: {pass_name}")

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", graphopt.EquivalenceWarning)
            warnings.simplefilter("always", graphopt.StaticShapeWarning)
            compiled = graphopt.compile(
                model, inputs, pipeline=args.pipeline, verify=not args.no_verify,
                on_fail=args.on_fail, max_rewrites=args.max_rewrites, on_event=on_event,
                calibration_data=None if calibration is None else calibration(),
                backend=args.backend,
            )  # fmt: skip
    report = compiled.report
    console.print(
        report_table(
            f"{name}  pipeline {compiled.pipeline or '(none)'}  ({report.total_s:.2f} s)", report
        )
    )
    # why (not) fused; per-layer tables (int8, pruning); the backends tried
    # one line per reason, never wrapped mid-phrase (a terminal that is too narrow cuts it)
    for text in (report.rule_text(), report.layer_text(), report.backend_text()):
        if text:
            console.print(text, markup=False, highlight=False, soft_wrap=True)
    for w in caught:
        if issubclass(
            w.category,
            (graphopt.EquivalenceWarning, graphopt.StaticShapeWarning, graphopt.TrainModeWarning),
        ):
            console.print(f"[yellow]warning:[/yellow] {w.message}")
    return compiled


def cmd_compile(args: argparse.Namespace) -> int:
    calibration = debug.load_calibration(args.calib)  # a bad file fails before the model loads
    model, inputs = load_model(args.model, args.batch)
    compiled = compile_and_report(args.model, model, inputs, args, calibration)
    _check_against_eager(model, compiled, inputs)
    if args.show_graph:
        console.print(graphopt.format_graph(compiled.gm), markup=False, highlight=False)
    if args.save:
        graphopt.save(compiled, args.save)
        console.print(f"saved to {args.save} (load with graphopt.load)")
    if args.onnx:
        graphopt.export_onnx(compiled, args.onnx)
        int8 = sum(str(n.target).startswith("graphopt.int8") for n in compiled.gm.graph.nodes)
        qdq = f"; its {int8} int8 layers as QuantizeLinear/DequantizeLinear" if int8 else ""
        console.print(f"exported to {args.onnx} (ONNX{qdq})")
    return 0


def _check_against_eager(
    model: torch.nn.Module, compiled: graphopt.CompiledModule, inputs: tuple[Any, ...]
) -> None:
    with torch.no_grad():
        ref = pytree.tree_leaves(model.eval()(*inputs))
        got = pytree.tree_leaves(compiled(*inputs))
    diffs = [
        float((a - b).abs().max())
        for a, b in zip(got, ref)
        if isinstance(a, torch.Tensor) and a.is_floating_point()
    ]
    console.print(f"max |compiled - eager| over outputs: {max(diffs, default=0.0):.2e}")


def cmd_demo(args: argparse.Namespace) -> int:
    console.print(
        f"[bold]graphopt demo[/bold]: a zoo CNN and a zoo transformer at {args.pipeline} on the "
        "CPU (fusions are kept only where they measure faster; the report says why not)"
    )
    for name in ("resnet", "bert"):
        model, inputs = zoo.get(name)
        compiled = compile_and_report(name, model, inputs, args)
        _check_against_eager(model, compiled, inputs)
    return 0


def _fix_pipeline_argv(argv: list[str]) -> list[str]:
    """Let ``--pipeline -O1`` work: argparse would read -O1 as an option."""
    out: list[str] = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--pipeline" and arg.startswith("-"):
            out[-1] = f"--pipeline={arg}"
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt", description="graph optimizer for PyTorch models"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--pipeline", default="-O1", help="-O0..-O3 or passes, e.g. 'cleanup,fold-bn{eps=1e-5}'"
        )
        p.add_argument("--on-fail", choices=("rollback", "raise"), default="rollback")
        p.add_argument(
            "--no-verify", action="store_true", help="skip the equivalence check after each pass"
        )
        p.add_argument(
            "--max-rewrites", type=int, default=None, help="stop after N rewrites (bisection)"
        )

    p = sub.add_parser("compile", help="compile a model and print the per-pass report")
    p.add_argument(
        "model",
        help=f"zoo name ({', '.join(zoo.ZOO)}), path/to/file.py:factory (factory() returns "
        "(model, example_inputs)) or path/to/model.onnx (inputs synthesized from its types)",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    p.add_argument(
        "--save", default=None, help="write the compiled model here (graphopt.load reads it)"
    )
    p.add_argument("--onnx", default=None, help="also export the compiled model as ONNX here")
    p.add_argument("--show-graph", action="store_true", help="print the optimized graph")
    p.add_argument("--calib", metavar="FILE", default=None, help=debug.CALIB_HELP)
    p.add_argument(
        "--backend",
        default="aten",
        help="engine the optimized graph runs on: aten (default: the graph itself), inductor "
        "(torch.compile), onnxruntime, or auto (verify every available one, keep the fastest)",
    )
    common(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "bench", help="benchmark graphopt against eager, torch.compile and ONNX Runtime"
    )
    bench.add_arguments(p)
    p.set_defaults(func=lambda a: bench.run(a, console))

    bisect_line = (
        "graphopt debug bisect MODEL --pipeline ... [--repro DIR]: find the first pass that "
        "breaks its contract, the rewrite inside it and the first diverging node (see "
        "'graphopt debug bisect --help')"
    )
    p = sub.add_parser(
        "debug",
        help="print IR, diffs, statistics, timing and per-node error, pass by pass "
        "('graphopt debug bisect MODEL' finds the breaking pass, rewrite and node)",
        description="Run a pipeline pass by pass and print what each did. Sub-action: "
        + bisect_line,
        epilog=bisect_line,
    )
    debug.add_arguments(p)
    p.set_defaults(func=lambda a: debug.run(a, load_model))

    p = sub.add_parser("report", help="one self-contained HTML page: timeline, graphs, near misses")
    report.add_arguments(p)
    p.set_defaults(func=lambda a: report.run(a, load_model))

    p = sub.add_parser("demo", help="compile a zoo CNN and transformer and print their reports")
    common(p)
    p.set_defaults(func=cmd_demo, pipeline="-O2", backend="aten")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = _fix_pipeline_argv(list(sys.argv[1:] if argv is None else argv))
    if argv[:2] == ["debug", "bisect"]:  # a sub-action of debug, with options of its own
        from graphopt.tools import bisect

        args = bisect.build_parser().parse_args(argv[2:])
        args.func = lambda a: bisect.run(a, load_model)
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except GraphoptError as exc:
        message = escape(f"{type(exc).__name__}: {exc}")  # "[batch, ...]" is no markup
        console.print(f"[red]error:[/red] {message}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
