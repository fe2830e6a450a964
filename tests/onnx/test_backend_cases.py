"""The onnx wheel's backend test cases through graphopt's importer (see backend_cases.py).

Run with ``-s`` to see the per-op pass-rate table; ``GRAPHOPT_UPDATE_ONNX_CASES=1`` also writes it
to docs/onnx_import_cases.md.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from backend_cases import (
    KNOWN_FAILURES,
    Run,
    _to_torch,
    all_cases,
    compare,
    markdown,
    print_table,
    run_all,
)

from graphopt.frontends.onnx_import import capture_onnx

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "onnx_import_cases.md")


@pytest.fixture(scope="module")
def run() -> Run:
    result = run_all(all_cases())
    print_table(result)
    if os.environ.get("GRAPHOPT_UPDATE_ONNX_CASES") == "1":
        with open(DOC, "w") as f:
            f.write(markdown(result, KNOWN_FAILURES))
    return result


def test_every_supported_case_passes_or_is_a_known_failure(run: Run) -> None:
    unexpected = {o.case.name: o.reason for o in run.by_status("fail")}
    for name in KNOWN_FAILURES:
        unexpected.pop(name, None)
    assert not unexpected, f"unexpected failures (fix, or list with a reason): {unexpected}"
    passing_known = [o.case.name for o in run.by_status("pass") if o.case.name in KNOWN_FAILURES]
    assert not passing_known, f"listed as known failures but pass now: {passing_known}"


def test_pass_rate_floor(run: Run) -> None:
    # Guards against cases silently leaving the run (an op dropped from the table, a loader bug
    # that makes every case "unsupported"): the counts measured when this test was written.
    ran = len(run.by_status("pass")) + len(run.by_status("fail"))
    assert ran >= 1440, ran
    assert len(run.by_status("pass")) >= 1365
    assert run.seconds < 120, f"the backend run took {run.seconds:.0f}s"


def _shape_like_input(case: object) -> bool:
    """A graph input that is a small integer tensor (k, axes, a target shape, pads): such cases
    pass a shape or scalar argument at run time, which torch.export cannot turn into Python ints. Real
    models carry these as constants, which the importer keeps as Python ints."""
    inputs, _ = case.data_sets[0]
    return any(
        getattr(x, "dtype", None) is not None
        and x.ndim <= 1
        and (x.dtype.kind in "iu" or x.size <= 4)  # OneHot's depth, Range's bounds, scales
        for x in inputs
    )


def _first_passing_case_per_op(run: Run) -> list:
    chosen, seen = [], set()
    for o in run.by_status("pass"):
        if o.case.source != "node" or len(o.ops) != 1 or o.ops[0] in seen:
            continue
        if _shape_like_input(o.case):
            continue
        seen.add(o.ops[0])
        chosen.append(o.case)
    return chosen


def test_a_case_per_op_through_full_capture(run: Run) -> None:
    """One case per op type through graphopt.capture (cleanup + torch.export + normalize):
    the captured GraphModule matches the expected outputs and has meta['val'] on every value."""
    failures = {}
    cases = _first_passing_case_per_op(run)
    assert len(cases) >= 100
    for case in cases:
        inputs, expected = case.data_sets[0]
        args = tuple(_to_torch(x) for x in inputs)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                gm = capture_onnx(case.model, args, dynamic_batch=False)
            got = gm(*args)
        except Exception as exc:
            failures[case.name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        problem = compare(got if isinstance(got, tuple) else (got,), expected, case.rtol, case.atol)
        if problem:
            failures[case.name] = problem
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "call_function", "get_attr"):
                assert "val" in node.meta, (case.name, node.format_node())
    assert not failures, failures
    assert torch.is_grad_enabled()
