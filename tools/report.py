"""``graphopt report``: one self-contained HTML page about one compile.

graphopt report mlp --pipeline -O2 -o report.html
graphopt report resnet --pipeline -O1 --batch 2
graphopt report bert --pipeline "-O2,int8" --calib batches.pt

The page holds (inline CSS, JS and SVG; no external URL): the pipeline as a timeline (one bar per
pass, its width the pass's time, with node counts, rewrites, error against float64 and status);
for any pass, the graph before and after it as SVG, nodes coloured by their relative L2 error
against the float64 run of the captured graph and the nodes a pass replaced outlined; the rule
log's near misses ("why (not) fused"); the environment and the command. Like ``graphopt debug``,
every run writes its own folder (``--out``, default ``report-out/<model>-<time>``) with
``environment.json`` and a copy of the page.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shlex
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import graphopt
from graphopt.api import flat_batches, resolve_target
from graphopt.errors import GraphoptError
from graphopt.frontends.capture import capture
from graphopt.frontends.exported import as_args
from graphopt.ir.graph import count_op_nodes, format_type, original_name, short_target
from graphopt.ops.fused import program_of
from graphopt.pipeline.manager import PassManager, PassStep
from graphopt.pipeline.report import PassRecord, Report
from graphopt.tools import debug, svg
from graphopt.tools.debug import LoadModel
from graphopt.verification.interpreter import Runner, reference_run

# rel L2 against float64 -> colour (ColorBrewer RdYlGn, reversed: green is good)
SCALE: list[tuple[float, str, str]] = [
    (1e-6, "#1a9850", "< 1e-6"),
    (1e-5, "#91cf60", "1e-6 .. 1e-5"),
    (1e-4, "#d9ef8b", "1e-5 .. 1e-4"),
    (1e-3, "#fee08b", "1e-4 .. 1e-3"),
    (1e-2, "#fc8d59", "1e-3 .. 1e-2"),
    (math.inf, "#d73027", ">= 1e-2"),
]
NAN_COLOUR = "#b58bd6"
NO_REF_COLOUR = "#e6e6e6"
MAX_MISSES = 200  # near-miss rows shown; the counts cover all of them


def add_arguments(p: argparse.ArgumentParser) -> None:
    debug.model_arguments(p)
    p.add_argument("-o", "--output", default=None, help="the HTML file (default: in the folder)")
    p.add_argument("--out", default=None, help="output folder (default report-out/<model>-<time>)")


def run(args: argparse.Namespace, load_model: LoadModel) -> int:
    if args.output and Path(args.output).is_dir():
        raise GraphoptError(
            f"-o {args.output} is a folder; give the page a file name, e.g. "
            f"-o {Path(args.output) / 'report.html'}"
        )
    calibration = debug.load_calibration(args.calib)  # a bad file fails before the model loads
    model, inputs = load_model(args.model, args.batch)
    compile_run = collect(
        model,
        inputs,
        args.pipeline,
        args.on_fail,
        args.max_rewrites,
        calibration=None if calibration is None else calibration(),
    )
    page = build_html(compile_run, args.model, args.pipeline, command(args), debug.environment())
    folder = debug.write_folder(args, root="report-out")
    (folder / "report.html").write_text(page)
    output = Path(args.output) if args.output else folder / "report.html"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(page)
    print(f"report written to {output} (run folder {folder})")
    return 0


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report."""
    argv = ["graphopt", "report", args.model, f"--pipeline={args.pipeline}"]
    flags = (
        ("--batch", args.batch),
        ("--max-rewrites", args.max_rewrites),
        ("--calib", args.calib),
    )
    for flag, value in flags:
        if value is not None:
            argv += [flag, str(value)]
    if args.on_fail != "rollback":
        argv += ["--on-fail", args.on_fail]
    if args.output:
        argv += ["-o", args.output]
    return shlex.join(argv)


# -- running the pipeline and keeping every graph ------------------------------------------------


@dataclass
class Step:
    """One run of a pass that changed the graph (``kept``) or whose change was rolled back."""

    record: PassRecord
    run: int
    before: GraphModule
    after: GraphModule
    kept: bool


class Recorder:
    """Keeps the graph before and after every pass run, through the pass manager's ``on_step``
    hook, including the candidate of a run that was rolled back (coloured by error, it is the
    evidence). The graphs are the manager's own: each pass runs on a fresh copy, so a graph it
    has handed over is never edited again and holding it is a faithful snapshot."""

    def __init__(self) -> None:
        self.steps: list[Step] = []
        self.first_before: dict[int, GraphModule] = {}  # id(record) -> graph before its 1st run

    def __call__(self, kind: str, step: PassStep) -> None:
        if kind == "start":
            self.first_before.setdefault(id(step.record), step.before)
            return
        if (step.kept or step.rolled_back) and step.candidate is not None:
            self.steps.append(
                Step(step.record, step.round, step.before, step.candidate, kept=step.kept)
            )


@dataclass
class CompileRun:
    captured: GraphModule
    optimized: GraphModule
    flat_inputs: list[Any]
    report: Report
    steps: list[Step]
    first_before: dict[int, GraphModule]
    warnings: list[str] = field(default_factory=list)


def collect(
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    pipeline: str,
    on_fail: str = "rollback",
    max_rewrites: int | None = None,
    *,
    calibration: Iterable[Any] | None = None,
) -> CompileRun:
    """Capture ``model`` and run ``pipeline`` on it, keeping every intermediate graph.
    ``calibration``: batches shaped like ``inputs`` (``graphopt.compile``'s
    ``calibration_data``), read once."""
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat_inputs = pytree.tree_leaves((call_args, {}))
    recorder = Recorder()
    manager = PassManager(
        pipeline,
        on_fail=on_fail,
        max_rewrites=max_rewrites,
        target=resolve_target("auto", model, call_args),
        on_step=recorder,
        calibration=None if calibration is None else flat_batches(calibration),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", graphopt.EquivalenceWarning)
        optimized, report = manager.run(captured, flat_inputs)
    return CompileRun(
        captured,
        optimized,
        flat_inputs,
        report,
        recorder.steps,
        recorder.first_before,
        [str(w.message) for w in caught if issubclass(w.category, graphopt.EquivalenceWarning)],
    )


# -- per-node error ------------------------------------------------------------------------------

NodeErrors = dict[str, tuple[str, dict[str, float]]]  # node (or "fused/inner") -> origin, metrics


def node_errors(
    gm: GraphModule, run: CompileRun, ref_values: dict[str, Any]
) -> tuple[NodeErrors, str]:
    """Propagated error of every node with a counterpart in the captured graph (as
    ``graphopt debug --compare-nodes`` computes it), inner ops of fused nodes included.
    Returns the errors and a note: empty, or why the graph could not be run."""
    runner = Runner(gm, record=True, expand=True)
    try:
        runner.run_graph(run.flat_inputs)
    except Exception as exc:  # a rolled-back candidate may be broken; the report still draws it
        first = (str(exc).strip().splitlines() or [""])[0]
        return {}, f"this graph could not be run ({type(exc).__name__}: {first})"
    errors: NodeErrors = {}
    for node in gm.graph.nodes:
        origin = original_name(node)
        if origin is None or origin not in ref_values:
            continue
        numbers = debug.node_metrics(runner.values.get(node.name), ref_values[origin])
        if numbers is not None:
            errors[node.name] = (origin, numbers)
    inner, _ = debug.fused_inner_rows(run.captured, gm, runner.values, ref_values)
    for key, _op, origin, numbers in inner:
        errors[key] = (origin, numbers)
    return errors, ""


def colour(rel_l2: float | None) -> str:
    if rel_l2 is None:
        return NO_REF_COLOUR
    if not math.isfinite(rel_l2):
        return NAN_COLOUR
    return next(c for bound, c, _ in SCALE if rel_l2 < bound)


# -- graphs as drawings ---------------------------------------------------------------------------


def op_label(node: Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    label = short_target(node).removeprefix("aten.")
    return label.removesuffix(".default")


def _tooltip(node: Node, key: str, errors: NodeErrors) -> str:
    head = f"%{key} = {short_target(node)}"
    typ = format_type(node.meta.get("val"))
    lines = [head + (f" : {typ}" if typ else "")]
    info = node.meta.get("graphopt") or {}
    if info.get("from"):
        lines.append(f"made by {info.get('pass')} from: {', '.join(info['from'])}")
    if key in errors:
        origin, m = errors[key]
        lines.append(
            f"vs float64 (%{origin}): rel L2 {m['rel_l2']:.3g}, max abs {m['max_abs']:.3g}, "
            f"cosine {m['cosine']:.7f}, SQNR {m['sqnr']:.3g} dB"
        )
    else:
        lines.append("no float counterpart in the captured graph: not compared")
    return "\n".join(lines)


def _fill(key: str, errors: NodeErrors) -> str:
    return colour(errors[key][1]["rel_l2"] if key in errors else None)


def _inner_boxes(node: Node, errors: NodeErrors) -> list[svg.Box]:
    boxes = []
    for inner in program_of(node.args[1]).to_graph().graph.nodes:
        if inner.op == "call_function":
            key = f"{node.name}/{inner.name}"
            label = op_label(inner)
            tip = _tooltip(inner, key, errors)
            boxes.append(svg.Box(key, label, tooltip=tip, fill=_fill(key, errors)))
    return boxes


def _is_fused(node: Node) -> bool:
    return node.op == "call_function" and short_target(node) == "graphopt.fused.default"


def _drawn(node: Node) -> bool:
    val = node.meta.get("val")
    return node.op != "get_attr" and not (
        node.op != "output" and isinstance(val, (int, torch.SymInt))
    )


def drawing(
    gm: GraphModule,
    errors: NodeErrors,
    removed: set[str] | frozenset[str] = frozenset(),
    new: set[str] | frozenset[str] = frozenset(),
    outlines: Sequence[tuple[str, list[str]]] = (),
) -> svg.Drawing:
    """``gm`` as boxes and edges. Weights (``get_attr``) and shape values (``sym_size``) are
    left out: they feed many nodes far apart, and their edges would cover the picture."""
    boxes: list[svg.Box] = []
    edges: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if not _drawn(node):
            continue
        style = "removed" if node.name in removed else "new" if node.name in new else ""
        inner = _inner_boxes(node, errors) if _is_fused(node) else []
        label = f"fused ({len(inner)} ops)" if inner else op_label(node)
        tip = _tooltip(node, node.name, errors)
        fill = _fill(node.name, errors)
        boxes.append(svg.Box(node.name, label, node.name, tip, fill, style, inner))
        edges += [(i.name, node.name) for i in node.all_input_nodes if _drawn(i)]
    return svg.Drawing(boxes, edges, list(outlines))


def _origins(node: Node) -> set[str]:
    info = node.meta.get("graphopt")
    return set(info.get("from") or []) if info else {node.name}


def replaced_groups(
    before: GraphModule, after: GraphModule
) -> tuple[list[tuple[str, list[str]]], set[str], set[str]]:
    """What one pass run did, by provenance: outlines (label, nodes of ``before``) around the
    nodes that one new node replaced, the names of removed nodes, and of new nodes."""
    before_names = {n.name for n in before.graph.nodes}
    after_names = {n.name for n in after.graph.nodes}
    computes = ("call_function", "call_module", "call_method")
    gone = [n for n in before.graph.nodes if n.op in computes and n.name not in after_names]
    new = [n for n in after.graph.nodes if n.op in computes and n.name not in before_names]
    outlines: list[tuple[str, list[str]]] = []
    for node in new:
        made_from = set((node.meta.get("graphopt") or {}).get("from") or [])
        members = [b.name for b in gone if _origins(b) and _origins(b) <= made_from]
        if len(members) >= 2:
            label = "fused" if _is_fused(node) else op_label(node)
            outlines.append((f"-> {label} %{node.name}", members))
    return outlines, {n.name for n in gone}, {n.name for n in new}


def removed_weights(before: GraphModule, after: GraphModule) -> list[str]:
    """Weights and constants (``get_attr`` targets) that ``before`` reads and ``after`` no
    longer does: what a pass such as DCE removes without removing a drawn node."""
    kept = {n.target for n in after.graph.nodes if n.op == "get_attr"}
    gone = [n.target for n in before.graph.nodes if n.op == "get_attr" and n.target not in kept]
    return [str(t) for t in dict.fromkeys(gone)]


def removed_note(names: list[str], shown: int = 8) -> str:
    """``names`` in one sentence for the page, the first ``shown`` of them by name."""
    if not names:
        return ""
    listed = ", ".join(names[:shown]) + (
        f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    )
    return f"Removed {len(names)} weight(s)/constant(s) that are not drawn as nodes: {listed}."


# -- the page --------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One choice of the graph selector: a pass run, its before and after pictures."""

    label: str
    record: int
    before: str  # svg key
    after: str
    note: str


class Pictures:
    """Every SVG of the page, each drawn once and referenced by key."""

    def __init__(self, run: CompileRun) -> None:
        self.run = run
        _, self.ref_values = reference_run(run.captured, run.flat_inputs)
        self.svgs: dict[str, str] = {}
        self._errors: dict[int, tuple[NodeErrors, str]] = {}
        self._keys: dict[int, str] = {}
        self._graphs: list[GraphModule] = []  # keeps every id() above alive, so none is reused

    def errors(self, gm: GraphModule) -> tuple[NodeErrors, str]:
        if id(gm) not in self._errors:
            self._graphs.append(gm)
            self._errors[id(gm)] = node_errors(gm, self.run, self.ref_values)
        return self._errors[id(gm)]

    def plain(self, gm: GraphModule, caption: str) -> str:
        if id(gm) not in self._keys:
            key = f"g{len(self._keys)}"
            self._keys[id(gm)] = key
            self.svgs[key] = svg.render(drawing(gm, self.errors(gm)[0]), caption)
        return self._keys[id(gm)]

    def step(self, k: int, step: Step) -> tuple[str, str]:
        outlines, removed, new = replaced_groups(step.before, step.after)
        before_errors, after_errors = self.errors(step.before)[0], self.errors(step.after)[0]
        name = step.record.name
        self.svgs[f"s{k}b"] = svg.render(
            drawing(step.before, before_errors, removed=removed, outlines=outlines),
            f"before {name}",
        )
        self.svgs[f"s{k}a"] = svg.render(
            drawing(step.after, after_errors, new=new), f"after {name}"
        )
        return f"s{k}b", f"s{k}a"


def entries(run: CompileRun, pictures: Pictures) -> list[Entry]:
    """One entry per pass run that changed the graph (or was rolled back); one per pass that
    changed nothing, showing the graph it saw."""
    out: list[Entry] = []
    for i, record in enumerate(run.report.records):
        steps = [(k, s) for k, s in enumerate(run.steps) if s.record is record]
        for k, step in steps:
            before, after = pictures.step(k, step)
            label = record.name + (f" (run {step.run})" if record.runs > 1 else "")
            note = pictures.errors(step.after)[1]
            note = " ".join(
                filter(None, [removed_note(removed_weights(step.before, step.after)), note])
            )
            if not step.kept:
                label += " [rolled back: the rejected graph]"
                note = (record.message + " " + note).strip()
            out.append(Entry(label, i, before, after, note))
        if not steps:
            gm = run.first_before[id(record)]
            key = pictures.plain(gm, f"graph as {record.name} saw it")
            why = record.message or "the pass did not change the graph"
            out.append(Entry(f"{record.name} ({record.status})", i, key, key, why))
    return out


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _timeline(report: Report) -> str:
    bars, rows = [], []
    for i, r in enumerate(report.records):
        total_ms = (r.time_s + r.verify_s) * 1e3
        share = 100 * r.time_s / (r.time_s + r.verify_s) if total_ms else 100.0
        status = r.status.replace(" ", "-")
        tip = (
            f"{r.name}: pass {r.time_s * 1e3:.2f} ms + verify {r.verify_s * 1e3:.2f} ms, "
            f"nodes {r.nodes_text()}, rewrites {r.rewrites}, "
            f"error vs f64 {_num(r.error)}, {r.status}"
        )
        bars.append(
            f'<div class="bar {status}" data-record="{i}" style="flex-grow:{total_ms:.4f}" '
            f'title="{html.escape(tip)}"><div class="pass-part" style="width:{share:.1f}%">'
            "</div></div>"
        )
        cells = [
            str(i + 1),
            r.name,
            r.contract,
            f"{r.time_s * 1e3:.2f}",
            f"{r.verify_s * 1e3:.2f}",
            r.nodes_text(),
            str(r.rewrites),
            _num(r.error),
        ]
        row = "".join(f"<td>{html.escape(c)}</td>" for c in cells)
        message = f'<td class="msg">{html.escape(r.message)}</td>'
        rows.append(
            f'<tr data-record="{i}">{row}<td class="status {status}">{html.escape(r.status)}'
            f"</td>{message}</tr>"
        )
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "#",
            "pass",
            "contract",
            "pass ms",
            "verify ms",
            "nodes",
            "rewrites",
            "error vs f64",
            "status",
            "message",
        )  # fmt: skip
    )
    return (
        '<div id="timeline">' + "".join(bars) + "</div>"
        '<p class="hint">Bar width: pass time plus verification time (the darker part is the '
        "pass). Click a bar or a row to see that pass's graphs.</p>"
        f'<table id="passes"><tr>{head}</tr>' + "".join(rows) + "</table>"
    )


def _legend() -> str:
    items = [(c, label) for _, c, label in SCALE] + [
        (NAN_COLOUR, "NaN / inf"),
        (NO_REF_COLOUR, "not compared (no float counterpart)"),
    ]
    swatches = "".join(
        f'<span class="swatch"><i style="background:{c}"></i>{html.escape(label)}</span>'
        for c, label in items
    )
    return (
        '<div id="legend"><b>rel L2 error vs float64:</b> ' + swatches + "<br>"
        '<span class="swatch"><i class="k-removed"></i>removed by the pass</span>'
        '<span class="swatch"><i class="k-new"></i>new node</span>'
        '<span class="swatch"><i class="k-outline"></i>nodes one new node replaced</span>'
        '<span class="swatch"><i class="k-fused"></i>fused op, its inner ops inside</span>'
        " Weights (get_attr) and shape values (sym_size) are not drawn; hover a node for its "
        "numbers.</div>"
    )


def _near_misses(report: Report) -> str:
    summary, rows = [], []
    for i, r in enumerate(report.records):
        for rule, log in r.rules.items():
            if not log.applied and not log.missed:
                continue
            summary.append(
                f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(rule)}</td>"
                f"<td>{log.applied}</td><td>{log.missed}</td></tr>"
            )
            for node, why in log.misses:
                rows.append((i, r.name, rule, node, why))
    if not summary:
        return '<p id="no-rules">No fusion rule ran, or none matched anything.</p>'
    if not rows:
        return _rules_table(summary) + '<p id="no-misses">No near misses.</p>'

    shown = "".join(
        f'<tr class="miss" data-miss-record="{i}" data-node="{html.escape(n)}">'
        + "".join(f"<td>{html.escape(c)}</td>" for c in (p, rule, f"%{n}", why))
        + "</tr>"
        for i, p, rule, n, why in rows[:MAX_MISSES]
    )
    more = f"<p>... {len(rows) - MAX_MISSES} more</p>" if len(rows) > MAX_MISSES else ""
    return (
        _rules_table(summary)
        + '<table id="misses"><tr><th>pass</th><th>rule</th><th>node</th><th>why not</th></tr>'
        + shown
        + "</table>"
        + more
    )


def _rules_table(rows: list[str]) -> str:
    head = "<tr><th>pass</th><th>rule</th><th>applied</th><th>near misses</th></tr>"
    return f'<table id="rules">{head}' + "".join(rows) + "</table>"


def _environment(env: dict[str, str], cmd: str) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in env.items()
    )
    return f'<table id="environment">{rows}</table><pre id="command">{html.escape(cmd)}</pre>'


def _json_script(element_id: str, value: Any) -> str:
    text = json.dumps(value).replace("</", "<\\/")  # a "</script>" inside a string ends nothing
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def build_html(run: CompileRun, model: str, pipeline: str, cmd: str, env: dict[str, str]) -> str:
    """The whole page as one string."""
    pictures = Pictures(run)
    choices = entries(run, pictures)
    report = run.report
    options = "".join(
        f'<option value="{i}">{i + 1}. {html.escape(e.label)}</option>'
        for i, e in enumerate(choices)
    )
    store = "".join(
        f'<div id="svg-{key}" data-svg="{key}">{text}</div>' for key, text in pictures.svgs.items()
    )
    summary = (
        f"captured {count_op_nodes(run.captured)} nodes -> {count_op_nodes(run.optimized)} "
        f"after the pipeline; captured graph's error vs float64 {_num(report.baseline_error)}; "
        f"whole run {report.total_s:.3f} s"
    )
    warned = "".join(f"<li>{html.escape(w)}</li>" for w in run.warnings)
    title = f"graphopt report: {model} {pipeline}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        '<div id="js-errors" hidden></div>',
        f"<p>{html.escape(summary)}</p>",
        f'<ul class="warnings">{warned}</ul>' if warned else "",
        "<h2>Pipeline</h2>",
        _timeline(report),
        "<h2>Graph before and after a pass</h2>",
        f'<label>pass: <select id="pass-select">{options}</select></label>',
        '<p id="entry-note"></p>',
        _legend(),
        '<p id="zoom">zoom: <button type="button" data-zoom="fit" class="on">fit the pane</button> '
        '<button type="button" data-zoom="0.5">50%</button> '
        '<button type="button" data-zoom="1">100%</button> '
        '<button type="button" id="stack">one above the other</button> '
        '<span class="hint">(a tall graph reads in columns, top to bottom then left to right; '
        "a small circle marks an edge that goes on in the next column; scroll to pan)</span></p>",
        '<div id="panes"><div class="pane"><h3>before</h3><div id="before-pane" class="scroll">'
        '</div></div><div class="pane"><h3>after</h3><div id="after-pane" class="scroll">'
        "</div></div></div>",
        "<h2>Why (not) fused</h2>",
        _near_misses(report),
        "<h2>Environment</h2>",
        _environment(env, cmd),
        f'<div id="svg-store" hidden>{store}</div>',
        _json_script("entries", [e.__dict__ for e in choices]),
        f"<script>{_SCRIPT}</script>",
    ]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1em 2em; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 6px; text-align: left; font-size: 13px; }
td.msg { max-width: 40em; font-size: 12px; color: #555; }
tr[data-record], tr.miss { cursor: pointer; }
tr.selected { background: #eef4ff; }
#timeline { display: flex; height: 28px; border: 1px solid #999; margin: .5em 0; }
#timeline .bar { flex-basis: 0; min-width: 3px; background: #9ecae1; position: relative;
  border-right: 1px solid #fff; cursor: pointer; }
#timeline .bar .pass-part { height: 100%; background: #3182bd; }
#timeline .bar.rolled-back { background: #f4a582; }
#timeline .bar.rolled-back .pass-part { background: #ca0020; }
#timeline .bar.skipped { background: #fff3b0; }
#timeline .bar.skipped .pass-part { background: #e6c300; }
#timeline .bar.unchanged { background: #e5e5e5; }
#timeline .bar.unchanged .pass-part { background: #bdbdbd; }
#timeline .bar.selected { outline: 3px solid #000; z-index: 1; }
td.status.ok { color: #1a7f37; } td.status.rolled-back { color: #c00; font-weight: bold; }
td.status.skipped { color: #9a6700; } td.status.unchanged { color: #777; }
.hint { color: #666; font-size: 12px; margin: 0; }
#panes { display: flex; gap: 1em; }
.pane { flex: 1 1 0; min-width: 0; }
.scroll { overflow: auto; max-height: 80vh; border: 1px solid #ccc; }
#legend { margin: .5em 0; font-size: 12px; }
.swatch { margin-right: 1em; white-space: nowrap; }
.swatch i { display: inline-block; width: 14px; height: 12px; border: 1px solid #555;
  vertical-align: middle; margin-right: 3px; }
.swatch i.k-removed { border: 2px dashed #000; }
.swatch i.k-new { border: 3px solid #000; }
.swatch i.k-outline { border: 2px dashed #2166ac; border-radius: 5px; }
.swatch i.k-fused { border: 2px solid #5e3c99; border-radius: 5px; }
svg.graph text { font: 11px ui-monospace, monospace; text-anchor: middle; fill: #111; }
svg.graph text.sub { font-size: 9px; fill: #333; }
svg.graph .node rect { stroke: #555; stroke-width: 1; }
svg.graph .node.new > rect { stroke: #000; stroke-width: 3; }
svg.graph .node.removed > rect { stroke: #000; stroke-width: 2; stroke-dasharray: 4 3; }
svg.graph .node.fused > rect { stroke: #5e3c99; stroke-width: 2; }
svg.graph .node.hit > rect { stroke: #e7298a; stroke-width: 4; }
svg.graph .inner rect { stroke: #777; stroke-width: .5; }
svg.graph .edge { fill: none; stroke: #888; stroke-width: 1; }
svg.graph circle.jump { fill: #fff; stroke: #555; stroke-width: 1.2; }
#zoom button { font-size: 12px; }
#zoom button.on { font-weight: bold; }
#panes.stacked { flex-direction: column; }
svg.graph .outline rect { fill: #2166ac10; stroke: #2166ac; stroke-width: 2;
  stroke-dasharray: 6 3; }
svg.graph .outline text { text-anchor: start; fill: #2166ac; font-size: 10px; }
#js-errors { background: #fdd; color: #900; padding: .5em; white-space: pre-wrap; }
#command { background: #f4f4f4; padding: .5em; }
"""

# Plain ES2015, no library. It writes document.body.dataset.rendered = "ok" when done, and any
# uncaught error into #js-errors, so a DOM dump of a headless browser shows both.
_SCRIPT = """
window.onerror = function (message, source, line) {
  var box = document.getElementById("js-errors");
  box.hidden = false;
  box.textContent += "script error: " + message + " (line " + line + ")\\n";
  document.body.dataset.rendered = "error";
};
(function () {
  var entries = JSON.parse(document.getElementById("entries").textContent);
  var select = document.getElementById("pass-select");
  // zoom: "fit" scales each picture to its pane's width (the default: a wrapped graph of 50 to
  // 200 nodes reads on one or two screens); a number is a fixed scale of the drawn size
  var zoom = "fit";
  function sized(svg) {
    var w = Number(svg.getAttribute("width")), h = Number(svg.getAttribute("height"));
    var pane = svg.parentElement;
    var scale = zoom === "fit" ? Math.min(1, (pane.clientWidth - 4) / w) : Number(zoom);
    svg.style.width = Math.round(w * scale) + "px";
    svg.style.height = Math.round(h * scale) + "px";
  }
  function picture(pane, key) {
    var copy = document.getElementById("svg-" + key).firstElementChild.cloneNode(true);
    document.getElementById(pane).replaceChildren(copy);
    sized(copy);
  }
  function rendered() {
    var svg = document.querySelector("#before-pane svg");
    if (!svg) { return; }
    var box = svg.getBoundingClientRect();
    document.body.dataset.graphSize = Math.round(box.width) + "x" + Math.round(box.height);
  }
  // before and after side by side (the default) or one above the other, each then as wide
  // as the page: for a wide graph
  var stack = document.getElementById("stack");
  stack.addEventListener("click", function () {
    var stacked = document.getElementById("panes").classList.toggle("stacked");
    stack.textContent = stacked ? "side by side" : "one above the other";
    document.querySelectorAll("#panes svg").forEach(sized);
    rendered();
  });
  document.querySelectorAll("#zoom button[data-zoom]").forEach(function (button) {
    button.addEventListener("click", function () {
      zoom = button.dataset.zoom;
      document.querySelectorAll("#zoom button[data-zoom]").forEach(function (b) {
        b.classList.toggle("on", b === button);
      });
      document.querySelectorAll("#panes svg").forEach(sized);
      rendered();
    });
  });
  function show(i) {
    var entry = entries[i];
    select.value = String(i);
    picture("before-pane", entry.before);
    picture("after-pane", entry.after);
    document.getElementById("entry-note").textContent = entry.note;
    document.querySelectorAll("[data-record]").forEach(function (el) {
      el.classList.toggle("selected", el.dataset.record === String(entry.record));
    });
  }
  function firstEntryOf(record) {
    for (var i = 0; i < entries.length; i++) {
      if (entries[i].record === record) { return i; }
    }
    return 0;
  }
  select.addEventListener("change", function () { show(Number(select.value)); });
  // scroll the two panes together: the same region of both graphs stays in view
  var panes = [document.getElementById("before-pane"), document.getElementById("after-pane")];
  panes.forEach(function (pane, i) {
    pane.addEventListener("scroll", function () {
      var other = panes[1 - i];
      if (other.scrollTop !== pane.scrollTop) { other.scrollTop = pane.scrollTop; }
      if (other.scrollLeft !== pane.scrollLeft) { other.scrollLeft = pane.scrollLeft; }
    });
  });
  document.querySelectorAll("[data-record]").forEach(function (el) {
    el.addEventListener("click", function () { show(firstEntryOf(Number(el.dataset.record))); });
  });
  // a near miss: the graph its pass saw, the node marked and scrolled into view
  var misses = document.querySelectorAll("tr.miss");
  function showMiss(row) {
    show(firstEntryOf(Number(row.dataset.missRecord)));
    var selector = '#before-pane g[data-node="' + CSS.escape(row.dataset.node) + '"]';
    var node = document.querySelector(selector);
    if (node) {
      node.classList.add("hit");
      node.scrollIntoView({block: "center", inline: "center"});
    }
  }
  misses.forEach(function (row) {
    row.addEventListener("click", function () { showMiss(row); });
  });
  // "#entry-3" opens the fourth entry, "#miss-0" the first near miss: links to one place
  var wanted = /^#(entry|miss)-(\\d+)$/.exec(window.location.hash);
  var start = entries.findIndex(function (e) { return e.before !== e.after; });
  if (entries.length) { show(start < 0 ? 0 : start); }
  if (wanted && wanted[1] === "entry" && Number(wanted[2]) < entries.length) {
    show(Number(wanted[2]));
  }
  if (wanted && wanted[1] === "miss" && Number(wanted[2]) < misses.length) {
    showMiss(misses[Number(wanted[2])]);
  }
  rendered();
  document.body.dataset.rendered = "ok";
  console.log("graphopt-report: rendered " + entries.length + " entries");
})();
"""
