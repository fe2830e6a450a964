"""Test helpers for passes: run a pipeline on a small model, compare with golden IR text.

Set ``GRAPHOPT_UPDATE_GOLDEN=1`` to (re)write golden files instead of comparing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.frontends.capture import capture
from graphopt.ir.graph import format_graph
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.report import Report
from graphopt.verification.interpreter import native_run, reference_run


@dataclass
class PassRun:
    before: GraphModule
    after: GraphModule
    report: Report
    inputs: list[Any]

    @property
    def rewrites(self) -> int:
        return sum(r.rewrites for r in self.report.records)

    def outputs(self) -> tuple[list[Any], list[Any]]:
        """(outputs before, outputs after) on the sample inputs, in their native dtypes."""
        return native_run(self.before, self.inputs)[0], native_run(self.after, self.inputs)[0]

    def reference(self) -> list[Any]:
        return reference_run(self.before, self.inputs)[0]


def run_pipeline(
    model: torch.nn.Module, inputs: tuple[Any, ...], pipeline: str, **options: Any
) -> PassRun:
    """Capture ``model`` and run ``pipeline`` on it with verification raising on failure."""
    gm = capture(model, inputs)
    flat = pytree.tree_leaves(inputs)
    options.setdefault("on_fail", "raise")
    after, report = PassManager(pipeline, **options).run(gm, flat)
    return PassRun(gm, after, report, flat)


def assert_golden(path: str | Path, gm: GraphModule) -> None:
    """Compare ``format_graph(gm)`` with the text checked in at ``path``."""
    path = Path(path)
    text = format_graph(gm)
    if os.environ.get("GRAPHOPT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    if not path.exists():
        raise AssertionError(f"golden file {path} is missing; run with GRAPHOPT_UPDATE_GOLDEN=1")
    expected = path.read_text()
    assert text == expected, f"IR differs from {path}:\n--- expected\n{expected}--- got\n{text}"
