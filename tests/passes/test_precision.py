"""precision: golden IR, cast and rewrite counts, error within the compute dtype's contract,
an unchanged fp32 interface, metadata that matches what runs, and the zoo end to end."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt import Contract, PipelineError, zoo
from graphopt.frontends.capture import capture
from graphopt.ir.graph import format_graph, propagate_meta, tensor_val
from graphopt.pipeline.parse import parse_pipeline
from graphopt.testing import PassRun, assert_golden, assert_rounding, run_pipeline
from graphopt.verification.interpreter import native_run
from graphopt.verification.verify import Verifier

GOLDEN = Path(__file__).parent / "golden"
aten = torch.ops.aten
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Block(nn.Module):
    """linear -> layer_norm -> gelu -> linear, then a softmax and a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.fc2(F.gelu(self.ln(self.fc1(x))))
        return y.softmax(-1), y.sum(-1)


def _block() -> nn.Module:
    torch.manual_seed(0)
    return Block().eval()


def _x() -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(1))


def _casts(run: PassRun) -> list[torch.dtype]:
    return [n.kwargs["dtype"] for n in run.after.graph.nodes if n.target == aten._to_copy.default]


def _assert_interface_kept(run: PassRun) -> None:
    def types(gm: torch.fx.GraphModule, op: str) -> list[tuple[object, ...]]:
        nodes = [n for n in gm.graph.nodes if n.op == op]
        if op == "output":
            nodes = list(nodes[0].args[0])
        return [(v.dtype, [str(d) for d in v.shape]) for v in map(tensor_val, nodes)]

    for op in ("placeholder", "output"):
        assert types(run.after, op) == types(run.before, op)


def _assert_meta_matches_run(run: PassRun) -> None:
    """Every value's meta["val"] has the dtype that running the node gives."""
    _, values = native_run(run.after, run.inputs, record=True)
    for node in run.after.graph.nodes:
        if node.op == "output":
            continue
        vals, real = node.meta.get("val"), values.get(node.name)
        if isinstance(real, torch.Tensor):
            assert vals.dtype == real.dtype, node.name
        elif isinstance(real, (list, tuple)):
            assert [v.dtype for v in vals] == [r.dtype for r in real], node.name


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_block_golden(dtype: str) -> None:
    model = _block()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    run = run_pipeline(model, (_x(),), f"precision{{dtype={dtype}}}")
    assert_golden(GOLDEN / f"precision_{dtype}.txt", run.after)
    half = HALF[dtype]
    # linear, gelu, linear go to half; the input is cast down, the layer norm's input up and
    # its result down, fc2's result up (read by softmax and sum, whose fp32 results are returned)
    assert run.rewrites == 3
    assert _casts(run) == [half, torch.float32, half, torch.float32]
    assert run.report.records[0].stats == {
        "half_ops": 3,
        "fp32_ops": 3,
        "casts": 4,
        "half_weights": 4,
    }
    assert str(run.report.records[0].contract) == f"rounding({half})".replace("torch.", "")
    assert_rounding(run, half)
    _assert_interface_kept(run)
    _assert_meta_matches_run(run)
    # the model's own weights are untouched and stay fp32
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, weights[key])


def test_norm_weights_stay_fp32_and_are_read_in_fp32() -> None:
    run = run_pipeline(_block(), (_x(),), "precision")
    ln = next(n for n in run.after.graph.nodes if n.target == aten.layer_norm.default)
    assert [tensor_val(a).dtype for a in ln.all_input_nodes] == [torch.float32] * 3
    # propagate_meta over the whole graph agrees with what the rewriter recorded
    text = format_graph(run.after)
    propagate_meta(run.after)
    assert format_graph(run.after) == text


class MaskAndRanges(nn.Module):
    """Integer inputs and ops that create fp32 values from a dtype argument."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        bias = (1.0 - mask.to(torch.float32)) * -1e4  # to.dtype -> half
        pos = torch.arange(6, dtype=torch.float32)  # arange(dtype=f32) -> half
        y = self.fc(x) + bias + pos
        weights = mask.to(torch.float32).softmax(-1)  # read only by softmax: stays fp32
        return y, weights, mask.sum(-1) + 1


def test_dtype_arguments_int_values_and_fp32_consumers() -> None:
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 3)
    run = run_pipeline(MaskAndRanges().eval(), (x, mask), "precision{dtype=bf16}")
    nodes = list(run.after.graph.nodes)
    to_dtypes = [n.args[1] for n in nodes if n.target == aten.to.dtype]
    assert sorted(map(str, to_dtypes)) == ["torch.bfloat16", "torch.float32"]
    arange = next(n for n in nodes if "arange" in str(n.target))
    assert arange.kwargs["dtype"] == torch.bfloat16
    softmax = next(n for n in nodes if n.target == aten.softmax.int)
    assert tensor_val(softmax.args[0]).dtype == torch.float32  # no round trip through bf16
    misses = run.report.records[0].rules["half"].misses
    assert [why for _, why in misses] == [
        "creates float32 values that only fp32 ops or outputs read"
    ]
    before, after = run.outputs()
    assert torch.equal(after[2], before[2])  # the integer path is untouched
    assert_rounding(run, torch.bfloat16)
    _assert_interface_kept(run)
    _assert_meta_matches_run(run)


def test_keep_fp32_option_and_near_misses() -> None:
    run = run_pipeline(_block(), (_x(),), "precision{keep_fp32=gelu+linear}")
    assert run.rewrites == 0  # every op the block has is kept or accumulates in fp32
    log = run.report.records[0].rules["half"]
    assert log.missed == 3 and log.misses[0][1] == "kept in fp32 by the keep_fp32 option"
    assert "kept in fp32 by the keep_fp32 option" in run.report.to_text()
    only_gelu = run_pipeline(_block(), (_x(),), "precision{keep_fp32=gelu}")
    gelu = next(n for n in only_gelu.after.graph.nodes if n.target == aten.gelu.default)
    assert tensor_val(gelu).dtype == torch.float32
    assert only_gelu.rewrites == 2
    assert_rounding(only_gelu, torch.float16)


def test_budget_stops_between_rewrites_with_a_well_typed_graph() -> None:
    run = run_pipeline(_block(), (_x(),), "precision", max_rewrites=1)
    assert run.rewrites == 1
    first = next(n for n in run.after.graph.nodes if n.target == aten.linear.default)
    assert tensor_val(first).dtype == torch.float16
    assert [tensor_val(n).dtype for n in run.after.graph.nodes if n.op == "call_function"][
        -1
    ] == torch.float32
    assert_rounding(run, torch.float16)
    _assert_meta_matches_run(run)


class Overflow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 1e5) * 1e-5  # 1e5 is past fp16's largest value (65504)


def test_overflow_breaks_the_contract_and_rolls_back() -> None:
    x = torch.full((2, 3), 2.0)
    with pytest.warns(graphopt.EquivalenceWarning, match="rounding\\(float16\\)"):
        compiled = graphopt.compile(Overflow(), (x,), pipeline="precision")
    assert compiled.report.records[0].status == "rolled back"
    assert torch.equal(compiled(x), Overflow()(x))
    bf16 = graphopt.compile(Overflow(), (x,), pipeline="precision{dtype=bf16}")  # bf16's range
    assert bf16.report.records[0].status == "ok"


def test_mutating_graph_is_left_alone() -> None:
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("count", torch.zeros(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.count.add_(1.0)
            return x * self.count

    run = run_pipeline(Counter(), (torch.randn(2, 3),), "precision")
    assert run.rewrites == 0
    why = run.report.records[0].rules["half"].misses[0][1]
    assert why.startswith("the graph updates state on every call (buffer count)")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("precision{dtype=fp8}", "valid values: fp16, float16, bf16, bfloat16"),
        ("precision{dtype=float32}", "is not a half-precision dtype"),
        ("precision{keep_fp32=gelu+no_such_op}", "'no_such_op', not ATen ops"),
        ("precision{min_cosine=2}", "must be in [0, 1]"),
    ],
)
def test_bad_options(text: str, message: str) -> None:
    with pytest.raises(PipelineError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_pipeline(text)


def test_options_and_contract() -> None:
    (p,) = parse_pipeline("precision{dtype=BFloat16,min_cosine=0.999}")
    assert p.spec() == "precision{dtype=BFloat16,min_cosine=0.999}"
    assert p.contract_for() == Contract.lossy("cosine", 0.999)
    (default,) = parse_pipeline("precision")
    assert default.contract_for() == Contract.rounding(torch.float16)


# -- Contract.rounding(dtype): the floor of the dtype the graph computes in ----------------------


def test_rounding_contract_with_a_compute_dtype() -> None:
    assert Contract.rounding(torch.bfloat16) == Contract.rounding("bfloat16")
    assert str(Contract.rounding(torch.float16)) == "rounding(float16)"
    assert str(Contract.rounding()) == "rounding"
    assert len({Contract.rounding(torch.float16), Contract.rounding("float16")}) == 1  # hashable
    with pytest.raises(PipelineError, match="use one of float16, bfloat16"):
        Contract.rounding(torch.int8)

    gm = capture(nn.Tanh(), (torch.randn(4, 5),))
    x = torch.linspace(-2, 2, 20).reshape(4, 5)
    verifier = Verifier(gm, [x])
    exact = torch.tanh(x)
    off = exact + 1e-3 * exact.abs().max()  # fp32 outputs, 1e-3 relative error: fp16-sized
    assert not verifier.judge(Contract.rounding(), [exact], [off]).ok  # fp32 floor: 1e-5
    verdict = verifier.judge(Contract.rounding(torch.float16), [exact], [off])
    assert verdict.ok and verdict.metrics["allowed"] == pytest.approx(2e-3)
    worse = exact + 3e-3 * exact.abs().max()
    verdict = verifier.judge(Contract.rounding(torch.float16), [exact], [worse])
    assert not verdict.ok and "floor 0.002 for torch.float16" in verdict.detail
    assert verifier.judge(Contract.rounding(torch.bfloat16), [exact], [worse]).ok


# -- the zoo end to end ------------------------------------------------------------------------

ZOO = {
    "resnet": {"batch": 2, "image": 8},  # fp16 convolution is slow on the CPU
    "mobilenet": {"batch": 2, "image": 8},
    "bert": {"batch": 2, "seq": 16},
    "gpt": {"batch": 2, "seq": 16},
    "mlp": {"batch": 4},
}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_lowers_within_the_contract(name: str, dtype: str) -> None:
    model, inputs = zoo.get(name, **ZOO[name])
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.EquivalenceWarning)
        compiled = graphopt.compile(model, inputs, pipeline=f"-O1,precision{{dtype={dtype}}}")
    record = compiled.report.records[-1]
    assert record.name == "precision" and record.status == "ok", record.message
    assert record.spent["error"] <= record.spent["allowed"]
    assert record.stats["half_ops"] > 0
    half_weights = [b for b in compiled.gm.buffers() if b.dtype == HALF[dtype]]
    assert len(half_weights) == record.stats["half_weights"]
    with torch.no_grad():
        expected, got = model(*inputs), compiled(*inputs)
    for e, g in zip(
        torch.utils._pytree.tree_leaves(expected), torch.utils._pytree.tree_leaves(got)
    ):
        assert g.dtype == e.dtype == torch.float32 and g.shape == e.shape
    for key, value in model.state_dict().items():  # the user's model is not touched
        assert value.dtype == weights[key].dtype and torch.equal(value, weights[key])
