"""Pipeline parsing, user-registered passes, the rewriter, and the float64 interpreter."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

import graphopt
from graphopt import FixedPoint, Pass, PassResult, register_pass
from graphopt.pipeline.passes import PassContext
from graphopt.verification.interpreter import Runner, native_run, reference_run


def test_parse_options_groups_and_fixpoint() -> None:
    items = graphopt.parse_pipeline("cleanup,fold-constants{max_bytes=1024},fixpoint(cse,dce)")
    assert isinstance(items[0], FixedPoint) and items[0].name == "cleanup"
    assert [p.name for p in items[0].passes] == ["remove-noops", "fold-constants", "cse", "dce"]
    assert items[1].max_bytes == 1024  # type: ignore[union-attr]
    assert isinstance(items[2], FixedPoint) and [p.name for p in items[2].passes] == ["cse", "dce"]
    specs = ",".join(item.spec() for item in items)
    assert specs == "cleanup,fold-constants{max_bytes=1024},fixpoint(cse,dce)"
    assert [i.spec() for i in graphopt.parse_pipeline(specs)] == [i.spec() for i in items]


@register_pass
@dataclass(frozen=True)
class CountRelu(Pass):
    """A user pass that changes nothing and reports a statistic."""

    name = "test-count-relu"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        n = sum(1 for node in gm.graph.nodes if node.target == torch.ops.aten.relu.default)
        return PassResult(False, {"relus": n})


def test_user_pass_by_name_and_by_object() -> None:
    model, x = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.ReLU()), (torch.randn(2, 3),)
    by_name = graphopt.compile(model, x, pipeline="test-count-relu")
    by_object = graphopt.compile(model, x, pipeline=[CountRelu(), "dce"])
    assert by_name.report.records[0].stats == {"relus": 2}
    assert [r.name for r in by_object.report.records] == ["test-count-relu", "dce"]
    assert "test-count-relu" in graphopt.registered_passes()


def test_group_members_count_their_own_nodes_and_weights() -> None:
    """Inside a group each row counts what that pass changed, not the group's final count, and
    a pass that only drops weights says so."""
    from graphopt import zoo
    from graphopt.frontends.capture import capture
    from graphopt.ir.graph import count_op_nodes, count_weights

    model, inputs = zoo.get("resnet", batch=2)  # fold-bn leaves batch-norm weights to dce
    compiled = graphopt.compile(model, inputs, pipeline="-O2")
    captured = capture(model, inputs)
    records = compiled.report.records
    for r in records:
        if r.rewrites == 0:  # changed nothing: its row shows no change
            assert (r.nodes_before, r.weights_before) == (r.nodes_after, r.weights_after), r
    # the rows add up to the whole change
    assert sum(r.nodes_after - r.nodes_before for r in records) == count_op_nodes(
        compiled.gm
    ) - count_op_nodes(captured)
    assert sum(r.weights_after - r.weights_before for r in records) == count_weights(
        compiled.gm
    ) - count_weights(captured)
    weights_only = [r for r in records if r.weights_after != r.weights_before]
    assert weights_only and all("weights " in r.nodes_text() for r in weights_only)


def test_report_records_timing_and_nodes() -> None:
    # seeded: with an unlucky draw, cancellation in a 3-term dot product makes the largest
    # output tiny and the fp32 error relative to it exceeds 1e-6 (a flaky failure seen once)
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.ReLU()), (torch.randn(2, 3),)
    compiled = graphopt.compile(model, x, pipeline="remove-noops")
    record = compiled.report.records[0]
    assert record.time_s > 0 and record.verify_s > 0
    assert (record.nodes_before, record.nodes_after, record.rewrites) == (3, 2, 1)
    assert record.error is not None and record.error < 1e-6
    assert "remove-noops" in compiled.report.to_text()


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.to(torch.float16).to(torch.float32)) * 3


def test_reference_run_is_float64_even_through_dtype_casts() -> None:
    x = torch.randn(2, 4)
    gm = graphopt.capture(Mixed(), (x,))
    ref_out, ref_values = reference_run(gm, [x])
    assert ref_out[0].dtype == torch.float64
    assert all(
        v.dtype == torch.float64
        for v in ref_values.values()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    )
    nat_out, _ = native_run(gm, [x])
    assert nat_out[0].dtype == torch.float32
    # the native run went through float16, the reference did not
    assert 0 < (nat_out[0].double() - ref_out[0]).abs().max() < 1e-1


def test_run_one_evaluates_a_node_on_given_inputs() -> None:
    x = torch.randn(2, 4)
    gm = graphopt.capture(Mixed(), (x,))
    runner = Runner(gm, record=True)
    runner.run_graph([x])
    mul = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    fed = {n.name: torch.ones(2, 4) for n in mul.all_input_nodes}
    assert torch.equal(runner.run_one(mul, fed), torch.full((2, 4), 3.0))


def test_propagate_meta_recomputes_every_value() -> None:
    from graphopt import zoo

    model, inputs = zoo.get("gpt", batch=2)
    gm = graphopt.capture(model, inputs)
    expected = graphopt.format_graph(gm)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            del node.meta["val"]
    graphopt.propagate_meta(gm)
    assert graphopt.format_graph(gm) == expected  # shapes (symbolic batch too) and dtypes
