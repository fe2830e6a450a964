"""The onnx wheel's backend test cases through graphopt's importer (see backend_cases.py).

Run with ``-s`` to see the per-op pass-rate tables. docs/onnx_import_cases.md is written by
``python -m tests.onnx.backend_cases`` (every case at eager, -O0 and -O2).
"""

from __future__ import annotations

import collections
import warnings

import pytest
import torch
from backend_cases import (
    Case,
    Run,
    _to_torch,
    all_cases,
    compare,
    print_table,
    run_all,
    unexpected,
)

from graphopt.frontends.onnx_import import capture_onnx

# the compiled levels in CI: every op's first cases (the full sweep of both levels, several
# minutes on 2 cores, is `python -m tests.onnx.backend_cases`, which writes the docs table)
CI_PER_OP = {"-O0": 3, "-O2": 1}
FLOOR_PASS = 1395  # eager passes when this was written


@pytest.fixture(scope="module")
def run() -> Run:
    result = run_all(all_cases())
    print_table(result)
    return result


def ci_sample(run: Run, per_op: int) -> list[Case]:
    """A deterministic sample for the compiled levels: for each op type (in name order), the
    first ``per_op`` in-scope cases that use it, in the onnx package's order."""
    chosen: dict[str, Case] = {}
    taken: dict[str, int] = collections.Counter()
    for o in run.outcomes:
        if o.status == "unsupported":
            continue
        if any(taken[op] < per_op for op in o.ops):
            chosen.setdefault(o.case.name, o.case)
            for op in o.ops:
                taken[op] += 1
    return list(chosen.values())


def test_every_supported_case_passes_or_is_a_known_failure(run: Run) -> None:
    failing, passing = unexpected(run)
    assert not failing, f"unexpected failures (fix, or list with a reason): {failing}"
    assert not passing, f"listed as known failures but pass now: {passing}"


@pytest.mark.parametrize(
    ("level", "per_op"), [("-O0", CI_PER_OP["-O0"]), ("-O2", CI_PER_OP["-O2"])]
)
def test_compiled_sample_passes_or_is_a_known_failure(run: Run, level: str, per_op: int) -> None:
    """graphopt.compile of a sample of the cases (python -m tests.onnx.backend_cases runs all
    of them at both levels for docs/onnx_import_cases.md): the same known-failure rule."""
    compiled = run_all(ci_sample(run, per_op), level)
    print_table(compiled)
    failing, passing = unexpected(compiled)
    assert not failing, f"unexpected failures at {level} (fix, or list with a reason): {failing}"
    assert not passing, f"listed as known failures at {level} but pass now: {passing}"
    in_scope = {op for o in run.outcomes if o.status != "unsupported" for op in o.ops}
    assert {op for o in compiled.outcomes for op in o.ops} == in_scope  # every op type ran


def test_pass_rate_floor(run: Run) -> None:
    # Guards against cases silently leaving the run (an op dropped from the table, a loader bug
    # that makes every case "unsupported"): the counts measured when this test was written.
    ran = len(run.by_status("pass")) + len(run.by_status("fail"))
    assert ran >= 1445, ran
    assert len(run.by_status("pass")) >= FLOOR_PASS
    assert run.seconds < 120, f"the backend run took {run.seconds:.0f}s"


def _first_passing_case_per_op(run: Run) -> list:
    chosen, seen = [], set()
    for o in run.by_status("pass"):
        if o.case.source != "node" or len(o.ops) != 1 or o.ops[0] in seen:
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
