"""dce, cse, fold-constants, remove-noops: golden IR, rewrite counts, bitwise-exact outputs."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graphopt.frontends.exported import normalize
from graphopt.pipeline.manager import PassManager
from graphopt.testing import PassRun, assert_exact, assert_golden, run_pipeline

GOLDEN = Path(__file__).parent / "golden"


class DeadCode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dead = torch.sigmoid(x) * 3  # two dead nodes, plus the unused weight
        del dead
        return torch.relu(x) + 1


def test_dce_golden_count_exact() -> None:
    run = run_pipeline(DeadCode(), (torch.randn(4, 5),), "dce")
    assert_golden(GOLDEN / "dce.txt", run.after)
    assert run.rewrites == 3
    assert run.report.records[0].stats == {"erased": 3}
    assert not hasattr(run.after, "unused")  # the module attribute went with its node
    assert_exact(run)


class Duplicates(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.tanh(x) * 2.0
        b = torch.tanh(x) * 2.0  # same as a
        c = torch.tanh(x) * -0.0  # differs from a only by a float constant: not merged
        return a + b + c, torch.tanh(x)  # the output tanh is merged too


def test_cse_golden_count_exact() -> None:
    run = run_pipeline(Duplicates(), (torch.randn(4, 5),), "cse")
    assert_golden(GOLDEN / "cse.txt", run.after)
    assert run.rewrites == 4  # tanh x3, mul x1
    assert_exact(run)


class CseTwoOutputs(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x * 2


def test_cse_keeps_distinct_outputs_distinct() -> None:
    run = run_pipeline(CseTwoOutputs(), (torch.randn(3),), "cse")
    assert run.rewrites == 0  # merging would return one tensor twice (new aliasing)


class WeightMath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled = self.w.t() * 0.5 + 1.0  # weight-only: folded into one constant
        return x @ scaled + torch.arange(5.0)  # arange (no tensor input) is recomputed, not stored


def test_fold_constants_golden_count_exact() -> None:
    run = run_pipeline(WeightMath(), (torch.randn(3, 6),), "fold-constants,dce")
    assert_golden(GOLDEN / "fold_constants.txt", run.after)
    folds = run.report.records[0]
    assert folds.rewrites == 1 and folds.stats == {"folded": 1}
    assert_exact(run)
    const = [n for n in run.after.graph.nodes if n.op == "get_attr"]
    assert [n.meta["graphopt"]["pass"] for n in const] == ["fold-constants"]


def test_fold_constants_respects_size_limit() -> None:
    run = run_pipeline(WeightMath(), (torch.randn(3, 6),), "fold-constants{max_bytes=16}")
    assert run.rewrites == 0


class Noops(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.drop(x).clone().detach().contiguous().to(torch.float32)
        y = y.reshape(x.shape[0], 5).relu()
        kept = y.t().contiguous()  # a real layout change: kept
        return y.clone(), kept  # the output clone is kept (no output aliasing)


def test_remove_noops_golden_count_exact() -> None:
    run = run_pipeline(Noops(), (torch.randn(4, 5),), "remove-noops")
    assert_golden(GOLDEN / "remove_noops.txt", run.after)
    targets = {str(n.target) for n in run.after.graph.nodes if n.op == "call_function"}
    assert "aten.dropout.default" not in targets and "aten.detach.default" not in targets
    assert run.rewrites == 5
    assert_exact(run)


class TrainDropout(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(x, 0.5, training=True)


def test_remove_noops_keeps_training_dropout() -> None:
    gm_run = run_pipeline(TrainDropout(), (torch.randn(4, 5),), "remove-noops", verify=False)
    assert gm_run.rewrites == 0


def test_cleanup_group_reaches_fixed_point() -> None:
    run = run_pipeline(Noops(), (torch.randn(4, 5),), "cleanup")
    names = [r.name for r in run.report.records]
    assert names == ["cleanup:remove-noops", "cleanup:fold-constants", "cleanup:cse", "cleanup:dce"]
    again = run_pipeline(Noops(), (torch.randn(4, 5),), "cleanup,cleanup")
    assert sum(r.rewrites for r in again.report.records[4:]) == 0
    assert_exact(run)


# -- no new aliasing (passes/README.md invariant 5) ------------------------------------------------


def _storages(values: list[torch.Tensor]) -> list[int]:
    return [v.untyped_storage().data_ptr() for v in values]


class CopyThenView(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.clone().detach(), x.clone().reshape(x.shape)


def test_remove_noops_keeps_copies_whose_memory_reaches_an_output() -> None:
    x = torch.randn(3, 8)
    run = run_pipeline(CopyThenView(), (x,), "remove-noops")
    outs = run.outputs()[1]
    assert x.untyped_storage().data_ptr() not in _storages(outs)
    assert len(set(_storages(outs))) == 2


class DupBehindView(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.relu(x), torch.relu(x).detach()


def test_cse_does_not_merge_values_that_both_reach_outputs() -> None:
    run = run_pipeline(DupBehindView(), (torch.randn(3, 4),), "cse")
    assert run.rewrites == 0
    assert len(set(_storages(run.outputs()[1]))) == 2


class WeightOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + 1, self.w * 2


def test_fold_constants_does_not_return_a_stored_buffer() -> None:
    run = run_pipeline(WeightOutput(), (torch.randn(2, 8),), "fold-constants")
    assert run.rewrites == 0
    first = run.after(torch.randn(2, 8))[1]
    first.zero_()
    assert run.after(torch.randn(2, 8))[1].abs().sum() > 0  # later calls are not corrupted


# -- graphs that write in place (built by hand; a captured graph is functional) -----------------


def _inplace_run(model: nn.Module, x: torch.Tensor, pipeline: str) -> PassRun:
    """``pipeline`` on the graph torch.export makes before functionalization (its in-place ops
    still there), with the pass manager's checks raising."""
    gm = torch.export.export(model, (x,), strict=False).module()
    normalize(gm)
    after, report = PassManager(pipeline, on_fail="raise").run(gm, [x])
    return PassRun(gm, after, report, [x])


def _assert_exact_and_input_kept(run: PassRun, x: torch.Tensor) -> None:
    kept = x.clone()
    assert_exact(run)
    assert torch.equal(x, kept), "a run wrote into the caller's input"


class CopyWrittenThroughView(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = 0  # a write into the copy, through a view: removing the copy writes x
        z = x.clone()  # never written: removable
        return x + y + z * 2


def test_remove_noops_keeps_a_copy_written_through_a_view() -> None:
    x = torch.randn(2, 3)
    run = _inplace_run(CopyWrittenThroughView(), x, "remove-noops")
    assert_golden(GOLDEN / "remove_noops_written_copy.txt", run.after)
    assert run.rewrites == 2  # z's clone, and the lift_fresh_copy of the fill value (read only)
    _assert_exact_and_input_kept(run, x)


class WrittenConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = torch.arange(4.0) * 2  # weight-only, but written below: not a constant
        c.add_(x.sum())
        return x + c + self.w * 0.5  # w * 0.5 is a constant: folded


def test_fold_constants_does_not_store_a_value_that_is_written() -> None:
    x = torch.randn(2, 4)
    run = _inplace_run(WrittenConstant(), x, "fold-constants")
    assert_golden(GOLDEN / "fold_constants_written.txt", run.after)
    assert run.rewrites == 1
    _assert_exact_and_input_kept(run, x)
    for _ in range(2):  # later calls see the same values: no write landed in a stored weight
        assert torch.equal(run.after(x), run.before(x))


class WrittenDuplicates(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.clone(), x.clone()  # equal when made, but a is written: not merged
        a.add_(1)
        return a + b + x * 3 + x * 3  # the pure duplicate is merged


def test_cse_does_not_merge_a_value_that_is_written() -> None:
    x = torch.randn(2, 4)
    run = _inplace_run(WrittenDuplicates(), x, "cse")
    assert_golden(GOLDEN / "cse_written.txt", run.after)
    assert run.rewrites == 1
    _assert_exact_and_input_kept(run, x)
