"""``graphopt debug``: look inside one compile, pass by pass and node by node.

graphopt debug mlp --pipeline -O1 --print-changed --timing
graphopt debug bert --pipeline -O2 --opt-bisect-limit 3 --compare-nodes
graphopt debug mlp --pipeline "-O2,int8" --calib batches.pt --stats

Every run writes its own folder (``--out``, default ``debug-out/<model>-<timestamp>``) holding
``environment.json`` and ``report.txt``, the text it printed, so a bug report carries both.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from rich.console import Console
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import graphopt
from graphopt.api import flat_batches, resolve_target
from graphopt.errors import GraphoptError
from graphopt.frontends.capture import capture
from graphopt.frontends.exported import as_args
from graphopt.ir.graph import original_name, short_target
from graphopt.ops.fused import program_of
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.parse import parse_pipeline
from graphopt.pipeline.passes import FixedPoint, PipelineItem
from graphopt.pipeline.report import PassRecord, Report
from graphopt.verification import metrics
from graphopt.verification.interpreter import Runner, reference_run

LoadModel = Callable[[str, int | None], tuple[torch.nn.Module, tuple[Any, ...]]]
Calibration = Callable[[], Iterable[Any]]  # each call: the calibration batches, read afresh
WORST_NODES = 20
_METRICS = ("max_abs", "rel_l2", "cosine", "sqnr")


CALIB_HELP = (
    "calibration data for int8: a .pt file holding a list of batches (each a tensor or a tuple "
    "of the model's positional inputs), or path/to/file.py:factory where factory() returns an "
    "iterable of batches"
)


def model_arguments(p: argparse.ArgumentParser, *, run_options: bool = True) -> None:
    """MODEL, --batch, --pipeline and --calib (and --on-fail, --max-rewrites): what every
    debugging command (debug, debug bisect, report) takes the same way."""
    p.add_argument("model", help="zoo name, path/to/file.py:factory or model.onnx")
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    p.add_argument("--pipeline", default="-O1", help="-O0..-O3 or passes, e.g. 'cleanup,fold-bn'")
    p.add_argument("--calib", metavar="FILE", default=None, help=CALIB_HELP)
    if run_options:
        p.add_argument("--on-fail", choices=("rollback", "raise"), default="rollback")
        p.add_argument("--max-rewrites", type=int, default=None, help="stop after N rewrites")


def add_arguments(p: argparse.ArgumentParser) -> None:
    model_arguments(p)
    p.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    p.add_argument("--print-after", metavar="PASS", default=None, help="IR after the named pass")
    p.add_argument("--print-changed", action="store_true", help="diff the IR of changing passes")
    p.add_argument("--stats", action="store_true", help="per-pass statistics and rule near misses")
    p.add_argument("--timing", action="store_true", help="per-pass time and verify time")
    p.add_argument("--verify", action="store_true", help="per-pass equivalence table")
    p.add_argument("--compare-nodes", action="store_true", help="per-node error against float64")
    p.add_argument(
        "--opt-bisect-limit",
        type=int,
        default=None,
        metavar="N",
        help="run only the first N passes",
    )
    p.add_argument("--out", default=None, help="output folder (default debug-out/<model>-<time>)")


class Printer:
    """Prints to the terminal and keeps the text for ``report.txt``."""

    def __init__(self) -> None:
        self.console = Console(highlight=False, soft_wrap=True)
        self.lines: list[str] = []

    def __call__(self, text: str = "") -> None:
        self.console.print(text, markup=False)
        self.lines.append(text)

    def section(self, text: str) -> None:
        self("")
        self(text)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def run(args: argparse.Namespace, load_model: LoadModel) -> int:
    out = Printer()
    items = parse_pipeline(args.pipeline)
    labels = pass_labels(items)
    if args.print_after is not None and not _matches_any(args.print_after, labels):
        out(
            f"error: --print-after={args.print_after}: no such pass in the pipeline; "
            f"its passes are: {', '.join(labels) or '(none)'}"
        )
        return 2
    if args.opt_bisect_limit is not None:
        for i, label in enumerate(labels, 1):
            verb = "running" if i <= args.opt_bisect_limit else "NOT running"
            out(f"BISECT: {verb} pass ({i}) {label}")
        items = bisect_items(items, args.opt_bisect_limit)

    calibration = load_calibration(args.calib)  # a bad file fails before the model loads
    model, inputs = load_model(args.model, args.batch)
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat_inputs = pytree.tree_leaves((call_args, {}))
    manager = PassManager(
        items,
        on_fail=args.on_fail,
        max_rewrites=args.max_rewrites,
        target=resolve_target("auto", model, call_args),
        keep_snapshots=True,
        calibration=None if calibration is None else flat_batches(calibration()),
    )
    manager.on_event = IRPrinter(manager, args, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphopt.EquivalenceWarning)
        optimized, report = manager.run(captured, flat_inputs)
    limit = "" if args.opt_bisect_limit is None else f" (first {args.opt_bisect_limit} passes)"
    out(f"{args.model}  pipeline {args.pipeline}{limit}")
    out(report.to_text())
    for w in caught:
        out(f"warning: {w.message}")
    if args.stats:
        out.section(stats_text(report))
    if args.timing:
        out.section(timing_text(report))
    if args.verify:
        out.section(verify_text(report))
    if args.compare_nodes:
        out.section(compare_nodes_text(captured, optimized, flat_inputs))
    folder = write_folder(args, out)
    out(f"debug output written to {folder}")
    (folder / "report.txt").write_text(out.text())
    return 0


# -- files the command line names: models' and calibration data's ----------------------------------


def import_file(path: str, spec: str) -> ModuleType:
    """The Python file ``path`` run as a module (``spec`` is how the command line named it)."""
    file = Path(path)
    if not file.is_file():
        raise GraphoptError(f"{spec}: file {path} not found")
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    # registered before it runs, as an import would: dataclasses (and pickling) look their
    # module up in sys.modules
    sys.modules[module_spec.name] = module
    module_spec.loader.exec_module(module)
    return module


def load_calibration(spec: str | None) -> Calibration | None:
    """``--calib FILE``: a function returning the calibration batches afresh at each call (a
    bisection compiles several times). ``FILE`` is a ``.pt`` file holding a list of batches
    (``torch.save([batch, ...], FILE)``), or ``path/to/file.py:factory`` where ``factory()``
    returns an iterable of batches (called once per compile, so a generator works); each batch
    is a tensor or a tuple of the model's positional inputs. What is wrong with a file is a
    ``GraphoptError`` that says how to fix it."""
    if spec is None:
        return None
    path, _, name = spec.rpartition(":")
    if path.endswith(".py") and name:
        return _calibration_factory(spec, path, name)
    if not spec.endswith(".pt"):
        raise GraphoptError(
            f"--calib {spec}: expected a .pt file holding a list of batches, or "
            "path/to/file.py:factory where factory() returns an iterable of batches"
        )
    batches = _load_batches(spec)
    return lambda: batches


def _load_batches(spec: str) -> list[Any]:
    """The list of batches a ``.pt`` file holds, checked."""
    how = f"save it with torch.save([batch, ...], {spec!r}), each batch a tensor or a tuple"
    if not Path(spec).is_file():
        raise GraphoptError(f"--calib {spec}: file not found; {how}")
    try:
        batches = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GraphoptError(f"--calib {spec}: cannot read it ({first}); {how}") from None
    if not isinstance(batches, (list, tuple)) or not batches:
        what = "an empty list" if isinstance(batches, (list, tuple)) else type(batches).__name__
        raise GraphoptError(f"--calib {spec} holds {what}, not a list of batches; {how}")
    return list(_checked_batches(spec, batches))


def _calibration_factory(spec: str, path: str, name: str) -> Calibration:
    factory = getattr(import_file(path, f"--calib {spec}"), name, None)
    if not callable(factory):
        raise GraphoptError(
            f"--calib {spec}: {path} has no callable {name!r}; define {name}() returning an "
            "iterable of batches (each a tensor or a tuple of the model's positional inputs)"
        )
    return lambda: _checked_batches(spec, factory())


def _checked_batches(spec: str, batches: Any) -> Iterator[Any]:
    """``batches``, each checked to be a tensor or a tuple (list) of inputs, as it is read."""
    if isinstance(batches, torch.Tensor) or not isinstance(batches, Iterable):
        raise GraphoptError(
            f"--calib {spec}: gave a {type(batches).__name__}, not an iterable of batches; "
            "give a list (or a generator) of batches, each a tensor or a tuple of inputs"
        )
    for index, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, tuple, list)):
            raise GraphoptError(
                f"--calib {spec}: batch {index} is a {type(batch).__name__}; each batch is a "
                "tensor or a tuple of the model's positional inputs"
            )
        yield batch


# -- pipeline: names and bisection ----------------------------------------------------------------


def pass_labels(items: Sequence[PipelineItem]) -> list[str]:
    """The flattened pipeline as the report names its records (``cleanup:dce`` inside a group)."""
    labels: list[str] = []
    for item in items:
        if isinstance(item, FixedPoint):
            labels += [f"{item.name}:{p.name}" for p in item.passes]
        else:
            labels.append(item.name)
    return labels


def _matches(wanted: str, label: str) -> bool:
    # "cleanup:dce" is matched by its full name, by "dce" and by the group name "cleanup"
    return wanted == label or wanted in label.split(":")


def _matches_any(wanted: str, labels: Sequence[str]) -> bool:
    return any(_matches(wanted, label) for label in labels)


def bisect_items(items: Sequence[PipelineItem], limit: int) -> list[PipelineItem]:
    """The first ``limit`` passes of the flattened pipeline; a group cut in two keeps its head."""
    kept: list[PipelineItem] = []
    left = max(limit, 0)
    for item in items:
        if left == 0:
            break
        if isinstance(item, FixedPoint):
            head = item.passes[:left]
            kept.append(dataclasses.replace(item, passes=head))
            left -= len(head)
        else:
            kept.append(item)
            left -= 1
    return kept


# -- IR after passes ------------------------------------------------------------------------------


class IRPrinter:
    """The pass manager's ``on_event`` hook: prints the IR or its diff after each pass run.

    The manager appends a snapshot right before the "end" event of every run that changed the
    graph, so the newest snapshot is always the graph as it stands after that run.
    """

    def __init__(self, manager: PassManager, args: argparse.Namespace, out: Printer) -> None:
        self.manager = manager
        self.args = args
        self.out = out
        self.seen = 1  # snapshot 0 is the captured graph

    def __call__(self, kind: str, name: str, record: PassRecord | None) -> None:
        if kind != "end":
            return
        snapshots = self.manager.report.snapshots  # the report being built
        previous, current = snapshots[self.seen - 1][1], snapshots[-1][1]
        changed = len(snapshots) > self.seen
        self.seen = len(snapshots)
        if self.args.print_after_all or (
            self.args.print_after is not None and _matches(self.args.print_after, name)
        ):
            self.out(f"*** IR after {name} ***")
            self.out(current)
        if self.args.print_changed and changed:
            diff = difflib.unified_diff(
                previous.splitlines(),
                current.splitlines(),
                f"before {name}",
                f"after {name}",
                lineterm="",
            )
            self.out(f"*** IR changed by {name} ***")
            self.out("\n".join(diff))


# -- report sections ------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], title: str, align: str) -> str:
    """A plain-text table; ``align`` has one letter per column, ``l`` or ``r``."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(headers))]

    def fmt(line: Sequence[str]) -> str:
        parts = [c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(line, widths, align)]
        return "  ".join(parts).rstrip()

    rule = "-" * len(fmt(headers))
    return "\n".join([title, fmt(headers), rule, *(fmt(r) for r in cells[1:])])


def _num(value: Any, metric: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and metric == "cosine":
        return f"{value:.7f}"  # 1 - cosine is what matters: keep the digits that show it
    if isinstance(value, float):
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def stats_text(report: Report) -> str:
    lines = ["pass statistics"]
    for r in report.records:
        stats = {k: (f"{len(v)} rows" if isinstance(v, list) else v) for k, v in r.stats.items()}
        rules = {k: log for k, log in r.rules.items() if log.applied or log.missed}
        if not stats and not rules:
            continue
        shown = ", ".join(f"{k}={_num(v)}" for k, v in stats.items())
        lines.append(
            f"{r.name}: runs {r.runs}, rewrites {r.rewrites}" + (f", {shown}" if shown else "")
        )
        for rule, log in rules.items():
            lines.append(f"    rule {rule}: applied {log.applied}, near misses {log.missed}")
            reasons: dict[str, int] = {}
            for _, why in log.misses:
                reasons[why] = reasons.get(why, 0) + 1
            for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
                lines.append(f"        {count} x {why}")
    if len(lines) == 1:
        lines.append("(no pass reported statistics)")
    return "\n".join(lines)


def timing_text(report: Report) -> str:
    total = sum(r.time_s + r.verify_s for r in report.records) or 1.0
    records = sorted(
        enumerate(report.records, 1), key=lambda ir: ir[1].time_s + ir[1].verify_s, reverse=True
    )
    rows = [
        [
            str(i),
            r.name,
            str(r.runs),
            f"{r.time_s * 1e3:.2f}",
            f"{r.verify_s * 1e3:.2f}",
            f"{(r.time_s + r.verify_s) * 1e3:.2f}",
            f"{100 * (r.time_s + r.verify_s) / total:.1f}%",
        ]
        for i, r in records
    ]
    head = ["#", "pass", "runs", "pass ms", "verify ms", "total ms", "share"]
    title = f"timing (sorted by total; whole run {report.total_s:.3f} s)"
    return table(head, rows, title, "lrrrrrr")


def verify_text(report: Report) -> str:
    rows = [["captured", "-", _num(report.baseline_error), "", "reference"]]
    for r in report.records:
        spent = ", ".join(f"{k}={_num(v)}" for k, v in sorted(r.spent.items())) or "-"
        rows.append([r.name, r.contract, _num(r.error), spent, r.status])
    head = ["pass", "contract", "error vs f64", "allowed / metric", "status"]
    title = "equivalence per pass (float64 reference of the captured graph)"
    return table(head, rows, title, "lllll")


# -- per-node comparison --------------------------------------------------------------------------


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def node_metrics(value: Any, ref: Any) -> dict[str, float] | None:
    if not (_is_float(value) and isinstance(ref, torch.Tensor) and value.shape == ref.shape):
        return None
    return {name: getattr(metrics, name)(value, ref) for name in _METRICS}


def local_inputs(node: Node, values: dict[str, Any], ref_values: dict[str, Any]) -> dict[str, Any]:
    """Inputs of ``node`` as the float64 reference says they should be, rounded to the dtype the
    node reads (as ``Verifier.local_inputs`` does for rounding contracts)."""
    env: dict[str, Any] = {}
    for inp in node.all_input_nodes:
        value = values[inp.name]
        ref = ref_values.get(original_name(inp) or "")
        if isinstance(value, torch.Tensor) and isinstance(ref, torch.Tensor):
            if ref.shape == value.shape:
                value = ref.to(value.device, value.dtype)
        env[inp.name] = value
    return env


def compare_nodes_text(
    captured: GraphModule, optimized: GraphModule, flat_inputs: Sequence[Any]
) -> str:
    _, ref_values = reference_run(captured, flat_inputs)
    runner = Runner(optimized, record=True, expand=True)
    runner.run_graph(flat_inputs)
    values = runner.values
    local_runner = Runner(optimized)
    propagated: list[tuple[str, str, str, dict[str, float]]] = []
    local: list[tuple[str, str, str, dict[str, float]]] = []
    compared = 0
    for node in optimized.graph.nodes:
        origin = original_name(node)
        if node.op != "call_function" or origin not in ref_values:
            continue
        numbers = node_metrics(values.get(node.name), ref_values[origin])
        if numbers is None:
            continue
        compared += 1
        propagated.append((node.name, short_target(node), origin, numbers))
        own = local_runner.run_one(node, local_inputs(node, values, ref_values))
        local_numbers = node_metrics(own, ref_values[origin])
        if local_numbers is not None:
            local.append((node.name, short_target(node), origin, local_numbers))
    inner, n_inner = fused_inner_rows(captured, optimized, values, ref_values)
    n_ops = sum(1 for n in optimized.graph.nodes if n.op == "call_function")
    head = [
        f"per-node error against float64 ({compared} of {n_ops} nodes have a counterpart in the "
        f"captured graph; worst {WORST_NODES} by relative L2)"
    ]
    return "\n\n".join(
        head
        + [
            _node_table("propagated (the optimized graph run on the inputs)", propagated),
            _node_table("local (each node fed float64 reference inputs)", local),
        ]
        + (
            [
                _node_table(
                    f"inside fused ops, propagated ({len(inner)} of {n_inner} inner ops have a "
                    "counterpart)",
                    inner,
                )
            ]
            if n_inner
            else []
        )
    )


def fused_inner_rows(
    captured: GraphModule,
    optimized: GraphModule,
    values: dict[str, Any],
    ref_values: dict[str, Any],
) -> tuple[list[tuple[str, str, str, dict[str, float]]], int]:
    """Rows for the inner nodes of fused ops (``fused/inner``). An inner op is matched, in order,
    with the first unmatched original node of its group (``meta["graphopt"]["from"]``) that has
    the same op and shape. Also returns how many inner ops there are."""
    by_name = {n.name: n for n in captured.graph.nodes}
    rows = []
    n_inner = 0
    for node in optimized.graph.nodes:
        inner = [k for k in values if k.startswith(f"{node.name}/")]
        if not inner:
            continue
        origins = list((node.meta.get("graphopt") or {}).get("from", []))
        graph = program_of(node.args[1]).to_graph()
        inner_nodes = {n.name: n for n in graph.graph.nodes}
        for key in inner:
            inner_node = inner_nodes.get(key.split("/", 1)[1])
            if inner_node is None or inner_node.op != "call_function":
                continue
            n_inner += 1
            for origin in origins:
                ref = ref_values.get(origin)
                same_op = origin in by_name and by_name[origin].target == inner_node.target
                numbers = node_metrics(values[key], ref) if same_op else None
                if numbers is not None:
                    origins.remove(origin)
                    rows.append((key, short_target(inner_node), origin, numbers))
                    break
    return rows, n_inner


def _node_table(title: str, rows: list[tuple[str, str, str, dict[str, float]]]) -> str:
    def badness(row: tuple[str, str, str, dict[str, float]]) -> float:
        value = row[3]["rel_l2"]
        return math.inf if math.isnan(value) else value

    worst = sorted(rows, key=badness, reverse=True)[:WORST_NODES]
    cells = [
        [name, op, origin, *(_num(numbers[m], m) for m in _METRICS)]
        for name, op, origin, numbers in worst
    ]
    head = ["node", "op", "counterpart", "max abs", "rel L2", "cosine", "SQNR dB"]
    return table(head, cells, f"{title}: {len(rows)} nodes", "lllrrrr")


# -- the output folder ----------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "torch": torch.__version__,
        "triton": _version("triton"),
        "onnx": _version("onnx"),
        "graphopt": graphopt.__version__,
        "python": platform.python_version(),
        "gpu": gpu,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def write_folder(
    args: argparse.Namespace, out: Printer | None = None, root: str = "debug-out"
) -> Path:
    """``args.out``, or a new ``<root>/<model>-<time>``, holding ``environment.json``."""
    if args.out is not None:
        folder = Path(args.out)
    else:
        model = Path(args.model.rpartition(":")[0] or args.model).stem
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        folder = Path(root) / f"{model}-{stamp}"
        n = 2
        while folder.exists():  # two runs in one second still get a folder each
            folder = folder.with_name(f"{model}-{stamp}-{n}")
            n += 1
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "environment.json").write_text(json.dumps(environment(), indent=2) + "\n")
    return folder
