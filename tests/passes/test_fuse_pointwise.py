"""fuse-pointwise: fusion analysis (groups, cycles, escaping values), golden IR, counts, and
the generated kernel of every group it forms against the group's ATen reference."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from graphopt.ops.fused import program_of
from graphopt.passes.lib.fusion import example_like, merge_makes_cycle, node_dag, partition
from graphopt.testing import assert_golden, assert_rounding, run_pipeline

GOLDEN = Path(__file__).parent / "golden"
PASS = "fuse-pointwise{measure=false}"


class Chains(nn.Module):
    """A pointwise chain with broadcasting, an escaping intermediate, a matmul that splits
    two groups, and a hand-written layernorm-like row reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = x * 2.0 + self.b  # group 1
        s = torch.sigmoid(a) * a  # group 1; `a` also escapes to the matmul
        m = s @ self.w
        c = torch.relu(m - a)  # group 2 reads `a` (escaping from group 1)
        mu = c.mean(-1, keepdim=True)
        d = c - mu
        y = d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5)  # group 2: row reduction
        return y, s, torch.tanh(m)


def test_golden_and_counts() -> None:
    run = run_pipeline(Chains(), (torch.randn(4, 6),), PASS)
    assert_golden(GOLDEN / "fuse_pointwise.txt", run.after)
    log = run.report.records[0].rules["pointwise"]
    assert log.applied == 2
    fused = [n for n in run.after.graph.nodes if n.target == torch.ops.graphopt.fused.default]
    assert len(fused) == 2
    assert [len(program_of(n.args[1]).calls) for n in fused] == [4, 9]
    assert_rounding(run)


def test_generated_kernels_match_their_reference() -> None:
    """Every group the pass forms runs through its generated kernel (Triton's interpreter
    here, the GPU there) and matches the group's ATen decomposition."""
    from graphopt.kernels import codegen

    run = run_pipeline(Chains(), (torch.randn(4, 6),), PASS)
    for node in run.after.graph.nodes:
        if node.target != torch.ops.graphopt.fused.default:
            continue
        program = program_of(node.args[1])
        inputs = [example_like(a.meta["val"], seed=i) for i, a in enumerate(node.args[0])]
        assert codegen.why_not(program, inputs) is None
        for got, want in zip(codegen.run(program, inputs), program.run(inputs)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_that_would_close_a_cycle_is_refused() -> None:
    """c = relu(a) + matmul(a): c may not join a's group, the matmul sits between them."""

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = torch.exp(x)
            return torch.relu(a) + a @ self.w

    run = run_pipeline(M(), (torch.randn(3, 3),), "cleanup")
    gm = run.after
    nodes = {n.name: n for n in gm.graph.nodes}
    dag = node_dag(gm)
    assert merge_makes_cycle(dag, {nodes["exp"]}, nodes["add"])
    assert not merge_makes_cycle(dag, {nodes["exp"]}, nodes["relu"])
    pointwise = {"exp", "relu", "add"}
    groups = partition(gm, lambda n: n.name in pointwise, lambda g, n: None)
    names = [[n.name for n in g] for g in groups]
    assert names == [["exp", "relu"], ["add"]]


def test_unsupported_op_is_a_recorded_near_miss() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(torch.exp(x) * 2.0, dim=0)  # cumsum has no generated form

    run = run_pipeline(M(), (torch.randn(3, 5),), PASS)
    log = run.report.records[0].rules["pointwise"]
    assert log.applied == 1  # exp * 2 fuses; cumsum stays ATen
    assert any(n.target == torch.ops.aten.cumsum.default for n in run.after.graph.nodes)


def test_reduction_over_a_middle_dim_is_not_merged() -> None:
    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.exp(x).sum(1, keepdim=True) * 3.0

    run = run_pipeline(M(), (torch.randn(2, 3, 4),), PASS)
    log = run.report.records[0].rules["pointwise"]
    assert log.applied == 0 and log.missed >= 1
    assert "last dim" in log.misses[0][1]
