"""Property tests: the exact cleanup passes keep random small models' outputs bitwise equal.

Hypothesis draws a small "program" of elementwise, no-op, linear/conv, weight-only, duplicated
and dead operations over one shape family ([B, 8] or [B, 4, 6, 6]); a module interprets it, is
captured with a dynamic batch, optimized, and compared bit for bit with the captured graph (on
the example input and on a fresh input with another batch size) and with the eager model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import graphopt
from graphopt.ir.graph import count_op_nodes, escapes_to_output

aten = torch.ops.aten
EXACT_PASSES = ["dce", "cse", "fold-constants", "remove-noops"]
CLEANUP = "fixpoint(remove-noops,fold-constants,cse,dce)"
UNARY = (
    "relu sigmoid tanh neg mul1 add0 clone detach dropout contiguous to_same reshape_same "
    "transpose_rt layer"
).split()
BINARY = ["add", "mul", "sub"]
PURE = ["relu", "sigmoid", "tanh", "neg", "mul1", "add", "mul", "sub"]  # what "dup" repeats
CONSTS = ["scale", "double", "tanh", "flip", "weight"]  # weight-only expressions of "const"
NOOPS = ["detach", "dropout", "to_same", "reshape_same"]  # always removable by remove-noops
# ops whose result may be their input itself: the noops, and contiguous of a contiguous value
MAY_ALIAS = NOOPS + ["contiguous"]
CATEGORIES = ["unary"] * 3 + ["binary"] * 2 + ["dup", "const", "dead"]
FAMILIES = {"linear": (8,), "conv": (4, 6, 6)}
# derandomized: the same examples on every run, so CI cannot turn red by the draw; widen the
# search locally (derandomize=False, a larger max_examples) when changing the passes
PROPS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@dataclass(frozen=True)
class Op:
    kind: str  # UNARY, BINARY, "dup", "const" or "dead"
    args: tuple[int, ...]  # indices of earlier values
    sub: str = ""  # dup: the duplicated PURE op; const: the CONSTS expression
    out: int = -1  # index of its (first) value; -1 for dead ops


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

    def output_aliases(self) -> set[int]:
        """Values that are graph outputs, or whose alias (through ops that may return their
        input, as eval-mode dropout, detach, same-shape views and contiguous of a contiguous
        value do) is one."""
        aliases = set(self.outputs)
        for op in reversed(self.ops):
            if op.kind in MAY_ALIAS and op.out in aliases:
                aliases |= set(op.args)
        return aliases

    def live_ops(self) -> list[Op]:
        """Ops whose value reaches an output (export itself drops some dead ops, e.g. views)."""
        live, found = set(self.outputs), []
        for op in reversed(self.ops):
            if op.out >= 0 and {op.out, op.out + (op.kind == "dup")} & live:
                found.append(op)
                live |= set(op.args)
        return found

    def has_work_for(self, pass_name: str) -> bool:
        """Whether the drawn program guarantees `pass_name` at least one rewrite."""
        live = self.live_ops()
        return {
            "dce": "dead" in {op.kind for op in self.ops},
            "fold-constants": any(op.kind == "const" for op in live),
            "remove-noops": any(op.kind in NOOPS for op in live),
            # two equal calls are kept apart only when both reach graph outputs as themselves
            # (an output that is an alias of a value, e.g. eval-mode dropout or detach of it,
            # counts: merging would make two outputs share memory)
            "cse": any(
                op.kind == "dup" and not {op.out, op.out + 1} <= self.output_aliases()
                for op in live
            ),
        }[pass_name]


def dead_scale(i: int) -> float:
    return 3.0 + 0.125 * i  # unique per op: nothing but dce can remove a dead op


@st.composite
def programs(draw: st.DrawFn) -> Program:
    n_values, ops = 1, []
    for _ in range(draw(st.integers(2, 8))):
        kind = draw(st.sampled_from(CATEGORIES))
        kind = draw(st.sampled_from({"unary": UNARY, "binary": BINARY}.get(kind, [kind])))
        sub = draw(st.sampled_from({"dup": PURE, "const": CONSTS}.get(kind, [""])))
        arity = 2 if kind in BINARY or sub in BINARY else 1
        args = tuple(draw(st.integers(0, n_values - 1)) for _ in range(arity))
        ops.append(Op(kind, args, sub, -1 if kind == "dead" else n_values))
        n_values += {"dup": 2, "dead": 0}.get(kind, 1)
    extra = draw(st.lists(st.integers(0, n_values - 1), max_size=2))
    batch = draw(st.integers(2, 4))
    batch2 = draw(st.integers(2, 6).filter(lambda b: b != batch))
    family, seed = draw(st.sampled_from(sorted(FAMILIES))), draw(st.integers(0, 2**16))
    return Program(family, tuple(ops), (n_values - 1, *extra), batch, batch2, seed)


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
        c = {
            "scale": lambda: p * 2,
            "double": lambda: p + p,
            "tanh": lambda: p.tanh(),
            "flip": lambda: p.flip(0) * 0.5,
        }[sub]()
        return v * c if i % 2 else v + c

    def apply(self, i: int, kind: str, a: list[torch.Tensor]) -> torch.Tensor:
        if kind in ("relu", "sigmoid", "tanh", "neg", "clone", "add", "mul", "sub"):
            return getattr(torch, kind)(*a)
        v = a[0]
        if kind == "transpose_rt":  # same shape, non-contiguous strides
            return v.transpose(-1, -2).contiguous().transpose(-1, -2)
        table: dict[str, Any] = {
            "mul1": lambda t: t * 1.0,
            "add0": lambda t: t + 0.0,  # not a no-op: turns -0.0 into 0.0
            "detach": torch.Tensor.detach,
            "dropout": self.drop,
            "contiguous": torch.Tensor.contiguous,
            "to_same": lambda t: t.to(t.dtype),
            "reshape_same": lambda t: t.reshape(t.shape),
            "layer": self.layers[i],
        }
        return table[kind](v)

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


def make_input(batch: int, family: str) -> torch.Tensor:
    """Random data with some +0.0 and -0.0 entries, so sign-of-zero bugs can show."""
    x = torch.randn(batch, *FAMILIES[family])
    x.view(-1)[::5] = -0.0
    x.view(-1)[2::7] = 0.0
    return x


def setup(program: Program) -> tuple[nn.Module, GraphModule, torch.Tensor, torch.Tensor]:
    torch.manual_seed(program.seed)
    model = ProgramModule(program).eval()
    x, x2 = make_input(program.batch, program.family), make_input(program.batch2, program.family)
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


def check_exact(
    model: nn.Module, gm: GraphModule, new_gm: GraphModule, *inputs: torch.Tensor
) -> None:
    """new_gm's outputs are bitwise those of the captured graph and of the eager model."""
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


@PROPS
@given(program=programs())
def test_each_pass_alone_is_bitwise_exact(program: Program) -> None:
    model, gm, x, x2 = setup(program)
    for pass_name in EXACT_PASSES:  # one capture, four independent single-pass pipelines
        new_gm, report = optimize(pass_name, gm, x)
        (record,) = report.records
        assert record.status in ("ok", "unchanged"), (pass_name, record)
        assert count_op_nodes(new_gm) <= count_op_nodes(gm), pass_name
        check_exact(model, gm, new_gm, x, make_input(program.batch, program.family), x2)
        if program.has_work_for(pass_name):
            assert record.rewrites > 0, (pass_name, record)
        if pass_name == "dce" and program.dead_scalars():
            assert record.nodes_after < record.nodes_before, record
        again, _ = optimize(pass_name, gm, x)  # invariant 9: deterministic
        assert graphopt.format_graph(again) == graphopt.format_graph(new_gm), pass_name


@PROPS
@given(program=programs())
def test_cleanup_fixpoint_is_exact_and_complete(program: Program) -> None:
    model, gm, x, x2 = setup(program)
    new_gm, report = optimize(CLEANUP, gm, x)
    check_exact(model, gm, new_gm, x, make_input(program.batch, program.family), x2)
    ops = [n for n in new_gm.graph.nodes if n.op == "call_function"]
    assert len(ops) <= count_op_nodes(gm)
    graph = graphopt.format_graph(new_gm)
    records = {r.name.split(":")[-1]: r for r in report.records}
    if program.dead_scalars():  # dead ops drawn: dce removed them, nothing of them is left
        assert records["dce"].rewrites > 0, report.to_text()
        dead = set(program.dead_scalars())
        assert not any(a in dead for n in ops for a in n.args), graph
    # remove-noops: no eval dropout, detach, same-dtype .to or same-shape reshape survives
    noops = (aten.dropout.default, aten.detach.default, aten.to.dtype, aten.reshape.default)
    assert not any(n.target in noops for n in ops), graph
    # fold-constants + dce: every remaining op depends on the input
    live = depends_on_input(new_gm)
    assert all(n in live for n in ops if n.all_input_nodes), graph
    # cse: no two identical pure calls, unless merging them would alias two outputs
    seen: dict[Any, Node] = {}
    for n in ops:
        first = seen.setdefault(node_key(n), n)
        if first is not n:
            # both reach an output, directly or through views (a transposed copy may be one)
            out = [u for u in (n, first) if escapes_to_output(u)]
            assert len(out) == 2, f"%{n.name} duplicates %{first.name}:\n{graph}"


@PROPS
@given(program=programs())
def test_second_run_is_a_noop(program: Program) -> None:
    model, gm, x, x2 = setup(program)
    for pass_name in EXACT_PASSES:  # asked for dce and cse; the other two hold as well
        once, _ = optimize(pass_name, gm, x)
        twice, report = optimize(pass_name, once, x)
        assert report.records[0].rewrites == 0, (pass_name, report.to_text())
        assert graphopt.format_graph(twice) == graphopt.format_graph(once), pass_name
        check_exact(model, gm, twice, x, x2)
