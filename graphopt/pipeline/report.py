"""The per-pass report: one record per pass (time, nodes, rewrites, error, status, rules,
per-layer tables) and its text form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from graphopt.ir.rewriter import RuleLog


@dataclass
class PassRecord:
    """One line of the per-pass report."""

    name: str
    contract: str
    time_s: float = 0.0
    verify_s: float = 0.0
    # compute nodes before the pass's first run -> after, counting its own changes only (in a
    # group, not the other members'); weights: the same for stored tensors (get_attr)
    nodes_before: int = 0
    nodes_after: int = 0
    weights_before: int = 0
    weights_after: int = 0
    rewrites: int = 0
    error: float | None = None  # output error against float64 after the pass
    status: str = "unchanged"  # unchanged | ok | rolled back | skipped
    runs: int = 0  # more than 1 inside a fixed-point group
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    spent: dict[str, Any] = field(default_factory=dict)  # contract numbers (lossy budget spent)
    rules: dict[str, RuleLog] = field(default_factory=dict)  # rule -> applied / near misses

    def nodes_text(self) -> str:
        """``52 -> 40``, with the weights the pass removed or added: ``52 -> 52, weights -15``."""
        text = f"{self.nodes_before} -> {self.nodes_after}"
        weights = self.weights_after - self.weights_before
        return text + (f", weights {weights:+d}" if weights else "")


@dataclass
class Report:
    records: list[PassRecord] = field(default_factory=list)
    capture: dict[str, Any] = field(default_factory=dict)
    baseline_error: float | None = None
    total_s: float = 0.0
    snapshots: list[tuple[str, str]] = field(default_factory=list)
    # the backend table of compile(..., backend=...): graphopt.backends.select.BackendRow rows
    backends: list[Any] = field(default_factory=list)

    def to_text(self) -> str:
        head = f"{'pass':<24} {'time':>9} {'nodes':>24} {'rewrites':>8} {'err vs f64':>11}  status"
        lines = [head, "-" * len(head)]
        for r in self.records:
            err = "-" if r.error is None else f"{r.error:.2e}"
            nodes = r.nodes_text()
            lines.append(
                f"{r.name:<24} {r.time_s * 1e3:>7.1f}ms {nodes:>24} {r.rewrites:>8} {err:>11}  {r.status}"
            )
        extra = [
            text for text in (self.rule_text(), self.layer_text(), self.backend_text()) if text
        ]
        return "\n\n".join(["\n".join(lines), *extra])

    def backend_text(self) -> str:
        """The backend table: each engine's median time, its error, kept / rejected and why."""
        if not self.backends:
            return ""
        head = f"{'backend':<14} {'median':>10} {'err vs f64':>11} {'build':>8}  status"
        lines = ["backends", head, "-" * len(head)]
        for r in self.backends:
            ms = "-" if r.time_ms is None else f"{r.time_ms:.3f}ms"
            err = "-" if r.error is None else f"{r.error:.2e}"
            build = "-" if r.build_s is None else f"{r.build_s:.1f}s"
            why = f" ({r.why})" if r.why else ""
            lines.append(f"{r.backend:<14} {ms:>10} {err:>11} {build:>8}  {r.status}{why}")
        return "\n".join(lines)

    def layer_text(self) -> str:
        """Per-layer tables that passes leave in ``stats["layers"]`` (int8 precision and error,
        pruning sparsity, parameters and FLOPs): one table per pass, its columns from the rows."""
        blocks: list[str] = []
        for r in self.records:
            rows = [row for row in r.stats.get("layers") or [] if isinstance(row, dict)]
            if not rows:
                continue
            columns = [k for k in rows[0] if not callable(rows[0][k]) and k != "why"]
            table = [columns] + [[_cell(row.get(k)) for k in columns] for row in rows]
            widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
            lines = [f"{r.name}: per layer"]
            for line, row in zip(table, [None, *rows]):
                text = "  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
                why = row.get("why") if row else None
                lines.append(text + (f"  ({why})" if why else ""))
            blocks.append("\n".join(lines))
        return "\n\n".join(blocks)

    def rule_text(self, max_misses: int = 3) -> str:
        """The "why didn't it fuse" table: per rule, matches applied and the first near misses."""
        lines: list[str] = []
        for r in self.records:
            for rule, log in r.rules.items():
                if not log.applied and not log.missed:
                    continue
                lines.append(f"{r.name}: {rule}: applied {log.applied}, near misses {log.missed}")
                for node, why in log.misses[:max_misses]:
                    lines.append(f"    %{node}: {why}")
                if log.missed > max_misses:
                    lines.append(f"    ... {log.missed - max_misses} more")
        return ("why (not) fused\n" + "\n".join(lines)) if lines else ""


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
