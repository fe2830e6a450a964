"""Property tests: the exact cleanup passes keep random small models' outputs bitwise equal.

Hypothesis draws a small "program" of elementwise, no-op, linear/conv, weight-only, duplicated
and dead operations over one shape family ([B, 8] or [B, 4, 6, 6]); a module interprets it, is
captured with a dynamic batch, optimized, and compared bit for bit with the captured graph (on
the example input and on a fresh input with another batch size) and with the eager model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import graphopt

aten = torch.ops.aten
EXACT_PASSES = ["dce", "cse", "fold-constants", "remove-noops"]
CLEANUP = "fixpoint(remove-noops,fold-constants,cse,dce)"
UNARY = ["relu", "sigmoid", "tanh", "neg", "mul1", "clone", "detach", "dropout", "contiguous",
         "to_same", "reshape_same", "transpose_rt", "layer"]
BINARY = ["add", "mul", "sub"]
PURE = ["relu", "sigmoid", "tanh", "neg", "mul1", "add", "mul", "sub"]
CONSTS = ["scale", "double", "tanh", "flip", "weight"]
FAMILIES = {"linear": (8,), "conv": (4, 6, 6)}
PROPS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Op:
    kind: str  # UNARY, BINARY, "dup", "const" or "dead"
    args: tuple[int, ...]  # indices of earlier values
    sub: str = ""  # dup: the duplicated PURE op; const: the CONSTS expression


@dataclass(frozen=True)
class Program:
    family: str
    ops: tuple[Op, ...]
    outputs: tuple[int, ...]
    batch: int
    batch2: int
    seed: int

    def dead_scalars(self) -> list[float]:
        return [dead_scale(i) for i, op in enumerate(self.ops) if op.kind == "dead"]


def dead_scale(i: int) -> float:
    return 3.0 + 0.125 * i  # unique per op: nothing but dce can remove a dead op


@st.composite
def programs(draw: st.DrawFn) -> Program:
    n_values, ops = 1, []
    for _ in range(draw(st.integers(2, 8))):
        kind = draw(st.sampled_from(UNARY * 2 + BINARY * 2 + ["dup", "const", "dead"]))
        sub = draw(st.sampled_from(PURE if kind == "dup" else CONSTS)) if kind in ("dup", "const") else ""
        arity = 2 if kind in BINARY or sub in BINARY else 1
        args = tuple(draw(st.integers(0, n_values - 1)) for _ in range(arity))
        ops.append(Op(kind, args, sub))
        n_values += {"dup": 2, "dead": 0}.get(kind, 1)
    extra = draw(st.lists(st.integers(0, n_values - 1), max_size=2))
    batch = draw(st.integers(2, 4))
    batch2 = draw(st.integers(2, 6).filter(lambda b: b != batch))
    return Program(draw(st.sampled_from(sorted(FAMILIES))), tuple(ops),
                   (n_values - 1, *extra), batch, batch2, draw(st.integers(0, 2**16)))


class ProgramModule(nn.Module):
    """Interprets a Program; a plain loop over a fixed list, so torch.export traces it."""

    def __init__(self, program: Program) -> None:
        super().__init__()
        self.program = program
        conv = program.family == "conv"
        shape = (4, 1, 1) if conv else (8,)
        self.layers = nn.ModuleList(
            nn.Conv2d(4, 4, 3, padding=1) if conv else nn.Linear(8, 8) for _ in program.ops
        )
        self.p = nn.ParameterList(nn.Parameter(torch.randn(shape)) for _ in program.ops)
        self.w = nn.ParameterList(
            nn.Parameter(torch.randn((4, 4, 1, 1) if conv else (8, 8))) for _ in program.ops
        )
        self.drop = nn.Dropout(0.5)

    def const(self, i: int, v: torch.Tensor, sub: str) -> torch.Tensor:
        p, w = self.p[i], self.w[i]
        if sub == "weight":  # a transformed weight feeding a matmul / conv
            return F.conv2d(v, w * 0.5) if self.program.family == "conv" else v @ (w.t() * 0.5)
        c = {"scale": lambda: p * 2, "double": lambda: p + p, "tanh": lambda: p.tanh(),
             "flip": lambda: p.flip(0) * 0.5}[sub]()
        return v * c if i % 2 else v + c

    def unary(self, i: int, kind: str, v: torch.Tensor) -> torch.Tensor:
        if kind == "transpose_rt":  # same shape, non-contiguous strides
            return v.transpose(-1, -2).contiguous().transpose(-1, -2)
        table: dict[str, Any] = {
            "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "neg": torch.neg,
            "mul1": lambda t: t * 1.0, "clone": torch.clone, "detach": torch.Tensor.detach,
            "dropout": self.drop, "contiguous": torch.Tensor.contiguous,
            "to_same": lambda t: t.to(t.dtype), "reshape_same": lambda t: t.reshape(t.shape),
            "layer": self.layers[i],
        }
        return table[kind](v)

    def apply(self, i: int, kind: str, a: list[torch.Tensor]) -> torch.Tensor:
        if kind in BINARY:
            return {"add": torch.add, "mul": torch.mul, "sub": torch.sub}[kind](a[0], a[1])
        return self.unary(i, kind, a[0])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        vals = [x]
        for i, op in enumerate(self.program.ops):
            a = [vals[j] for j in op.args]
            if op.kind == "dead":
                torch.sigmoid(a[0] * dead_scale(i))  # computed, never used
            elif op.kind == "dup":
                vals += [self.apply(i, op.sub, a), self.apply(i, op.sub, a)]
            elif op.kind == "const":
                vals.append(self.const(i, a[0], op.sub))
            else:
                vals.append(self.apply(i, op.kind, a))
        return tuple(vals[j] for j in self.program.outputs)


def setup(program: Program) -> tuple[nn.Module, GraphModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(program.seed)
    model = ProgramModule(program).eval()
    feat = FAMILIES[program.family]
    x, x2 = torch.randn(program.batch, *feat), torch.randn(program.batch2, *feat)
    gm = graphopt.capture(model, (x,))
    assert gm.meta["graphopt_capture"]["dynamic_batch"], gm.meta["graphopt_capture"]
    return model, gm, x, x2


def bitwise_equal(a: Any, b: Any) -> bool:
    """Same structure, shapes, dtypes and bits (signed zeros differ; any NaN equals any NaN)."""
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    if len(la) != len(lb):
        return False
    for u, v in zip(la, lb):
        if u.shape != v.shape or u.dtype != v.dtype:
            return False
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[u.element_size()]
        same = u.contiguous().view(ints) == v.contiguous().view(ints)
        if not bool((same | (u.isnan() & v.isnan())).all()):
            return False
    return True


def check_exact(model: nn.Module, gm: GraphModule, new_gm: GraphModule, *inputs: torch.Tensor) -> None:
    with torch.no_grad():
        for x in inputs:
            before, after = gm(x), new_gm(x)
            text = graphopt.format_graph(new_gm)
            assert bitwise_equal(before, after), f"outputs differ on {tuple(x.shape)}:\n{text}"
            assert bitwise_equal(model(x), after), f"differs from eager on {tuple(x.shape)}"


def optimize(pipeline: str, gm: GraphModule, x: torch.Tensor) -> tuple[GraphModule, Any]:
    return graphopt.PassManager(pipeline, verify=True, on_fail="raise").run(gm, [x])


def depends_on_input(gm: GraphModule) -> set[Node]:
    live: set[Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(i in live for i in node.all_input_nodes):
            live.add(node)
    return live


def node_key(node: Node) -> Any:
    def key(a: Any) -> Any:
        return repr(a) if isinstance(a, float) else a
    args = tuple(tuple(map(key, a)) if isinstance(a, (list, tuple)) else key(a) for a in node.args)
    return node.target, args, tuple(sorted(node.kwargs.items(), key=str))


@pytest.mark.parametrize("pass_name", EXACT_PASSES)
@PROPS
@given(program=programs())
def test_single_pass_is_bitwise_exact(pass_name: str, program: Program) -> None:
    model, gm, x, x2 = setup(program)
    new_gm, report = optimize(pass_name, gm, x)
    (record,) = report.records
    assert record.status in ("ok", "unchanged"), record
    assert graphopt.ir.count_op_nodes(new_gm) <= graphopt.ir.count_op_nodes(gm)
    check_exact(model, gm, new_gm, x, x.clone().normal_(), x2)
    if pass_name == "dce" and program.dead_scalars():
        assert record.rewrites > 0 and record.nodes_after < record.nodes_before, record


@PROPS
@given(program=programs())
def test_cleanup_fixpoint_is_exact_and_complete(program: Program) -> None:
    model, gm, x, x2 = setup(program)
    new_gm, report = optimize(CLEANUP, gm, x)
    check_exact(model, gm, new_gm, x, x.clone().normal_(), x2)
    ops = [n for n in new_gm.graph.nodes if n.op == "call_function"]
    assert len(ops) <= graphopt.ir.count_op_nodes(gm)
    graph = graphopt.format_graph(new_gm)
    records = {r.name.split(":")[-1]: r for r in report.records}
    if program.dead_scalars():  # dead ops drawn: dce removed them, nothing of them is left
        assert records["dce"].rewrites > 0, report.to_text()
        dead = set(program.dead_scalars())
        assert not any(a in dead for n in ops for a in n.args), graph
    # remove-noops: no eval dropout, detach or same-dtype .to survives
    noops = (aten.dropout.default, aten.detach.default, aten.to.dtype, aten.alias.default)
    assert not any(n.target in noops for n in ops), graph
    # fold-constants + dce: every remaining op depends on the input
    live = depends_on_input(new_gm)
    assert all(n in live for n in ops if n.all_input_nodes), graph
    # cse: no two identical pure calls, unless merging them would alias two outputs
    seen: dict[Any, Node] = {}
    for n in ops:
        first = seen.setdefault(node_key(n), n)
        if first is not n:
            out = [u for u in (n, first) if any(v.op == "output" for v in u.users)]
            assert len(out) == 2, f"%{n.name} duplicates %{first.name}:\n{graph}"


@pytest.mark.parametrize("pass_name", ["dce", "cse"])
@PROPS
@given(program=programs())
def test_pass_is_idempotent(pass_name: str, program: Program) -> None:
    model, gm, x, x2 = setup(program)
    once, _ = optimize(pass_name, gm, x)
    twice, report = optimize(pass_name, once, x)
    assert report.records[0].rewrites == 0, report.to_text()
    assert graphopt.format_graph(twice) == graphopt.format_graph(once)
    check_exact(model, gm, twice, x, x2)
