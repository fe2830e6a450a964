"""A deliberately wrong pass is caught, localized, rolled back by default, raised on request."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.fx import GraphModule, Node

import graphopt
from graphopt import Contract, Pass, PassResult, register_pass
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.pipeline.passes import PassContext

aten = torch.ops.aten


def _add_to_sub(node: Node, rw: Rewriter) -> bool:
    # add(a, b) -> sub(a, b): wrong on purpose
    new = rw.call(aten.sub.Tensor, node.args, before=node, sources=[node])
    rw.replace(node, new)
    return True


@register_pass
@dataclass(frozen=True)
class BadAddToSub(Pass):
    """Turns every add into a sub (a broken 'rounding' pass, for tests)."""

    name = "test-bad-add"
    contract = Contract.rounding()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.add.Tensor,), _add_to_sub)], rw)
        return PassResult(rw.rewrites > 0)


def _scale(factor: float):  # type: ignore[no-untyped-def]
    def rule(node: Node, rw: Rewriter) -> bool:
        # mul(x, c) -> mul(x, c * factor)
        new = rw.call(
            aten.mul.Tensor, (node.args[0], node.args[1] * factor), before=node, sources=[node]
        )
        rw.replace(node, new)
        return True

    return rule


@register_pass
@dataclass(frozen=True)
class NudgeMul(Pass):
    """Scales the constant of every mul by ``factor``; declared exact (wrong unless factor=1)."""

    name = "test-nudge-mul"
    contract = Contract.exact()
    factor: float = 1.0000001

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.mul.Tensor,), _scale(self.factor))], rw)
        return PassResult(rw.rewrites > 0)


@register_pass
@dataclass(frozen=True)
class LossyNudge(NudgeMul):
    """The same rewrite under a lossy cosine budget taken from the options."""

    name = "test-lossy-nudge"
    min_cosine: float = 0.999

    def contract_for(self) -> Contract:
        return Contract.lossy("cosine", self.min_cosine)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.fc(x)) * 3.0
        z = torch.tanh(y)
        return z + 0.5 * y  # the add the bad pass breaks; the mul before it stays right


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(4, 6, generator=torch.Generator().manual_seed(0)),)


def test_wrong_pass_is_rolled_back_by_default() -> None:
    model = Net().eval()
    with pytest.warns(graphopt.EquivalenceWarning, match="test-bad-add"):
        compiled = graphopt.compile(model, _inputs(), pipeline="test-bad-add")
    record = compiled.report.records[0]
    assert record.status == "rolled back" and record.rewrites == 0
    assert "%sub" in record.message
    x = torch.randn(3, 6)
    assert torch.allclose(compiled(x), model(x), rtol=0, atol=0)
    assert not [n for n in compiled.gm.graph.nodes if n.target == aten.sub.Tensor]


def test_wrong_pass_raises_with_the_node_it_changed() -> None:
    with pytest.raises(graphopt.EquivalenceError) as info:
        graphopt.compile(Net().eval(), _inputs(), pipeline="test-bad-add", on_fail="raise")
    err = info.value
    assert err.pass_name == "test-bad-add"
    assert err.op == "aten.sub.Tensor"
    assert err.origin == "add"  # the add of the captured graph it replaced
    assert err.node is not None and err.node.startswith("sub")
    assert err.kind == "local"
    assert err.metrics["error"] > err.metrics["allowed"]
    assert "First diverging node: %sub" in str(err) and "rounding" in str(err)


def test_downstream_of_a_wrong_node_is_inherited_not_blamed() -> None:
    # Only the first mul is nudged (max_rewrites=1); the tanh/add after it diverge by inheritance.
    with pytest.raises(graphopt.EquivalenceError) as info:
        graphopt.compile(
            Net().eval(),
            _inputs(),
            pipeline="test-nudge-mul{factor=1.5}",
            on_fail="raise",
            max_rewrites=1,
        )
    assert info.value.origin == "mul" and info.value.kind == "local"


def test_exact_contract_catches_a_one_ulp_change() -> None:
    with pytest.raises(graphopt.EquivalenceError, match="differs bitwise"):
        graphopt.compile(Net().eval(), _inputs(), pipeline="test-nudge-mul", on_fail="raise")


def test_exact_pass_that_is_right_passes() -> None:
    compiled = graphopt.compile(Net().eval(), _inputs(), pipeline="test-nudge-mul{factor=1.0}")
    assert compiled.report.records[0].status == "ok"


def test_lossy_budget_is_judged_and_reported() -> None:
    ok = graphopt.compile(Net().eval(), _inputs(), pipeline="test-lossy-nudge{factor=1.001}")
    record = ok.report.records[0]
    assert record.status == "ok" and record.contract == "lossy(cosine=0.999)"
    assert 0.999 <= record.spent["cosine"] < 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = graphopt.compile(
            Net().eval(), _inputs(), pipeline="test-lossy-nudge{factor=-1.0,min_cosine=0.99}"
        )
    assert bad.report.records[0].status == "rolled back"
    assert "cosine" in bad.report.records[0].message


def test_verify_false_skips_checking() -> None:
    compiled = graphopt.compile(Net().eval(), _inputs(), pipeline="test-bad-add", verify=False)
    assert compiled.report.records[0].status == "ok"  # nothing checked it: the user opted out
    assert compiled.report.records[0].error is None


def test_rounding_allows_reordering_within_twice_the_baseline_error() -> None:
    from graphopt.verification.metrics import rounding_floor

    assert rounding_floor(torch.float32) == 1e-5
    assert rounding_floor(torch.float16) > rounding_floor(torch.float32)
    assert math.isinf(graphopt.verification.metrics.sqnr(torch.ones(3), torch.ones(3)))


def _drop_add_zero(node: Node, rw: Rewriter) -> bool:
    # add(x, 0.0) -> x: wrong for x = -0.0 (gives -0.0 instead of +0.0)
    if node.args[1] != 0.0:
        return False
    rw.replace(node, node.args[0])
    return True


@register_pass
@dataclass(frozen=True)
class DropAddZero(Pass):
    name = "test-drop-add-zero"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.add.Tensor,), _drop_add_zero)], rw)
        return PassResult(rw.rewrites > 0)


class NegZero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.relu(x) + 0.0


def test_exact_contract_sees_the_sign_of_zero() -> None:
    x = (torch.arange(8.0) - 4).reshape(2, 4)  # relu gives zeros, negated to -0.0
    with pytest.raises(graphopt.EquivalenceError, match="differs bitwise"):
        graphopt.compile(NegZero(), (x,), pipeline="test-drop-add-zero", on_fail="raise")


def _drop_clone(node: Node, rw: Rewriter) -> bool:
    # clone(x) -> x: wrong when the clone is returned (output would alias the input)
    rw.replace(node, node.args[0])
    return True


@register_pass
@dataclass(frozen=True)
class DropEveryClone(Pass):
    name = "test-drop-every-clone"
    contract = Contract.exact()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.clone.default,), _drop_clone)], rw)
        return PassResult(rw.rewrites > 0)


class ReturnsCopy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def test_new_aliasing_is_caught_even_when_values_are_equal() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(graphopt.EquivalenceError, match="share memory with graph input 0") as info:
        graphopt.compile(ReturnsCopy(), (x,), pipeline="test-drop-every-clone", on_fail="raise")
    assert info.value.kind == "aliasing"
    with pytest.warns(graphopt.EquivalenceWarning):
        compiled = graphopt.compile(ReturnsCopy(), (x,), pipeline="test-drop-every-clone")
    assert compiled(x).data_ptr() != x.data_ptr()


@register_pass
@dataclass(frozen=True)
class Crashes(Pass):
    name = "test-crashes"

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise KeyError("missing thing")


def test_a_crashing_pass_is_rolled_back_or_raised() -> None:
    model, x = Net().eval(), _inputs()
    with pytest.warns(graphopt.EquivalenceWarning, match="test-crashes' crashed with KeyError"):
        compiled = graphopt.compile(model, x, pipeline="test-crashes,dce")
    assert [r.status for r in compiled.report.records] == ["rolled back", "unchanged"]
    torch.testing.assert_close(compiled(*x), model(*x))
    with pytest.raises(graphopt.PassError, match="crashed with KeyError: 'missing thing'"):
        graphopt.compile(model, x, pipeline="test-crashes", on_fail="raise")
