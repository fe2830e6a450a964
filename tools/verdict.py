"""What ``graphopt debug bisect`` finds and hands to the repro writer: the verdict, and the
trials and pass runs it was built from."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from graphopt.errors import GraphoptError
from graphopt.pipeline.passes import Pass
from graphopt.pipeline.report import PassRecord, Report
from graphopt.verification.verify import Verifier


@dataclass
class Verdict:
    """What ``bisect`` found. ``pass_name`` is None when every pass kept its contract.

    ``pass_index`` is the pass's 1-based position in the flattened pipeline (as
    ``--opt-bisect-limit`` counts); ``rewrite`` the global rewrite number (``max_rewrites=rewrite``
    fails, ``rewrite - 1`` does not); ``rewrite_in_pass`` the same rewrite counted inside its pass.
    ``node``/``op`` name the first diverging node of the rewritten graph, ``origin`` the node of
    the captured graph it stands for, ``replaced`` the node of the graph the pass received;
    ``kind`` is "local" or "inherited" ("crash" for a pass that raised); ``metric``, ``value`` and
    ``threshold`` are that node's numbers under the pass's contract. ``layers`` holds the
    per-layer decisions of the verified run (int8's precision per layer, by report row), for the
    passes it completed; ``calib`` how the command line named the calibration data.
    """

    pipeline: str
    trials: int
    model: str = "MODEL"  # how the command line named the model, for the rerun line
    calib: str | None = None  # how the command line named the calibration data (--calib)
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
    layers: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

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
                f"({self.trials} trial)" + self._layers_text()
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
            calib = f" --calib {self.calib}" if self.calib else ""
            lines.append(
                f"rerun: graphopt debug {self.model} --pipeline '{self.pipeline}'{calib} "
                f"--max-rewrites {self.rewrite} --on-fail raise --compare-nodes"
            )
        if self.repro:
            lines.append(
                f"repro: python {self.repro}  ({self.repro_nodes} nodes, "
                f"max_rewrites={self.repro_rewrites})"
            )
        return "\n".join(lines) + self._layers_text()

    def _layers_text(self) -> str:
        """The per-layer tables of the verified run, as the pass report prints them."""
        records = [
            PassRecord(name, "", stats={"layers": rows}) for name, rows in self.layers.items()
        ]
        text = Report(records).layer_text()
        return f"\n\nper-layer decisions of the verified run\n{text}" if text else ""


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
    report: Report = field(default_factory=Report)  # the records of the passes it completed
    calibrated_by: str | None = None  # the pass that read the calibration data, if one did

    def layers(self) -> dict[str, list[dict[str, Any]]]:
        """The per-layer tables (``stats["layers"]``) of the passes this trial completed."""
        return {r.name: r.stats["layers"] for r in self.report.records if r.stats.get("layers")}

    def same_failure(self, other: Trial) -> bool:
        """Fails in the same run of the same pass, with the same kind of error."""
        if self.error is None or other.error is None or self.step is None or other.step is None:
            return False
        same_run = (self.step.index, self.step.round) == (other.step.index, other.step.round)
        return same_run and type(self.error) is type(other.error)
