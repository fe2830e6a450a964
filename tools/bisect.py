"""``graphopt debug bisect``: find the pass, the rewrite and the node that break a pipeline.

graphopt debug bisect mlp --pipeline "-O1,int8{measure=false}" --repro repro-out
graphopt debug bisect bert --pipeline "-O2,int8" --calib batches.pt --repro repro-out

Three steps, each reusing the pass manager's own machinery:

1. **The pass.** One run of the whole pipeline with verification and ``on_fail="raise"``: every
   pass before the first one that breaks its contract is kept, so a pass that breaks only in
   combination with earlier passes is still found, in one trial (prefix bisection would need
   one per halving and assumes the failure is monotone in the prefix).
2. **The rewrite.** Binary search over the pipeline's global rewrite counter (``max_rewrites``,
   which counts every rewrite attempted): the smallest N whose run still fails in that pass. N is
   reported globally and as "rewrite k of pass P" (k = N - the rewrites made before P ran).
3. **The node.** The ``EquivalenceError`` of the run with ``max_rewrites=N`` names the first
   diverging node (local or inherited); its metric, value and threshold are recomputed for that
   node.

``--repro DIR`` then writes a standalone script around the smallest failing subgraph
(``graphopt.tools.repro``). With calibration data (``--calib``), every trial calibrates on the
same batches, read afresh, and the repro keeps what the subgraph needs of them. Every run writes
its output folder like ``graphopt debug``: ``environment.json``, ``report.txt`` and
``verdict.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.api import flat_batches, resolve_target
from graphopt.errors import EquivalenceError, GraphoptError
from graphopt.frontends.capture import capture
from graphopt.frontends.exported import as_args
from graphopt.ir.graph import original_name, short_target
from graphopt.pipeline.manager import CalibrationStream, PassManager, PassStep
from graphopt.pipeline.parse import parse_pipeline
from graphopt.pipeline.passes import PipelineItem
from graphopt.tools import debug
from graphopt.tools.verdict import Step, Trial, Verdict
from graphopt.verification.interpreter import Runner, native_run
from graphopt.verification.verify import Verifier, judge_value

Progressed = Callable[[int, int, str], None]  # (trials done, trials estimated, what is running)


class _Watcher:
    """Remembers, through the pass manager's ``on_step`` hook, the graph each pass run received
    and the rewrite count at its start, the run that fails (the last one started, whose
    rewritten candidate the manager fills in), and the graph and rules after every run. The
    trial is exactly the pipeline the user runs."""

    def __init__(self) -> None:
        self.step: Step | None = None
        self.last: PassStep | None = None
        self.ends: dict[tuple[int, int], tuple[GraphModule, dict[str, int]]] = {}

    def __call__(self, kind: str, step: PassStep) -> None:
        if kind == "start":
            self.last = step
            return
        applied = {rule: log.applied for rule, log in step.rules.items()}
        self.ends[(step.index, step.round)] = (step.after, applied)

    def failing(self) -> Step | None:
        s = self.last
        if s is None:
            return None
        after = s.candidate if s.result is not None else None
        return Step(s.index, s.record.name, s.round, s.pass_, s.before, s.rewrites_before, after)

    def rules(self) -> dict[str, int]:
        if self.last is None:
            return {}
        return {rule: log.applied for rule, log in self.last.rules.items()}


class Bisector:
    """Runs trials of one pipeline on one captured model (the reference is computed per trial,
    exactly as a compile does). ``calibration``: a function returning the calibration batches
    (shaped like the model's inputs) afresh for each trial, as ``debug.load_calibration`` gives."""

    def __init__(
        self,
        captured: GraphModule,
        flat_inputs: Sequence[Any],
        pipeline: str | Sequence[PipelineItem | str],
        target: str = "cpu",
        calibration: debug.Calibration | None = None,
    ) -> None:
        self.captured = captured
        self.inputs = list(flat_inputs)
        self.items = parse_pipeline(pipeline)
        self.target = target
        self.calibration = calibration
        self.trials = 0

    def calibration_batches(self) -> Iterator[list[Any]] | None:
        """The calibration batches for one run, flat like the inputs (None without)."""
        return None if self.calibration is None else flat_batches(self.calibration())

    def trial(self, limit: int | None) -> Trial:
        self.trials += 1
        watcher = _Watcher()
        manager = PassManager(
            self.items,
            on_fail="raise",
            max_rewrites=limit,
            target=self.target,
            on_step=watcher,
            calibration=self.calibration_batches(),
        )
        error: GraphoptError | None = None
        try:
            manager.run(self.captured, self.inputs)
        except GraphoptError as exc:  # EquivalenceError, PassError, a broken invariant
            error = exc
        stream = manager.ctx.calibration
        return Trial(
            limit,
            error,
            watcher.failing() if error is not None else None,
            manager.ctx.budget.used,
            manager.verifier,
            watcher.ends,
            watcher.rules() if error is not None else {},
            manager.report,
            stream.read_by if isinstance(stream, CalibrationStream) else None,
        )


def bisect(
    model: torch.nn.Module,
    inputs: Any,
    pipeline: str | Sequence[PipelineItem | str],
    *,
    target: str = "auto",
    repro: str | Path | None = None,
    progress: Progressed | None = None,
    calibration_data: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
) -> Verdict:
    """Find the first pass of ``pipeline`` that breaks its contract on ``model(*inputs)``, the
    rewrite inside it and the first diverging node. ``repro``: a folder for a standalone repro
    script (``repro.py`` and ``tensors.pt``) around the smallest failing subgraph.
    ``calibration_data``: as ``graphopt.compile`` takes it, read once per trial, so a list of
    batches or a function returning a fresh iterable of them (not a one-shot iterator)."""
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat = pytree.tree_leaves((call_args, {}))
    target = resolve_target(target, model, call_args)
    bisector = Bisector(captured, flat, pipeline, target, _per_trial(calibration_data))
    return bisect_captured(bisector, _pipeline_text(pipeline), repro=repro, progress=progress)


def _per_trial(
    data: Iterable[Any] | Callable[[], Iterable[Any]] | None,
) -> debug.Calibration | None:
    """Calibration data that each trial can read afresh."""
    if data is None or callable(data):
        return data
    if isinstance(data, Iterator):
        raise GraphoptError(
            "bisect runs the pipeline several times and a one-shot iterator of calibration "
            "batches can be read once; pass a list of batches, or a function returning a fresh "
            "iterable of them"
        )
    return lambda: data


def _pipeline_text(pipeline: str | Sequence[PipelineItem | str]) -> str:
    if isinstance(pipeline, str):
        return pipeline
    return ",".join(p if isinstance(p, str) else p.spec() for p in pipeline)


def bisect_captured(
    bisector: Bisector,
    pipeline: str,
    *,
    repro: str | Path | None = None,
    progress: Progressed | None = None,
) -> Verdict:
    """``bisect`` on an already captured graph (the CLI and tests share this)."""
    tell = progress or (lambda done, total, what: None)
    tell(0, 1, "running the pipeline with verification")
    first = bisector.trial(None)
    if first.error is None or first.step is None:
        tell(1, 1, "no failure")
        return Verdict(pipeline, bisector.trials, layers=first.layers())
    step = first.step
    # the pass fails with hi rewrites, not with lo; a crash happens while attempting a rewrite
    # that was never counted, so the budget that still crashes is one more than it counted
    crashed = not isinstance(first.error, EquivalenceError)
    lo, hi = step.used_before, first.used + (1 if crashed else 0)
    attempted = hi - lo
    fails: dict[int, Trial] = {}
    passes: dict[int, Trial] = {}
    estimate = 1 + (math.ceil(math.log2(hi - lo)) if hi - lo > 1 else 0) + 1
    while hi - lo > 1:
        tell(bisector.trials, estimate, f"max_rewrites={(lo + hi) // 2} in [{lo + 1}, {hi}]")
        mid = (lo + hi) // 2
        t = bisector.trial(mid)
        if t.same_failure(first):
            hi, fails[mid] = mid, t
        else:
            lo, passes[mid] = mid, t
    culprit: int | None = hi if hi > step.used_before else None
    evidence = first
    if culprit is not None:
        tell(bisector.trials, estimate, f"max_rewrites={culprit}: collecting the evidence")
        evidence = fails.get(culprit) or bisector.trial(culprit)
        if not evidence.same_failure(first):  # the budget changed the failure: keep the first
            culprit, evidence = None, first
    tell(bisector.trials, bisector.trials, "done")
    verdict = _verdict(bisector, pipeline, evidence, culprit, passes)
    verdict.rewrites_in_pass = attempted
    verdict.layers = first.layers()
    if repro is not None and evidence.step is not None:
        from graphopt.tools import repro as repro_tool

        tell(bisector.trials, bisector.trials, "minimizing the repro subgraph")

        # the repro carries the calibration data only to a pass that reads it
        calibrated = evidence.calibrated_by == evidence.step.p.name
        batches = bisector.calibration_batches() if calibrated else None
        written = repro_tool.write_repro(Path(repro), evidence, verdict, bisector.inputs, batches)
        verdict.repro = str(written.script)
        verdict.repro_nodes = written.nodes
        verdict.repro_rewrites = written.max_rewrites
    return verdict


def _verdict(
    bisector: Bisector,
    pipeline: str,
    evidence: Trial,
    culprit: int | None,
    passes: dict[int, Trial],
) -> Verdict:
    step = evidence.step
    assert step is not None and evidence.error is not None
    error = evidence.error
    verdict = Verdict(
        pipeline,
        bisector.trials,
        pass_name=step.p.name,
        pass_index=step.index,
        pass_spec=step.p.spec(),
        pass_round=step.round,
        contract=str(step.p.contract_for()),
        message=str(error),
    )
    if culprit is not None:
        verdict.rewrite = culprit
        verdict.rewrite_in_pass = culprit - step.used_before
        previous = passes.get(culprit - 1)
        end = previous.ends.get((step.index, step.round)) if previous else None
        graph_before, rules_before = end if end else (step.before, {})
        verdict.rule = _new_rule(rules_before, evidence.rules)
        if step.after is not None:
            verdict.rewrite_did = _rewrite_did(graph_before, step.after)
    if isinstance(error, EquivalenceError):
        verdict.node, verdict.op, verdict.origin = error.node, error.op, error.origin
        verdict.kind = error.kind
        verdict.output_metrics = dict(error.metrics)
        numeric = error.kind in ("local", "inherited")  # aliasing: values equal, no numbers
        if numeric and error.node and step.after is not None and evidence.verifier is not None:
            numbers = node_numbers(evidence.verifier, step, error.node, str(error.kind))
            verdict.replaced, verdict.metric, verdict.value, verdict.threshold = numbers
    else:
        verdict.kind = "crash"
    return verdict


def _new_rule(before: dict[str, int], after: dict[str, int]) -> str | None:
    """The rule that applied once more with the culprit rewrite (None if the pass logs none)."""
    grown = [rule for rule, n in after.items() if n > before.get(rule, 0)]
    return grown[-1] if grown else None


def _rewrite_did(before: GraphModule, after: GraphModule) -> str:
    """What the culprit rewrite changed: the nodes it removed and the ops it created."""
    old = {n.name: n for n in before.graph.nodes}
    new_names = {n.name for n in after.graph.nodes}
    removed = [n for n in before.graph.nodes if n.name not in new_names and n.op == "call_function"]
    created = [n for n in after.graph.nodes if n.name not in old and n.op == "call_function"]
    left = ", ".join(f"%{n.name} ({short_target(n)})" for n in removed) or "(nothing removed)"
    right = ", ".join(short_target(n) for n in created) or "(nothing)"
    return f"{left} -> {right}"


def node_numbers(
    verifier: Verifier, step: Step, node_name: str, kind: str
) -> tuple[str | None, str | None, float | None, float | None]:
    """(replaced node, metric, value, threshold) of the failing node, judged as ``localize``
    judged it: its own value fed correct inputs when local, its propagated value otherwise."""
    assert step.after is not None
    contract = step.p.contract_for()
    _, before_raw = native_run(step.before, verifier.inputs, record=True)
    _, after_vals = native_run(step.after, verifier.inputs, record=True)
    node = next(n for n in step.after.graph.nodes if n.name == node_name)
    origin = original_name(node)
    before_by_origin = {original_name(n): n.name for n in step.before.graph.nodes}
    replaced = before_by_origin.get(origin)
    if origin is None or replaced is None or origin not in verifier.ref_values:
        return replaced, None, None, None
    value = after_vals[node.name]
    if kind == "local":  # the same correct inputs localize fed it (verify.Verifier.local_inputs)
        env = verifier.local_inputs(node, contract, after_vals, before_by_origin, before_raw)
        value = Runner(step.after).run_one(node, env)
    before, ref = before_raw[replaced], verifier.ref_values[origin]
    _, numbers, _ = judge_value(contract, value, before, ref)
    metric = contract.judged_by
    if contract.kind == "rounding":
        return replaced, metric, numbers.get("error"), numbers.get("allowed")
    if contract.kind == "lossy":
        return replaced, metric, numbers.get(metric), contract.threshold
    diff = None
    if isinstance(value, torch.Tensor) and isinstance(before, torch.Tensor):
        if value.is_floating_point() and value.shape == before.shape:
            diff = float((value.double() - before.double()).abs().max())
    return replaced, metric, diff, 0.0


# -- the command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graphopt debug bisect",
        description="find the first pass that breaks its contract, the rewrite inside it and "
        "the first diverging node; --repro writes a standalone script that shows it",
    )
    debug.model_arguments(p, run_options=False)
    p.add_argument("--repro", metavar="DIR", default=None, help="write repro.py + tensors.pt here")
    p.add_argument("--out", default=None, help="output folder (default debug-out/<model>-<time>)")
    return p


def run(args: argparse.Namespace, load_model: debug.LoadModel) -> int:
    """``graphopt debug bisect``: prints the verdict; exit 0 when it found the culprit or there
    was nothing to find (the verdict says which)."""
    out = debug.Printer()
    calibration = debug.load_calibration(args.calib)  # a bad file fails before the model loads
    model, inputs = load_model(args.model, args.batch)
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat = pytree.tree_leaves((call_args, {}))
    target = resolve_target("auto", model, call_args)
    bisector = Bisector(captured, flat, args.pipeline, target, calibration)
    columns = (TextColumn("bisect"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"))
    console = Console(stderr=True)
    with Progress(*columns, TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, what: str) -> None:
            # the total is log2 of the rewrite range, known once the failing pass is found
            bar.update(task, completed=done, total=max(total, done), description=what)

        verdict = bisect_captured(bisector, args.pipeline, repro=args.repro, progress=progress)
    verdict.model, verdict.calib = args.model, args.calib
    calibrated = f"  calibration {args.calib}" if args.calib else ""
    out(f"{args.model}  pipeline {args.pipeline}{calibrated}")
    out(verdict.to_text())
    if args.repro is not None and verdict.repro is None:
        why = "no pass broke its contract" if not verdict.failed else "the failure left no step"
        out(f"no repro written to {args.repro}: {why}, so there is nothing to reproduce")
    folder = debug.write_folder(args, out)
    (folder / "verdict.json").write_text(json.dumps(verdict.to_json(), indent=2) + "\n")
    out(f"debug output written to {folder}")
    (folder / "report.txt").write_text(out.text())
    return 0
