"""A compiled model is never wrong, never drifts from call to call, and compile never changes
the user's data (issue 13): in-place ops, buffer updates, input writes, and passes that would
write into weights or keep state between calls."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import graphopt
from graphopt import EquivalenceError, Pass, PassResult, register_pass
from graphopt.errors import CaptureError, MutationError, PipelineError
from graphopt.ir.graph import written_roots
from graphopt.ir.rewriter import apply_rules
from graphopt.tools.cli import main
from graphopt.verification.interpreter import native_run

aten = torch.ops.aten
LEVELS = ["-O0", "-O1", "-O2", "-O3"]


class RelativeBuckets(nn.Module):
    """T5's relative-position buckets in miniature: a shape-only computation, then an in-place
    add into it. Before issue 13, fold-constants stored the computation and the add wrote into
    the stored weight on every call."""

    def __init__(self, buckets: int = 100) -> None:
        super().__init__()
        self.emb = nn.Embedding(buckets, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        rel = torch.arange(n)[None] - torch.arange(n)[:, None]
        b = (rel > 0).long() * 4
        b += torch.where(rel.abs() < 3, rel.abs(), torch.full_like(rel, 3))
        return x + self.emb(b).squeeze(-1).sum(0)


class WritesItsCopy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, 0] = 0
        return x + y


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x).sum() + self.calls


class DoublesItsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)
        return x + 1


class DecaysItsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.lin.weight.mul_(0.9)
        return self.lin(x)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"compile changed {k}: {after[k]} instead of {v}"


def _calls_match_eager(model: nn.Module, compiled: nn.Module, x: torch.Tensor, n: int = 3) -> None:
    """``n`` consecutive calls of the compiled model and of a copy of the model as it was,
    each on its own copy of ``x``: same outputs and same writes into the input."""
    eager = copy.deepcopy(model)
    x_eager, x_compiled = x.clone(), x.clone()
    for call in range(n):
        with torch.no_grad():
            want = eager(x_eager)
        got = compiled(x_compiled)
        torch.testing.assert_close(got, want, msg=lambda m, c=call: f"call {c + 1}: {m}")
        assert torch.equal(x_compiled, x_eager), f"call {call + 1}: input {x_compiled}"


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("buckets", [100, 8])  # 8: an index out of range once it drifted
def test_folded_shape_computation_written_in_place(level: str, buckets: int) -> None:
    torch.manual_seed(0)
    model, x = RelativeBuckets(buckets).eval(), torch.zeros(2, 3)
    before = _state(model)
    compiled = graphopt.compile(model, (x,), pipeline=level, on_fail="raise")
    _assert_untouched(model, before)
    assert torch.equal(x, torch.zeros(2, 3))
    _calls_match_eager(model, compiled, x)
    assert not written_roots(compiled.gm)  # functional: no node writes in place


@pytest.mark.parametrize("level", ["-O1", "-O2"])
def test_clone_written_through_a_view(level: str) -> None:
    x = torch.ones(1, 3)
    compiled = graphopt.compile(WritesItsCopy(), (x,), pipeline=level, on_fail="raise")
    assert torch.equal(x, torch.ones(1, 3)), "compile wrote into the example input"
    assert all(r.status != "rolled back" for r in compiled.report.records)
    _calls_match_eager(WritesItsCopy(), compiled, x)


@pytest.mark.parametrize("level", ["-O0", "-O1", "-O2"])
def test_buffer_update_happens_once_per_call_on_the_compiled_models_own_copy(
    level: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model, x = CountsCalls().eval(), torch.ones(2, 3)
    before = _state(model)
    compiled = graphopt.compile(model, (x,), pipeline=level, on_fail="raise")
    _assert_untouched(model, before)  # compile ran the forward many times, on copies
    _calls_match_eager(model, compiled, x)
    _assert_untouched(model, before)  # the compiled model updates its own copy
    assert float(compiled.gm.calls) == 3.0
    # save/load keeps the state where it was, and goes on from there
    path = tmp_path / "counts.graphopt"
    graphopt.save(compiled, path)
    loaded = graphopt.load(path)
    eager = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(3):
            eager(x)
        want = eager(x)
    torch.testing.assert_close(loaded(x), want)
    torch.testing.assert_close(compiled(x), want)


@pytest.mark.parametrize("level", ["-O0", "-O1", "-O2"])
def test_input_written_once_per_call(level: str) -> None:
    x = torch.full((2,), 2.0)
    compiled = graphopt.compile(DoublesItsInput(), (x,), pipeline=level, on_fail="raise")
    assert torch.equal(x, torch.full((2,), 2.0)), "compile wrote into the example input"
    _calls_match_eager(DoublesItsInput(), compiled, x)
    y = torch.full((3,), 2.0)  # another batch size: the write is still the caller's
    torch.testing.assert_close(compiled(y), torch.full((3,), 5.0))
    assert torch.equal(y, torch.full((3,), 4.0))


def test_write_into_a_parameter_is_refused_before_it_happens() -> None:
    model = DecaysItsWeight()
    before = _state(model)
    with pytest.raises(CaptureError, match=r"writes into its parameter 'lin.weight' in place"):
        graphopt.compile(model, (torch.ones(2, 3),))
    _assert_untouched(model, before)


def test_t5_encoder_at_every_level() -> None:
    import transformers  # the dev extra installs it; a missing one fails here, not skips

    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    )
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 64, (2, 12))
    before = _state(model)
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    for level in LEVELS:
        compiled = graphopt.compile(model, (ids,), pipeline=level)
        assert all(r.status != "rolled back" for r in compiled.report.records), level
        for call in range(3):
            got = compiled(ids).last_hidden_state
            where = f"{level} call {call + 1}"
            torch.testing.assert_close(got, want, msg=lambda m, w=where: f"{w}: {m}")
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_compile_leaves_every_zoo_models_data_untouched(name: str) -> None:
    model, inputs = graphopt.zoo.get(name, batch=2)
    batches = [tuple(t.clone() for t in inputs) for _ in range(2)]
    state, examples, calib = _state(model), [t.clone() for t in inputs], copy.deepcopy(batches)
    graphopt.compile(model, inputs, pipeline="-O2,int8", calibration_data=batches)
    _assert_untouched(model, state)
    assert all(torch.equal(a, b) for a, b in zip(inputs, examples))
    assert all(torch.equal(a, b) for got, want in zip(batches, calib) for a, b in zip(got, want))


# -- the pass manager fails passes that write into weights or keep state ------------------------


class AddsBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.randn(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bias)


def _add_in_place(node: torch.fx.Node, rw: graphopt.Rewriter) -> bool:
    x, w = node.args
    if not (isinstance(w, torch.fx.Node) and w.op == "get_attr"):
        return False
    rw.replace(node, rw.call(aten.add_.Tensor, (w, x), before=node, sources=[node]))
    return True


@register_pass
@dataclass(frozen=True)
class PlantedWeightWrite(Pass):
    """add(x, w) -> add_(w, x): the right value once, and a weight that grows on every call."""

    name = "test-planted-weight-write"

    def run(self, gm, ctx):  # type: ignore[no-untyped-def]
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.add.Tensor,), _add_in_place)], rw)
        return PassResult(rw.rewrites > 0)


_DRIFT = [0.0]


@torch.library.custom_op("graphopt_test::drifting_relu", mutates_args=())
def drifting_relu(x: torch.Tensor) -> torch.Tensor:
    """A kernel with hidden state: its schema says pure, but each call returns a bit more."""
    _DRIFT[0] += 1.0
    return torch.relu(x) + _DRIFT[0]


@drifting_relu.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _drift(node: torch.fx.Node, rw: graphopt.Rewriter) -> bool:
    new = rw.call(
        torch.ops.graphopt_test.drifting_relu.default, node.args, before=node, sources=[node]
    )
    rw.replace(node, new)
    return True


@register_pass
@dataclass(frozen=True)
class PlantedHiddenState(Pass):
    name = "test-planted-hidden-state"

    def run(self, gm, ctx):  # type: ignore[no-untyped-def]
        rw = ctx.rewriter(gm)
        apply_rules(gm, [((aten.relu.default,), _drift)], rw)
        return PassResult(rw.rewrites > 0)


def test_pass_that_writes_a_weight_is_rolled_back_before_it_runs() -> None:
    model, x = AddsBias(), torch.randn(2, 3)
    before = _state(model)
    with pytest.raises(EquivalenceError) as info:
        graphopt.compile(
            model, (x,), pipeline="test-planted-weight-write", on_fail="raise", dynamic_batch=False
        )
    assert info.value.kind == "mutation" and info.value.op == "aten.add_.Tensor"
    assert "writing into the weight 'bias' in place" in str(info.value)
    with pytest.warns(graphopt.EquivalenceWarning, match="writing into the weight"):
        compiled = graphopt.compile(
            model, (x,), pipeline="test-planted-weight-write", dynamic_batch=False
        )
    assert compiled.report.records[0].status == "rolled back"
    _assert_untouched(model, before)
    _calls_match_eager(model, compiled, x)


def test_pass_that_makes_the_graph_stateful_fails_its_contract() -> None:
    model, x = AddsBias(), torch.randn(2, 3)
    with pytest.raises(EquivalenceError) as info:
        graphopt.compile(
            model, (x,), pipeline="test-planted-hidden-state", on_fail="raise", dynamic_batch=False
        )
    assert info.value.kind == "state"
    assert info.value.op == "graphopt_test.drifting_relu.default"
    assert "two runs on fresh copies of the same inputs give different values" in str(info.value)


def _same_tensor(t: torch.Tensor) -> torch.Tensor:
    """Returns its argument; having no schema, it hides the alias from the graph analysis."""
    return t


@pytest.mark.parametrize(
    "op, what", [("get_attr", "the weight 'bias'"), ("placeholder", "graph input 0")]
)
def test_interpreter_stops_a_hidden_write_before_it_happens(op: str, what: str) -> None:
    gm = torch.fx.symbolic_trace(AddsBias())
    graph = gm.graph
    target = next(n for n in graph.nodes if n.op == op)
    with graph.inserting_before(graph.output_node()):  # a write the alias analysis cannot see
        hidden = graph.call_function(_same_tensor, (target,))
        graph.call_function(torch.ops.aten.mul_.Tensor, (hidden, 2.0))
    gm.recompile()
    x = torch.randn(2, 3)
    bias, x_before = gm.bias.clone(), x.clone()
    with pytest.raises(MutationError, match=f"writes into {what}"):
        native_run(gm, [x])
    assert torch.equal(gm.bias, bias) and torch.equal(x, x_before)


# -- the pipeline parser reads everything or refuses ------------------------------------------


@pytest.mark.parametrize(
    "text, where",
    [
        ("-O2 int8", "unexpected 'int8' at column 5"),
        ("cleanup dce", "unexpected 'dce' at column 9"),
        ("fixpoint(cse dce)", "unexpected 'dce' at column 14"),
        ("int8{calib=minmax dce}", "unexpected 'dce' at column 19 in the options of 'int8'"),
        ("int8{calib=minmax", "unexpected end of text at column 18"),
    ],
)
def test_parser_refuses_what_it_does_not_consume(text: str, where: str) -> None:
    with pytest.raises(PipelineError, match=where):
        graphopt.parse_pipeline(text)


def test_cli_refuses_a_pipeline_with_a_space(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "mlp", "--pipeline", "-O1 int8{measure=false}"]) == 2
    printed = " ".join(capsys.readouterr().out.split())  # the CLI wraps long lines
    assert "unexpected 'int8' at column 5; separate passes with ','" in printed
