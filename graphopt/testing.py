"""Helpers shared by the tests: run a pipeline on a small model and compare with golden IR
text, judge a pass run against its contract, and compare a kernel with its ATen reference.

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


# -- kernel tests --------------------------------------------------------------------------------

# a Triton kernel's output against a float64 reference, per output dtype: about one rounding of
# the dtype plus fp32 accumulation (tests/kernels; the int8 GEMMs pass tighter tables)
KERNEL_TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.float16: {"rtol": 1e-2, "atol": 2e-3},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def assert_kernel_close(
    got: torch.Tensor,
    want: torch.Tensor,
    dtype: torch.dtype,
    tol: dict[torch.dtype, dict[str, float]] = KERNEL_TOL,
    *,
    equal_nan: bool = False,
) -> None:
    """A kernel's output ``got`` has ``dtype`` and ``want``'s shape, and is within ``tol[dtype]``
    (rtol, atol) of the reference ``want``, compared in float64."""
    assert got.dtype == dtype, f"got {got.dtype}, expected {dtype}"
    assert got.shape == want.shape, f"got shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    torch.testing.assert_close(got.double(), want.double(), equal_nan=equal_nan, **tol[dtype])


# -- pass tests -----------------------------------------------------------------------------------


def assert_rounding(run: PassRun, dtype: torch.dtype = torch.float32) -> None:
    """The ``rounding`` contract on the sample inputs: every output's error against the float64
    reference is at most ``max(2 x the error of the graph before the pass, the floor of dtype)``
    (``dtype``: the compute dtype, e.g. float16 after a half-precision lowering)."""
    from graphopt.verification import metrics

    before, after = run.outputs()
    for i, (b, a, r) in enumerate(zip(before, after, run.reference(), strict=True)):
        allowed = max(2 * metrics.rel_max(b, r), metrics.rounding_floor(dtype))
        error = metrics.rel_max(a, r)
        assert error <= allowed, f"output {i}: error {error:.3g} vs float64 > allowed {allowed:.3g}"


def assert_exact(run: PassRun) -> None:
    """The ``exact`` contract on the sample inputs: the same outputs, bitwise."""
    before, after = run.outputs()
    assert len(before) == len(after), f"{len(before)} outputs before the pass, {len(after)} after"
    for i, (b, a) in enumerate(zip(before, after)):
        assert torch.equal(b, a), f"output {i} differs from before the pass"
