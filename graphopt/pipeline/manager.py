"""The pass manager: runs a pipeline and owns everything cross-cutting.

Written once here, never in a pass: ordering checks, fixed-point groups, timing, statistics
(nodes before/after, rewrites), the rewrite budget for bisection (``max_rewrites``), IR
snapshots and rollback, invariant checks and verification against each pass's contract.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.errors import EquivalenceError, GraphoptError, MutationError, PassError
from graphopt.ir.graph import (
    count_op_nodes,
    count_weights,
    format_graph,
    short_target,
    snapshot,
    written_roots,
)
from graphopt.ir.rewriter import RewriteBudget, RuleLog
from graphopt.ir.state import describe_write
from graphopt.pipeline.parse import parse_pipeline
from graphopt.pipeline.passes import FixedPoint, Pass, PassContext, PassResult, PipelineItem
from graphopt.pipeline.report import PassRecord, Report
from graphopt.verification.contracts import Contract
from graphopt.verification.interpreter import native_run
from graphopt.verification.verify import Verifier, bitwise_equal


class EquivalenceWarning(UserWarning):
    """A pass broke its contract and was rolled back."""


@dataclass
class PassStep:
    """One run of one pass as the pass manager saw it; what an ``on_step`` observer gets.

    The manager calls ``on_step("start", step)`` before the pass runs and ``on_step("end",
    step)`` once it has kept or rolled back the result; it fills the same object in between, so
    an observer holding it when ``on_fail="raise"`` raises sees the failing run complete up to the
    point of failure. ``index`` is the pass's 1-based position in the flattened pipeline (as
    ``--opt-bisect-limit`` counts: a skipped pass counts too); ``round`` its run number (more than
    1 inside a fixed-point group); ``before`` the graph it received (never edited again);
    ``rewrites_before`` the pipeline's rewrites attempted before this run; ``candidate`` the graph
    the pass rewrote (a copy of ``before``; kept or not); ``rules`` this run's rule log.
    """

    index: int
    record: PassRecord
    pass_: Pass
    round: int
    before: GraphModule
    rewrites_before: int
    candidate: GraphModule | None = None
    result: PassResult | None = None
    kept: bool = False
    rules: dict[str, RuleLog] = field(default_factory=dict)

    @property
    def after(self) -> GraphModule:
        """The graph the pipeline goes on with: the candidate if it was kept, else ``before``."""
        return self.candidate if self.kept and self.candidate is not None else self.before

    @property
    def rolled_back(self) -> bool:
        """The pass changed the graph and the manager threw the change away."""
        return self.result is not None and self.result.changed and not self.kept


Event = Callable[[str, str, "PassRecord | None"], None]
StepEvent = Callable[[str, PassStep], None]

_STATUS_RANK = {"unchanged": 0, "ok": 1, "skipped": 2, "rolled back": 3}


class PassManager:
    """Runs ``pipeline`` (see the module docstring).

    ``calibration``: the calibration batches for the passes that calibrate (``int8``), each a
    flat list like the example inputs, as ``PassContext.calibration``: a stream, read once per
    ``run``, batch by batch, never copied (a generator works). A batch shaped unlike the
    example inputs, or a second read, is a ``GraphoptError`` about the data, raised as it is,
    never taken for a bug of the pass that was reading.

    ``engine``: the backend the optimized graph will run on (``PassContext.engine``): a pass
    that times its rewrites (``int8{measure=true}``) times them only on ``aten``, the executor
    it can run layer by layer; another engine (or ``auto``) is timed whole, by the backends.
    """

    def __init__(
        self,
        pipeline: str | Sequence[PipelineItem | str],
        *,
        verify: bool = True,
        on_fail: str = "rollback",
        max_rewrites: int | None = None,
        target: str = "cpu",
        keep_snapshots: bool = False,
        on_event: Event | None = None,
        on_step: StepEvent | None = None,
        calibration: Iterable[Sequence[Any]] | None = None,
        engine: str = "aten",
    ) -> None:
        if on_fail not in ("rollback", "raise"):
            raise GraphoptError(f"on_fail={on_fail!r}: use 'rollback' (the default) or 'raise'")
        self.items = parse_pipeline(pipeline)
        self.calibration = calibration
        self._stream: CalibrationStream | None = None
        self.verify = verify
        self.on_fail = on_fail
        self.keep_snapshots = keep_snapshots
        self.on_event = on_event
        self.on_step = on_step
        self.ctx = PassContext(target=target, engine=engine, budget=RewriteBudget(max_rewrites))
        # set by run(): the report being built and the verifier (None without verification),
        # readable from the hooks while the pipeline runs
        self.report = Report()
        self.verifier: Verifier | None = None
        self._index: dict[int, int] = {}  # id(record) -> position in the flattened pipeline

    def run(self, gm: GraphModule, flat_inputs: Sequence[Any]) -> tuple[GraphModule, Report]:
        """Run the pipeline on a copy of ``gm``; return the optimized graph and the report."""
        start = time.perf_counter()
        report = Report()
        self.report = report
        self._index = {}
        self.verifier = Verifier(gm, flat_inputs) if self.verify else None
        self._inputs = list(flat_inputs)
        self.ctx.inputs = self._inputs
        self.ctx.calibration = self._stream = self._calibration_stream(gm)
        gm = snapshot(gm)
        # what the graph may write in place: only what the graph it was given writes (nothing,
        # for a captured graph, which is functional)
        self._allowed_writes = _written_state(gm)
        self._outputs = self._run(gm) if self.verify else []
        # a graph with nondeterministic kernels (GPU atomics) cannot be held to bitwise-equal
        # reruns; it is held to its rounding floor instead
        self._reproducible = not self.verify or bitwise_equal(self._outputs, self._run(gm))
        self._aliases = self.verifier.alias_pairs(self._outputs, gm) if self.verifier else set()
        if self.verifier is not None:
            report.baseline_error = self.verifier.output_error(self._outputs)
        if self.keep_snapshots:
            report.snapshots.append(("captured", format_graph(gm)))
        for item in self.items:
            if isinstance(item, FixedPoint):
                gm = self._run_group(gm, item, report)
            else:
                record = PassRecord(item.name, str(item.contract_for()))
                gm, _ = self._run_pass(gm, item, record)
                report.records.append(record)
        report.total_s = time.perf_counter() - start
        return gm, report

    def _run_group(self, gm: GraphModule, group: FixedPoint, report: Report) -> GraphModule:
        records = {
            p.name: PassRecord(f"{group.name}:{p.name}", str(p.contract_for()))
            for p in group.passes
        }
        for _ in range(group.max_iters):
            any_change = False
            for p in group.passes:
                gm, changed = self._run_pass(gm, p, records[p.name])
                any_change |= changed
            if not any_change:
                break
        report.records += records.values()
        return gm

    def _run_pass(self, gm: GraphModule, p: Pass, record: PassRecord) -> tuple[GraphModule, bool]:
        """Run one pass on a copy; keep the copy only if it keeps its contract."""
        # passes are first seen in pipeline order, skipped ones too
        index = self._index.setdefault(id(record), len(self._index) + 1)
        if not self.ctx.budget.allows():
            record.status = "skipped" if record.status == "unchanged" else record.status
            record.message = "max_rewrites reached"
            return gm, False
        if self.on_event:
            self.on_event("start", record.name, None)
        # nodes and weights: the count before the pass's first run, changed by its own runs only
        # (inside a group, the other members' changes are theirs)
        nodes, weights = count_op_nodes(gm), count_weights(gm)
        if record.runs == 0:
            record.nodes_before = record.nodes_after = nodes
            record.weights_before = record.weights_after = weights
        record.runs += 1
        self.ctx.pass_name = p.name
        self.ctx.rewriters = []
        candidate = snapshot(gm)
        step = PassStep(index, record, p, record.runs, gm, self.ctx.budget.used, candidate)
        if self.on_step:
            self.on_step("start", step)
        t0 = time.perf_counter()
        try:
            result = p.run(candidate, self.ctx)
            for rw in self.ctx.rewriters:
                rw.finish()
        except Exception as exc:  # a bug in a pass must not take the compile down with it
            if self._stream is not None and exc is self._stream.error:
                raise  # the user's calibration data is wrong, not the pass
            record.time_s += time.perf_counter() - t0
            step.rules = self._rules()
            return self._crashed(gm, p, record, exc, step), False
        record.time_s += time.perf_counter() - t0
        step.result, step.rules = result, self._rules()
        rewrites = sum(rw.rewrites for rw in self.ctx.rewriters)
        _check_invariants(candidate, p.name)
        changed = result.changed
        for key, value in result.stats.items():
            record.stats[key] = (
                record.stats.get(key, 0) + value if isinstance(value, (int, float)) else value
            )
        keep = True
        mutation = _mutation_error(candidate, p.name, self._allowed_writes) if changed else None
        if mutation is not None:
            keep = self._reject(mutation, record)
        elif changed and self.verifier is not None:
            t1 = time.perf_counter()
            keep = self._check(gm, candidate, p, record)
            record.verify_s += time.perf_counter() - t1
        if keep:
            record.rewrites += rewrites if changed else 0  # an unchanged result is discarded
            for rule, log in step.rules.items():
                record.rules.setdefault(rule, RuleLog()).merge(log)
            step.kept = changed
            gm = candidate if changed else gm
            if changed:
                record.status = max(record.status, "ok", key=_STATUS_RANK.__getitem__)
                if self.keep_snapshots:
                    self.report.snapshots.append((record.name, format_graph(gm)))
        record.nodes_after += count_op_nodes(gm) - nodes
        record.weights_after += count_weights(gm) - weights
        self._end(record, step)
        return gm, changed and keep

    def _calibration_stream(self, gm: GraphModule) -> CalibrationStream | None:
        """This run's view of the calibration data; a one-shot iterator serves one run."""
        if self.calibration is None:
            return None
        one_shot = isinstance(self.calibration, Iterator)  # a generator, not a list
        if one_shot and self._stream is not None and self._stream.read_by is not None:
            raise GraphoptError(
                "the calibration data is a one-shot iterator that an earlier run of this pass "
                "manager has read; pass a list of batches, or a new iterator for each run"
            )
        return CalibrationStream(self.calibration, self._inputs, self.ctx, _free_dims(gm))

    def _rules(self) -> dict[str, RuleLog]:
        """The rule log of the pass run in progress (all its rewriters)."""
        rules: dict[str, RuleLog] = {}
        for rw in self.ctx.rewriters:
            for rule, log in rw.rules.items():
                rules.setdefault(rule, RuleLog()).merge(log)
        return rules

    def _end(self, record: PassRecord, step: PassStep) -> None:
        if self.on_step:
            self.on_step("end", step)
        if self.on_event:
            self.on_event("end", record.name, record)

    def _crashed(
        self, gm: GraphModule, p: Pass, record: PassRecord, exc: Exception, step: PassStep
    ) -> GraphModule:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        error = PassError(
            f"pass {p.spec()!r} crashed with {type(exc).__name__}: {first}. The graph is left as "
            f"it was before the pass; leave {p.name!r} out of the pipeline and report the bug"
        )
        if self.on_fail == "raise":
            raise error from exc
        record.status, record.message = "rolled back", str(error)
        warnings.warn(f"rolled back: {error}", EquivalenceWarning, stacklevel=4)
        self._end(record, step)
        return gm

    def _run(self, gm: GraphModule) -> list[Any]:
        """One run on fresh copies of the inputs and state, with the same random seed each
        time (so a graph with random ops gives the same outputs twice)."""
        devices = list(range(torch.cuda.device_count())) if self.ctx.target == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(0)
            for d in devices:
                torch.cuda.default_generators[d].manual_seed(0)
            return native_run(gm, self._inputs)[0]

    def _run_twice(self, gm: GraphModule, pass_name: str) -> list[Any]:
        """Outputs of ``gm``, which must be the same on two runs: a graph that keeps state
        between calls, or writes into its weights, fails here with the node that does it."""
        try:
            first = self._run(gm)
            second = self._run(gm)
        except MutationError as exc:
            raise EquivalenceError(
                f"pass {pass_name!r} broke the graph: {exc}. A compiled model would change its "
                f"weights on every call. Leave {pass_name!r} out of the pipeline and report the "
                "bug",
                pass_name=pass_name,
                node=exc.node,
                op=exc.op,
                kind="mutation",
            ) from None
        same = (
            bitwise_equal(first, second)
            if self._reproducible
            else self.verifier is None or self.verifier.judge(Contract.rounding(), first, second).ok
        )
        if same:
            return first
        raise _state_error(gm, pass_name, first, second, self._inputs)

    def _reject(self, error: EquivalenceError, record: PassRecord) -> bool:
        """A pass broke its contract or an invariant: raise, or roll it back with a warning."""
        if self.on_fail == "raise":
            raise error
        record.status = "rolled back"
        record.message = str(error)
        if self.verifier is not None:
            record.error = self.verifier.output_error(self._outputs)
        warnings.warn(f"rolled back: {error}", EquivalenceWarning, stacklevel=5)
        return False

    def _check(self, before: GraphModule, after: GraphModule, p: Pass, record: PassRecord) -> bool:
        assert self.verifier is not None
        contract = p.contract_for()
        try:
            outputs = self._run_twice(after, p.name)
        except EquivalenceError as error:
            return self._reject(error, record)
        verdict = self.verifier.judge(contract, self._outputs, outputs)
        record.error = verdict.error
        record.spent = verdict.metrics
        aliases = self.verifier.alias_pairs(outputs, after)
        new_aliases = aliases - self._aliases
        if verdict.ok and not new_aliases:
            self._outputs, self._aliases = outputs, aliases
            return True
        error: EquivalenceError = (
            self.verifier.localize(p.name, contract, verdict, before, after)
            if not verdict.ok
            else self.verifier.aliasing_error(p.name, new_aliases, after)
        )
        return self._reject(error, record)


class CalibrationStream:
    """The calibration batches as passes read them (``PassContext.calibration``): once, batch by
    batch, each checked against the example inputs as it is read. A second read, or a batch
    shaped unlike the inputs, raises a ``GraphoptError`` kept in ``error`` (so the pass manager
    can tell it from a bug of the pass that was reading)."""

    def __init__(
        self,
        batches: Iterable[Sequence[Any]],
        inputs: Sequence[Any],
        ctx: PassContext,
        free_dims: Sequence[set[int]] = (),
    ):
        self.batches = batches
        self.inputs = inputs
        self.ctx = ctx
        self.free_dims = free_dims  # per input, the dims that may differ (symbolic in the graph)
        self.read_by: str | None = None  # the pass that read it
        self.error: GraphoptError | None = None

    def __iter__(self) -> Iterator[list[Any]]:
        if self.read_by is not None:
            raise self._fail(
                f"pass {self.ctx.pass_name!r} reads the calibration data, which pass "
                f"{self.read_by!r} has already read: it is a stream, read once per compile; "
                "keep one calibrating pass in the pipeline"
            )
        self.read_by = self.ctx.pass_name
        return self._read()

    def _read(self) -> Iterator[list[Any]]:
        try:
            batches = iter(self.batches)
        except TypeError:
            raise self._fail(
                f"the calibration data is a {type(self.batches).__name__}, not an iterable of "
                "batches; pass a list (or any iterable) of batches shaped like the example inputs"
            ) from None
        for index in itertools.count():
            try:
                batch = next(batches)
            except StopIteration:
                return
            except GraphoptError as exc:
                raise self._fail(str(exc)) from exc
            except Exception as exc:  # the user's iterable failed: say so, not "the pass crashed"
                raise self._fail(
                    f"reading calibration batch {index} raised {type(exc).__name__}: {exc}"
                ) from exc
            yield self._checked(index, batch)

    def _checked(self, index: int, batch: Sequence[Any]) -> list[Any]:
        batch = list(batch)
        if len(batch) != len(self.inputs):
            raise self._fail(
                f"calibration batch {index} has {len(batch)} inputs; the model takes "
                f"{len(self.inputs)}, as the example inputs: give each batch as the example "
                "inputs are given (a tensor, or a tuple of the model's positional inputs)"
            )
        for i, (got, want) in enumerate(zip(batch, self.inputs)):
            if _kind(got) != _kind(want):
                raise self._fail(
                    f"calibration batch {index}: input {i} is {_kind(got)}, the example input "
                    f"is {_kind(want)}; calibration batches must be shaped like the example "
                    "inputs (any batch size)"
                )
            free = self.free_dims[i] if i < len(self.free_dims) else {0}
            if isinstance(got, torch.Tensor) and any(
                got.shape[d] != want.shape[d] for d in range(want.dim()) if d not in free
            ):
                shape = ", ".join("N" if d in free else str(n) for d, n in enumerate(want.shape))
                raise self._fail(
                    f"calibration batch {index}: input {i} has shape {tuple(got.shape)}; the "
                    f"model was captured for ({shape}) (N: any size): calibration batches must "
                    "be shaped like the example inputs"
                )
        return batch

    def _fail(self, message: str) -> GraphoptError:
        self.error = GraphoptError(message)
        return self.error


def _free_dims(gm: GraphModule) -> list[set[int]]:
    """Per graph input, the dims a calibration batch may size freely: the batch dim, and those
    that are symbolic in the captured graph."""
    free = []
    for node in gm.graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        shape = val.shape if isinstance(val, torch.Tensor) else ()
        free.append({0} | {d for d, n in enumerate(shape) if not isinstance(n, int)})
    return free


def _kind(value: Any) -> str:
    """What a calibration input must agree on with its example input (not the batch size)."""
    if isinstance(value, torch.Tensor):
        return (
            f"a {value.dim()}-d {str(value.dtype).removeprefix('torch.')} tensor on {value.device}"
        )
    return type(value).__name__


def _written_state(gm: GraphModule) -> set[tuple[str, str]]:
    """The weights and inputs ``gm`` writes in place, as (op, target) pairs."""
    return {
        (root.op, str(root.target))
        for root in written_roots(gm)
        if root.op in ("get_attr", "placeholder")
    }


def _mutation_error(
    gm: GraphModule, pass_name: str, allowed: set[tuple[str, str]]
) -> EquivalenceError | None:
    """The invariant no pass may break: it never leaves a node writing in place into a
    constant, parameter, buffer or graph input that the graph it received did not write."""
    for root, writer in written_roots(gm).items():
        if root.op not in ("get_attr", "placeholder") or (root.op, str(root.target)) in allowed:
            continue
        what = (
            f"the weight {root.target!r}" if root.op == "get_attr" else f"graph input %{root.name}"
        )
        return EquivalenceError(
            f"pass {pass_name!r} left {describe_write(writer)} writing into {what} in place, "
            "which the graph it received did not do: the compiled model would change its "
            "weights or the caller's tensors on every call (passes/README.md, invariant 4). "
            f"Leave {pass_name!r} out of the pipeline and report the bug",
            pass_name=pass_name,
            node=writer.name,
            op=short_target(writer),
            kind="mutation",
        )
    return None


def _state_error(
    gm: GraphModule, pass_name: str, first: list[Any], second: list[Any], inputs: list[Any]
) -> EquivalenceError:
    """Two runs of ``gm`` on the same fresh inputs differ: name the output and the node."""
    index = next(i for i, (a, b) in enumerate(zip(first, second)) if not bitwise_equal(a, b))
    writers = list(written_roots(gm).values())
    if writers:
        culprit: Node | None = writers[0]
        how = f"{describe_write(writers[0])} writes in place"
    else:  # no node admits a write: name the first node whose value changes between runs
        _, one = native_run(gm, inputs, record=True)
        _, two = native_run(gm, inputs, record=True)
        culprit = next(
            (
                n
                for n in gm.graph.nodes
                if n.name in one and not bitwise_equal(one[n.name], two.get(n.name))
            ),
            None,
        )
        how = (
            f"%{culprit.name} ({short_target(culprit)}) is the first node whose value changes"
            if culprit is not None
            else "no node admits it"
        )
    return EquivalenceError(
        f"pass {pass_name!r} made the graph stateful: two runs on fresh copies of the same inputs "
        f"give different values for output {index}; {how}. A compiled model would drift from "
        f"call to call. Leave {pass_name!r} out of the pipeline and report the bug",
        pass_name=pass_name,
        node=culprit.name if culprit is not None else None,
        op=short_target(culprit) if culprit is not None else None,
        kind="state",
    )


def _check_invariants(gm: GraphModule, pass_name: str) -> None:
    """Every value node carries ``meta["val"]`` (passes/README.md, invariant 1)."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_function") and "val" not in node.meta:
            raise GraphoptError(
                f"pass {pass_name!r} left node %{node.name} ({node.op} {node.target}) without "
                "meta['val']; create nodes through graphopt.ir.rewriter.Rewriter, which sets it"
            )
