"""``graphopt debug bisect``: find the pass, the rewrite and the node that break a pipeline.

graphopt debug bisect mlp --pipeline "-O1,int8{measure=false}" --repro repro-out

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
(``graphopt.tools.repro``). Every run writes its output folder like ``graphopt debug``:
``environment.json``, ``report.txt`` and ``verdict.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.api import resolve_target
from graphopt.capture import as_args, capture
from graphopt.errors import EquivalenceError, GraphoptError
from graphopt.interpreter import Runner, native_run
from graphopt.ir import original_name, short_target
from graphopt.pass_manager import PassManager, PassStep
from graphopt.passes_base import Contract, Pass, PipelineItem, parse_pipeline
from graphopt.tools import debug
from graphopt.verify import Verifier, judge_value

Progressed = Callable[[int, int, str], None]  # (trials done, trials estimated, what is running)


@dataclass
class Verdict:
    """What ``bisect`` found. ``pass_name`` is None when every pass kept its contract.

    ``pass_index`` is the pass's 1-based position in the flattened pipeline (as
    ``--opt-bisect-limit`` counts); ``rewrite`` the global rewrite number (``max_rewrites=rewrite``
    fails, ``rewrite - 1`` does not); ``rewrite_in_pass`` the same rewrite counted inside its pass.
    ``node``/``op`` name the first diverging node of the rewritten graph, ``origin`` the node of
    the captured graph it stands for, ``replaced`` the node of the graph the pass received;
    ``kind`` is "local" or "inherited" ("crash" for a pass that raised); ``metric``, ``value`` and
    ``threshold`` are that node's numbers under the pass's contract.
    """

    pipeline: str
    trials: int
    model: str = "MODEL"  # how the command line named the model, for the rerun line
    pass_name: str | None = None
    pass_index: int | None = None
    pass_spec: str | None = None
    pass_round: int | None = None  # which round of a fixed-point group failed (1 outside one)
    contract: str | None = None
    rewrite: int | None = None
    rewrite_in_pass: int | None = None
    rewrites_in_pass: int | None = None  # how many the pass attempted in the failing run
    rule: str | None = None
    rewrite_did: str | None = None  # "%relu_1 (aten.relu.default) -> aten.clamp_min.default"
    node: str | None = None
    op: str | None = None
    origin: str | None = None
    replaced: str | None = None
    kind: str | None = None
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None
    output_metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    repro: str | None = None  # the repro script, when one was written
    repro_nodes: int | None = None
    repro_rewrites: int | None = None

    @property
    def failed(self) -> bool:
        return self.pass_name is not None

    def to_json(self) -> dict[str, Any]:
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()}

    def to_text(self) -> str:
        """The one-screen verdict."""
        if not self.failed:
            return (
                f"no pass broke its contract: pipeline {self.pipeline} verified pass by pass "
                f"({self.trials} trial)"
            )
        lines = [
            f"first breaking pass: {self.pass_spec} (pass {self.pass_index} of the pipeline"
            + (f", round {self.pass_round}" if (self.pass_round or 1) > 1 else "")
            + f"), contract {self.contract}",
        ]
        if self.rewrite is not None:
            lines.append(
                f"culprit rewrite: rewrite {self.rewrite_in_pass} of {self.pass_name} "
                f"(of {self.rewrites_in_pass}; global rewrite {self.rewrite}: max_rewrites="
                f"{self.rewrite} fails, {self.rewrite - 1} passes)"
            )
            if self.rewrite_did or self.rule:
                rule = f" [rule {self.rule}]" if self.rule else ""
                lines.append(f"    it rewrote {self.rewrite_did or '?'}{rule}")
        else:
            lines.append("culprit rewrite: none (the pass failed before its first counted rewrite)")
        if self.node is not None:
            stands = f", standing for %{self.origin} of the captured graph" if self.origin else ""
            lines.append(f"first diverging node: %{self.node} ({self.op}){stands}")
            lines.append(f"    {self.kind}: {_kind_text(self.kind)}")
            if self.metric is not None:
                word = "budget" if (self.contract or "").startswith("lossy") else "threshold"
                lines.append(
                    f"    {self.metric} {_num(self.value)} against float64, "
                    f"{word} {_num(self.threshold)}"
                )
        elif self.kind == "crash":
            lines.append("the pass raised (no node to blame)")
        if self.output_metrics:
            shown = ", ".join(f"{k}={_num(v)}" for k, v in sorted(self.output_metrics.items()))
            lines.append(f"outputs: {shown}")
        lines.append(f"trials: {self.trials}")
        if self.rewrite is not None:
            lines.append(
                f"rerun: graphopt debug {self.model} --pipeline '{self.pipeline}' "
                f"--max-rewrites {self.rewrite} --on-fail raise --compare-nodes"
            )
        if self.repro:
            lines.append(
                f"repro: python {self.repro}  ({self.repro_nodes} nodes, "
                f"max_rewrites={self.repro_rewrites})"
            )
        return "\n".join(lines)


def _kind_text(kind: str | None) -> str:
    return {
        "local": "its own computation is wrong (fed correct inputs, it still diverges)",
        "inherited": "its inputs were already wrong; no node computes wrongly from correct ones",
        "aliasing": "an output now shares memory it did not share before",
    }.get(kind or "", str(kind))


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return "-" if value is None else str(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- one trial: the pipeline with a rewrite budget ------------------------------------------------


@dataclass
class Step:
    """One pass run as a trial saw it: where it stands and the graph it received."""

    index: int  # 1-based position in the flattened pipeline
    label: str  # as the report names it ("cleanup:dce")
    round: int
    p: Pass
    before: GraphModule
    used_before: int  # global rewrites made before this run
    after: GraphModule | None = None  # the rewritten candidate, once verification saw it


@dataclass
class Trial:
    limit: int | None
    error: GraphoptError | None
    step: Step | None  # the failing run (None when nothing failed)
    used: int  # global rewrites attempted when the trial ended
    verifier: Verifier | None
    ends: dict[tuple[int, int], tuple[GraphModule, dict[str, int]]]  # graph and rules after a run
    rules: dict[str, int]  # rules applied by the failing run

    def same_failure(self, other: Trial) -> bool:
        """Fails in the same run of the same pass, with the same kind of error."""
        if self.error is None or other.error is None or self.step is None or other.step is None:
            return False
        same_run = (self.step.index, self.step.round) == (other.step.index, other.step.round)
        return same_run and type(self.error) is type(other.error)


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
    exactly as a compile does)."""

    def __init__(
        self,
        captured: GraphModule,
        flat_inputs: Sequence[Any],
        pipeline: str | Sequence[PipelineItem | str],
        target: str = "cpu",
    ) -> None:
        self.captured = captured
        self.inputs = list(flat_inputs)
        self.items = parse_pipeline(pipeline)
        self.target = target
        self.trials = 0

    def trial(self, limit: int | None) -> Trial:
        self.trials += 1
        watcher = _Watcher()
        manager = PassManager(
            self.items, on_fail="raise", max_rewrites=limit, target=self.target, on_step=watcher
        )
        error: GraphoptError | None = None
        try:
            manager.run(self.captured, self.inputs)
        except GraphoptError as exc:  # EquivalenceError, PassError, a broken invariant
            error = exc
        return Trial(
            limit,
            error,
            watcher.failing() if error is not None else None,
            manager.ctx.budget.used,
            manager.verifier,
            watcher.ends,
            watcher.rules() if error is not None else {},
        )


def bisect(
    model: torch.nn.Module,
    inputs: Any,
    pipeline: str | Sequence[PipelineItem | str],
    *,
    target: str = "auto",
    repro: str | Path | None = None,
    progress: Progressed | None = None,
) -> Verdict:
    """Find the first pass of ``pipeline`` that breaks its contract on ``model(*inputs)``, the
    rewrite inside it and the first diverging node. ``repro``: a folder for a standalone repro
    script (``repro.py`` and ``tensors.pt``) around the smallest failing subgraph."""
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat = pytree.tree_leaves((call_args, {}))
    bisector = Bisector(captured, flat, pipeline, resolve_target(target, model, call_args))
    return bisect_captured(bisector, _pipeline_text(pipeline), repro=repro, progress=progress)


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
        return Verdict(pipeline, bisector.trials)
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
    if repro is not None and evidence.step is not None:
        from graphopt.tools import repro as repro_tool

        tell(bisector.trials, bisector.trials, "minimizing the repro subgraph")

        written = repro_tool.write_repro(Path(repro), evidence, verdict, bisector.inputs)
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


def contract_metric(contract: Contract) -> str:
    """The metric a contract judges a value by."""
    if contract.kind == "lossy":
        return str(contract.metric)
    return "rel_max" if contract.kind == "rounding" else "bitwise"


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
    metric = contract_metric(contract)
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
    model, inputs = load_model(args.model, args.batch)
    call_args = as_args(inputs)
    captured = capture(model, call_args)
    flat = pytree.tree_leaves((call_args, {}))
    bisector = Bisector(captured, flat, args.pipeline, resolve_target("auto", model, call_args))
    columns = (TextColumn("bisect"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"))
    console = Console(stderr=True)
    with Progress(*columns, TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:  # fmt: skip
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, what: str) -> None:
            # the total is log2 of the rewrite range, known once the failing pass is found
            bar.update(task, completed=done, total=max(total, done), description=what)

        verdict = bisect_captured(bisector, args.pipeline, repro=args.repro, progress=progress)
    verdict.model = args.model
    out(f"{args.model}  pipeline {args.pipeline}")
    out(verdict.to_text())
    folder = debug.write_folder(args, out)
    (folder / "verdict.json").write_text(json.dumps(verdict.to_json(), indent=2) + "\n")
    out(f"debug output written to {folder}")
    (folder / "report.txt").write_text(out.text())
    return 0
