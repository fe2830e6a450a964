"""The Triton code generator for fused groups against the ATen reference (``Program.run``).

Without a GPU the kernels run under Triton's interpreter (set by tests/conftest.py) on small
shapes; the ``gpu`` tests repeat the main programs at full size (1823 x 781) on CUDA.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from graphopt.ir.program import Call, Program, Ref, resolve_op
from graphopt.kernels import codegen
from graphopt.kernels.codegen import SUPPORTED_OPS, UnsupportedProgram, why_not
from graphopt.kernels.codegen_ops import POINTWISE

# masked-off lanes of the interpreter's numpy blocks may divide by zero; the kernels never store them
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")


@pytest.fixture(autouse=True)
def _kernel_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated kernels go to a temporary cache, not the user's; the data is the same each run."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "graphopt-cache"))
    torch.manual_seed(0)


# --- helpers --------------------------------------------------------------------------------

TOL = {  # (rtol, atol) of the generated kernel against ATen, per output dtype
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
CHAIN_TOL = {  # ATen rounds every op of a chain to fp16/bf16; the kernel rounds once
    torch.float32: (2e-5, 2e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def IN(k: int) -> Ref:
    return Ref("in", k)


class P:
    """Builds a Program: ``p = P(2); y = p("aten.add.Tensor", IN(0), IN(1)); p.build(y)``."""

    def __init__(self, n_inputs: int) -> None:
        self.n_inputs = n_inputs
        self.calls: list[Call] = []

    def __call__(self, op: str, *args: Any, **kwargs: Any) -> Ref:
        self.calls.append(Call(op, tuple(args), tuple(kwargs.items())))
        return Ref("node", len(self.calls) - 1)

    def build(self, *outputs: Ref) -> Program:
        return Program(self.n_inputs, tuple(self.calls), tuple(outputs))


def check(
    program: Program, inputs: list[torch.Tensor], tol: dict[torch.dtype, tuple[float, float]] = TOL
) -> list[torch.Tensor]:
    """Kernel vs reference: same shapes and dtypes, values within ``tol`` (exact for int/bool)."""
    assert why_not(program, inputs) is None, why_not(program, inputs)
    got = codegen.run(program, inputs)
    want = program.run(inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.is_contiguous()
        rtol, atol = tol.get(w.dtype, (0.0, 0.0))
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, equal_nan=True)
    return got


def close_to_float64(program: Program, inputs: list[torch.Tensor], got: list[torch.Tensor]) -> None:
    """fp32 math inside: a half-precision result is within about one rounding of the fp64 value."""
    ref = program.run([x.double() if x.is_floating_point() else x for x in inputs])
    for g, r in zip(got, ref):
        rtol, atol = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}.get(
            g.dtype, (1e-5, 1e-5)
        )
        torch.testing.assert_close(g.double(), r, rtol=rtol, atol=atol, equal_nan=True)


# --- 1. every supported op, driven by OpInfo samples -------------------------------------------


def _scalar(t: Any, positive: bool) -> Any:
    v = t.flatten()[0].item() if t.numel() else 1
    return abs(v) + 0.5 if positive else v


def _fit_schema(op: str, args: list[Any], positive: bool = False) -> list[Any]:
    """Tensors the sample passes where the overload takes a Scalar become Python numbers."""
    types = [str(a.type) for a in resolve_op(op)._schema.arguments]
    scalar = ("number", "Optional[number]")
    return [
        _scalar(a, positive)
        if isinstance(a, torch.Tensor) and i < len(types) and types[i] in scalar
        else a
        for i, a in enumerate(args)
    ]


Adapter = Callable[[list[Any], dict[str, Any]], tuple[list[Any], dict[str, Any]]]


def _unbiased_to_correction(
    args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    kwargs = dict(kwargs)
    if "unbiased" in kwargs:
        kwargs["correction"] = int(kwargs.pop("unbiased"))
    return args, kwargs


# op -> (OpInfo name, variant, how a sample's (input, *args), kwargs become the op's arguments)
_SPECIAL: dict[str, tuple[str, str, Adapter | None]] = {
    "aten.where.self": ("where", "", lambda a, k: ([a[1], a[0], a[2]], k)),
    "aten._softmax.default": ("softmax", "", lambda a, k: ([a[0], a[1], False], k)),
    "aten._log_softmax.default": ("log_softmax", "", lambda a, k: ([a[0], a[1], False], k)),
    "aten.div.Tensor": ("div", "no_rounding_mode", None),
    "aten.div.Scalar": ("div", "no_rounding_mode", None),
    "aten.pow.Scalar": (
        "pow",
        "",
        lambda a, k: (_fit_schema("aten.pow.Scalar", a, positive=True), k),
    ),
    "aten.var.correction": ("var", "", _unbiased_to_correction),
    "aten.std.correction": ("std", "", _unbiased_to_correction),
}
_NO_OPINFO = {"aten._to_copy.default", "aten.to.dtype"}  # OpInfo "to" moves devices; see test_casts


def _opinfo_for(op: str) -> tuple[Any, Adapter | None] | None:
    from torch.testing._internal.common_methods_invocations import op_db

    if op in _NO_OPINFO:
        return None
    base = op.split(".")[1]
    name, variant, adapt = _SPECIAL.get(op, (base, "", None))
    for info in op_db:
        if info.variant_test_name == variant and name in (
            info.name,
            info.aten_name,
            info.name.removeprefix("nn.functional."),
        ):
            return info, adapt
    return None


def _program_for(
    op: str, args: list[Any], kwargs: dict[str, Any]
) -> tuple[Program, list[torch.Tensor]]:
    inputs: list[torch.Tensor] = []

    def lift(a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            inputs.append(a)
            return IN(len(inputs) - 1)
        if isinstance(a, (list, tuple)):
            return tuple(lift(v) for v in a)
        return a

    call = Call(op, tuple(lift(a) for a in args), tuple((k, lift(v)) for k, v in kwargs.items()))
    return Program(len(inputs), (call,), (Ref("node", 0),)), inputs


def _samples(
    op: str, dtype: torch.dtype, limit: int
) -> Iterator[tuple[Program, list[torch.Tensor]]]:
    """Up to ``limit`` (program, inputs) from the op's OpInfo that the generator accepts."""
    info, adapt = _opinfo_for(op)  # type: ignore[misc]
    taken = 0
    for sample in itertools.islice(info.sample_inputs("cpu", dtype), 40):
        args, kwargs = [sample.input, *sample.args], dict(sample.kwargs)
        args, kwargs = adapt(args, kwargs) if adapt else (_fit_schema(op, args), kwargs)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(t.numel() == 0 for t in tensors):
            continue
        program, inputs = _program_for(op, args, kwargs)
        try:
            program.run(inputs)  # does the sample fit this overload at all?
        except Exception:
            continue
        if why_not(program, inputs) is None:
            yield program, inputs
            taken += 1
            if taken == limit:
                return


_OPINFO_OPS = sorted(op for op in SUPPORTED_OPS if op not in _NO_OPINFO)


@pytest.mark.parametrize("op", _OPINFO_OPS)
def test_op_matches_aten_on_opinfo_samples(op: str) -> None:
    found = _opinfo_for(op)
    assert found is not None, f"no OpInfo for {op}"
    info = found[0]
    supported = info.supported_dtypes("cpu")
    floats = [d for d in (torch.float32, torch.float16, torch.bfloat16) if d in supported]
    ints = (
        [torch.int32] if op in POINTWISE and POINTWISE[op].ints and torch.int32 in supported else []
    )
    dtypes = floats + ints or [d for d in (torch.int32, torch.bool) if d in supported]
    ran = 0
    for dtype in dtypes:
        for program, inputs in _samples(op, dtype, 3 if dtype == torch.float32 else 2):
            check(program, inputs)
            ran += 1
    assert ran >= 1, f"no OpInfo sample of {op} ran ({[str(d) for d in dtypes]})"


def test_supported_ops_are_covered() -> None:
    assert len(_OPINFO_OPS) >= 40
    assert all(_opinfo_for(op) is not None for op in _OPINFO_OPS)
    assert _NO_OPINFO <= SUPPORTED_OPS  # covered by test_casts


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (torch.float32, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
        (torch.float32, torch.int32),
        (torch.int64, torch.float32),
        (torch.bool, torch.float16),
        (torch.float32, torch.bool),
        (torch.int32, torch.int8),
    ],
)
def test_casts(src: torch.dtype, dst: torch.dtype) -> None:
    x = (torch.randn(4, 9) * 300).to(src)
    p = P(1)
    a = p("aten._to_copy.default", IN(0), dtype=dst)
    b = p("aten.to.dtype", IN(0), dst)
    c = p("aten.mul.Tensor", a, 3)  # the cast value is rounded before it is used
    check(p.build(a, b, c), [x], CHAIN_TOL)


# --- 2. pointwise chains ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chain_broadcast_scalars_odd_shape(dtype: torch.dtype) -> None:
    x, bias, scale = torch.randn(13, 31), torch.randn(31), torch.rand(13, 1) + 0.5
    inputs = [x.to(dtype), bias.to(dtype), scale.to(dtype)]
    p = P(3)
    y = p("aten.add.Tensor", p("aten.mul.Tensor", IN(0), 0.5), IN(1), alpha=2)
    y = p("aten.mul.Tensor", y, IN(2))
    g = p("aten.gelu.default", y, approximate="tanh")
    s = p("aten.rsub.Scalar", p("aten.sigmoid.default", y), 1.0)
    t = p("aten.div.Tensor", p("aten.tanh.default", g), p("aten.add.Scalar", s, 2))
    program = p.build(t, g)
    got = check(program, inputs, CHAIN_TOL)
    assert [o.dtype for o in got] == [dtype, dtype]  # fp16 tensor + Python float stays fp16
    close_to_float64(program, inputs, got)


def test_mixed_dtypes_follow_aten_promotion() -> None:
    h, f = torch.randn(5, 7, dtype=torch.float16), torch.randn(7)
    i, j = (
        torch.randint(-9, 9, (5, 7), dtype=torch.int32),
        torch.randint(1, 9, (7,), dtype=torch.int32),
    )
    b = torch.randn(5, 7, dtype=torch.bfloat16)
    p = P(5)
    outs = [
        p("aten.mul.Tensor", IN(0), IN(1)),  # fp16 * fp32 -> fp32
        p("aten.div.Tensor", IN(2), IN(3)),  # int / int -> fp32
        p("aten.add.Tensor", IN(2), 2.5),  # int + float -> fp32
        p("aten.add.Tensor", IN(0), IN(4)),  # fp16 + bf16 -> fp32
        p("aten.mul.Tensor", IN(2), IN(0)),  # int32 * fp16 -> fp16
        p("aten.add.Tensor", IN(2), 7),  # int32 + int -> int32
        p("aten.gt.Tensor", IN(2), IN(1)),  # comparisons -> bool
    ]
    got = check(p.build(*outs), [h, f, i, j, b], CHAIN_TOL)
    assert [o.dtype for o in got] == [torch.float32] * 4 + [torch.float16, torch.int32, torch.bool]


def test_non_contiguous_inputs() -> None:
    base = torch.randn(9, 14)
    x = base.t()  # (14, 9), transposed
    y = torch.randn(14, 20)[:, 3:12]  # (14, 9), a slice
    z = torch.randn(2, 14, 9).permute(1, 2, 0)[:, :, 1]  # (14, 9), strided
    w = torch.randn(1, 9).expand(14, 9)  # stride 0
    p = P(4)
    a = p("aten.add.Tensor", p("aten.mul.Tensor", IN(0), IN(2)), IN(3))
    b = p("aten.exp.default", p("aten.neg.default", IN(1)))
    got = check(p.build(a, b), [x, y, z, w])
    assert got[0].shape == (14, 9)
    p = P(1)
    check(p.build(p("aten.neg.default", IN(0))), [y[::2, ::3]])


def test_four_dim_broadcast_collapses_dims() -> None:
    a, b, c = torch.randn(2, 3, 1, 5), torch.randn(1, 3, 4, 1), torch.randn(4, 5)
    p = P(3)
    y = p("aten.where.self", p("aten.gt.Scalar", IN(0), 0.0), IN(1), IN(2))
    check(p.build(p("aten.mul.Tensor", y, IN(0))), [a, b, c])


def test_zero_dim_and_empty_inputs() -> None:
    p = P(2)
    y = p("aten.add.Tensor", IN(0), IN(1))
    check(p.build(y), [torch.randn(3, 4), torch.tensor(2.5)])
    check(p.build(y), [torch.tensor(1.5), torch.tensor(2.5)])
    got = codegen.run(p.build(y), [torch.randn(0, 4), torch.randn(4)])
    assert got[0].shape == (0, 4)


def test_int_and_bool_ops() -> None:
    a = torch.randint(-100, 100, (6, 11), dtype=torch.int32)
    b = torch.randint(-100, 100, (11,), dtype=torch.int32)
    m = torch.rand(6, 11) > 0.5
    u = torch.randint(0, 255, (6, 11), dtype=torch.uint8)
    c = torch.randint(-100, 100, (6, 11), dtype=torch.int8)
    p = P(5)
    outs = [
        p("aten.bitwise_xor.Scalar", p("aten.bitwise_and.Tensor", IN(0), IN(1)), 5),
        p("aten.logical_or.default", IN(2), p("aten.lt.Tensor", IN(0), IN(1))),
        p("aten.bitwise_not.default", IN(2)),
        p("aten.mul.Tensor", IN(3), 3),  # uint8 wraps around
        p("aten.add.Tensor", IN(4), IN(4)),  # int8 wraps around
        p("aten.where.self", IN(2), IN(0), p("aten.neg.default", IN(1))),
        p("aten.clamp.default", IN(0), -10, 10),
        p("aten.masked_fill.Scalar", IN(0), IN(2), -1),
        p("aten.sign.default", IN(0)),
        p("aten.abs.default", IN(4)),
        p("aten.maximum.default", IN(0), IN(1)),
        p("aten.pow.Tensor_Scalar", IN(0), 3),
    ]
    got = check(p.build(*outs), [a, b, m, u, c])
    assert [o.dtype for o in got[:5]] == [
        torch.int32,
        torch.bool,
        torch.bool,
        torch.uint8,
        torch.int8,
    ]


def test_multiple_outputs_and_passthrough() -> None:
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    p = P(2)
    s = p("aten.add.Tensor", IN(0), IN(1))
    r = p("aten.relu.default", s)
    got = check(p.build(r, s, r, IN(1)), [x, y])
    assert got[0] is not got[2] and got[3].data_ptr() != y.data_ptr()


def test_nan_and_inf_propagate_like_aten() -> None:
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-8, -3.0, 40.0]])
    y = torch.tensor([[0.5, float("nan"), 1.0, -1.0, 0.0, float("nan"), 2.0, -float("inf")]])
    p = P(2)
    ops = ["aten.relu.default", "aten.tanh.default", "aten.sigmoid.default", "aten.expm1.default"]
    outs = [p(op, IN(0)) for op in ops]
    outs += [p("aten.clamp.default", IN(0), -1.0, 1.0), p("aten.maximum.default", IN(0), IN(1))]
    outs += [p("aten.minimum.default", IN(1), IN(0)), p("aten.amax.default", IN(1), [-1])]
    outs += [p("aten.round.default", p("aten.mul.Scalar", IN(0), 0.5))]
    check(p.build(*outs), [x, y])


def test_generated_source_fast_path_has_no_index_math() -> None:
    p = P(2)
    program = p.build(p("aten.mul.Tensor", IN(0), IN(1)))
    src = codegen.generate(program, [torch.randn(4, 8), torch.randn(4, 8)])
    assert "tl.load(in0_ptr + offs, mask=mask" in src and "%" not in src
    src = codegen.generate(program, [torch.randn(4, 8), torch.randn(8)])
    assert "tl.load(in0_ptr + offs, mask=mask" in src and "i1 = offs % size_1" in src
    src = codegen.generate(program, [torch.randn(4, 8), torch.randn(8, 4).t()])
    assert "i1 * stride_in1_1" in src  # the transposed input's inner dim has stride 1


# --- 3. reductions over the last dim ---------------------------------------------------------


def softmax_program() -> Program:
    p = P(2)
    s = p("aten.add.Tensor", p("aten.mul.Tensor", IN(0), 0.125), IN(1))
    return p.build(p("aten._softmax.default", s, -1, False))


def layernorm_program() -> Program:
    p = P(3)
    mean = p("aten.mean.dim", IN(0), [-1], True)
    d = p("aten.sub.Tensor", IN(0), mean)
    var = p("aten.mean.dim", p("aten.pow.Tensor_Scalar", d, 2), [-1], True)
    rstd = p("aten.rsqrt.default", p("aten.add.Tensor", var, 1e-5))
    y = p("aten.add.Tensor", p("aten.mul.Tensor", p("aten.mul.Tensor", d, rstd), IN(1)), IN(2))
    return p.build(y, mean, rstd)


def rmsnorm_program(dtype: torch.dtype) -> Program:
    p = P(2)  # as in Llama: the norm in fp32, the weight in the model's dtype
    x = p("aten._to_copy.default", IN(0), dtype=torch.float32)
    ms = p("aten.mean.dim", p("aten.pow.Tensor_Scalar", x, 2), [-1], True)
    y = p("aten.mul.Tensor", x, p("aten.rsqrt.default", p("aten.add.Scalar", ms, 1e-6)))
    return p.build(p("aten.mul.Tensor", IN(1), p("aten._to_copy.default", y, dtype=dtype)))


def _mask(shape: tuple[int, ...]) -> torch.Tensor:
    m = torch.zeros(shape)
    m[..., 1::3] = -float("inf")  # never a whole row
    return m


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softmax_with_scale_and_mask(dtype: torch.dtype) -> None:
    x, mask = torch.randn(2, 3, 5, 33) * 4, _mask((2, 1, 1, 33))
    inputs = [x.to(dtype), mask.to(dtype)]
    got = check(softmax_program(), inputs, CHAIN_TOL)
    close_to_float64(softmax_program(), inputs, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decomposed_layernorm(dtype: torch.dtype) -> None:
    inputs = [
        (torch.randn(13, 33) * 3 + 1).to(dtype),
        torch.randn(33).to(dtype),
        torch.randn(33).to(dtype),
    ]
    got = check(layernorm_program(), inputs, CHAIN_TOL)
    assert got[1].shape == (13, 1) and got[2].shape == (13, 1)
    close_to_float64(layernorm_program(), inputs, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rmsnorm(dtype: torch.dtype) -> None:
    inputs = [torch.randn(2, 5, 24).to(dtype), torch.rand(24).to(dtype)]
    check(rmsnorm_program(dtype), inputs, CHAIN_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_reductions_keepdim_and_not(dtype: torch.dtype) -> None:
    x = torch.randn(3, 4, 17).to(dtype)
    p = P(1)
    outs = [
        p("aten.sum.dim_IntList", IN(0), [-1]),
        p("aten.mean.dim", IN(0), [2], True),
        p("aten.amax.default", IN(0), [-1], True),
        p("aten.amin.default", IN(0), [-1]),
        p("aten.var.correction", IN(0), [-1], correction=0, keepdim=True),
        p("aten.std.correction", IN(0), [-1]),
        p("aten.logsumexp.default", IN(0), [-1]),
        p("aten._log_softmax.default", IN(0), -1, False),
        p("aten.sqrt.default", p("aten.sum.dim_IntList", p("aten.mul.Tensor", IN(0), IN(0)), [-1])),
    ]
    got = check(p.build(*outs), [x], CHAIN_TOL)
    assert [tuple(o.shape) for o in got[:2]] == [(3, 4), (3, 4, 1)]


def test_one_dim_reduction_broadcasts_without_keepdim() -> None:
    x = torch.randn(29)
    p = P(1)
    centered = p("aten.sub.Tensor", IN(0), p("aten.mean.dim", IN(0), [0]))
    check(p.build(centered, p("aten.amax.default", IN(0))), [x])


def test_reduction_of_strided_and_broadcast_inputs() -> None:
    x = torch.randn(33, 6).t()  # rows are strided
    bias = torch.randn(6, 1)  # one value per row
    p = P(2)
    y = p("aten.add.Tensor", IN(0), IN(1))
    check(
        p.build(p("aten.softmax.int", y, -1), p("aten.sum.dim_IntList", y, [-1], True)), [x, bias]
    )


def test_degenerate_rows() -> None:
    p = P(1)
    program = p.build(
        p("aten._softmax.default", IN(0), -1, False),
        p("aten.var.correction", IN(0), [-1], keepdim=True),
    )
    check(program, [torch.randn(5, 1)])  # one column: var divides by 0 as in ATen
    check(program, [torch.randn(1, 7)])
    check(program, [torch.randn(3, 1, 6)[:, :, ::2]])


def test_64bit_indexing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codegen, "_INDEX_LIMIT", 16)  # as if the tensors were past 2**31 elements
    x, b = torch.randn(5, 7), torch.randn(7)
    p = P(2)
    program = p.build(p("aten.add.Tensor", IN(0), IN(1)))
    assert "tl.program_id(0).to(tl.int64)" in codegen.generate(program, [x, b])
    check(program, [x.t().contiguous().t(), b])
    check(softmax_program(), [x, b])


def test_amax_keeps_nan() -> None:
    x = torch.randn(4, 9)
    x[1, 3] = float("nan")
    p = P(1)
    check(p.build(p("aten.amax.default", IN(0), [-1]), p("aten.amin.default", IN(0), [-1])), [x])


def test_long_rows_use_the_looped_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(codegen, "PERSISTENT_MAX_COLS", 16)
    monkeypatch.setattr(codegen, "LOOP_BLOCK_N", 16)
    inputs = [torch.randn(5, 37) * 2, torch.randn(37), torch.randn(37)]
    check(layernorm_program(), inputs, CHAIN_TOL)
    check(softmax_program(), [inputs[0], _mask((1, 37))], CHAIN_TOL)
    p = P(1)
    check(
        p.build(
            p("aten.amax.default", IN(0), [-1]), p("aten.logsumexp.default", IN(0), [-1], True)
        ),
        inputs[:1],
    )
    src = codegen.generate(layernorm_program(), inputs)
    assert src.count("for col0 in range(0, n_cols, BLOCK_N):") == 3  # mean, variance, store


# --- 4. refusals ----------------------------------------------------------------------------


def test_why_not_reasons() -> None:
    x, w = torch.randn(4, 6), torch.randn(6)
    p = P(1)
    assert "aten.cumsum.default is not supported" in why_not(
        p.build(p("aten.cumsum.default", IN(0), 1)), [x]
    )
    p = P(1)
    reason = why_not(p.build(p("aten.sum.dim_IntList", IN(0), [0], True)), [x])
    assert "only the last dim" in reason
    p = P(2)
    reason = why_not(
        p.build(p("aten.add.Tensor", IN(0), 1), p("aten.mul.Tensor", IN(1), 2)), [x, w]
    )
    assert "output 1 has shape [6]" in reason
    p = P(1)
    assert why_not(p.build(p("aten.exp.default", IN(0))), [x.double()]) == "float64 inputs"
    p = P(1)  # a per-row result without keepdim does not broadcast back along the row
    reason = why_not(
        p.build(p("aten.sub.Tensor", IN(0), p("aten.sum.dim_IntList", IN(0), [-1]))),
        [torch.randn(6, 6)],
    )
    assert "without keepdim" in reason
    p = P(1)
    assert "int32 values" in why_not(p.build(p("aten.sum.dim_IntList", IN(0), [-1])), [x.int()])
    p = P(1)
    assert "approximate" in why_not(p.build(p("aten.gelu.default", IN(0), approximate="erf")), [x])
    p = P(1)
    with pytest.raises(UnsupportedProgram, match="not supported"):
        codegen.run(p.build(p("aten.cumsum.default", IN(0), 1)), [x])


def test_why_not_reads_only_metadata() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [
            mode.from_tensor(torch.randn(8, 33)),
            mode.from_tensor(torch.randn(33)),
            mode.from_tensor(torch.randn(33)),
        ]
        assert why_not(layernorm_program(), fake) is None
    meta = [torch.empty(2, 3, 5, 33, device="meta"), torch.empty(2, 1, 1, 33, device="meta")]
    assert why_not(softmax_program(), meta) is None


# --- 5. disk cache --------------------------------------------------------------------------


def test_disk_cache_is_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    codegen.clear_memory_cache()
    p = P(2)
    program = p.build(p("aten.mul.Tensor", p("aten.add.Tensor", IN(0), IN(1)), 3.0))
    stats = codegen.cache_stats
    before = (stats.generated, stats.disk_hits, stats.memory_hits)
    check(program, [torch.randn(3, 5), torch.randn(5)])
    files = list((tmp_path / "kernels").glob("*.py"))
    assert len(files) == 1 and stats.generated == before[0] + 1
    mtime = files[0].stat().st_mtime_ns
    check(program, [torch.randn(7, 5), torch.randn(5)])  # another batch size: same kernel
    assert stats.memory_hits == before[2] + 1
    codegen.clear_memory_cache()
    check(program, [torch.randn(2, 5), torch.randn(5)])  # a fresh process would do this
    assert stats.disk_hits == before[1] + 1 and stats.generated == before[0] + 1
    assert files[0].stat().st_mtime_ns == mtime
    check(program, [torch.randn(2, 5), torch.randn(2, 1)])  # another broadcast pattern: new kernel
    assert len(list((tmp_path / "kernels").glob("*.py"))) == 2


def test_second_process_reuses_the_kernel_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    p = P(1)
    check(p.build(p("aten.sigmoid.default", IN(0))), [torch.randn(3, 4)])
    script = """
import torch
from graphopt.kernels import codegen
from graphopt.ir.program import Call, Program, Ref, resolve_op
p = Program(1, (Call("aten.sigmoid.default", (Ref("in", 0),)),), (Ref("node", 0),))
codegen.run(p, [torch.randn(5, 4)])
print(codegen.cache_stats.generated, codegen.cache_stats.disk_hits)
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    second = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert second.stdout.split() == ["0", "1"]  # nothing generated: the first process's file


# --- GPU: full-size odd shapes ---------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_odd_shapes(dtype: torch.dtype) -> None:
    dev = "cuda"
    x = torch.randn(1823, 781, device=dev, dtype=dtype)
    w, b = torch.randn(781, device=dev, dtype=dtype), torch.randn(781, device=dev, dtype=dtype)
    p = P(3)
    y = p("aten.gelu.default", p("aten.add.Tensor", p("aten.mul.Tensor", IN(0), IN(1)), IN(2)))
    check(p.build(y), [x, w, b], CHAIN_TOL)
    check(p.build(y), [x.t().contiguous().t(), w, b], CHAIN_TOL)
    check(layernorm_program(), [x, w, b], CHAIN_TOL)
    check(softmax_program(), [x.view(1823, 1, 781), _mask((1, 1, 781)).to(dev, dtype)], CHAIN_TOL)
    check(
        softmax_program(),
        [torch.randn(7, 9000, device=dev, dtype=dtype), torch.zeros(9000, device=dev, dtype=dtype)],
        CHAIN_TOL,
    )
