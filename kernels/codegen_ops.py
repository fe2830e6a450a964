"""The ATen ops the fused-kernel generator can emit, as data: one line of Triton per op.

A pointwise op is an :class:`Op` whose ``emit`` turns the op's (schema-bound) arguments into one
Triton expression. ``e.a("self")`` is the argument converted to the op's compute type, ``e.lit(v)``
a literal in that type, ``e.h("_tanh")`` a helper from :data:`HELPERS`. Every value is computed in
fp32 when its dtype is a float type (fp16/bf16 are loaded, widened and rounded only when stored or
explicitly cast), in its own type when it is an integer or bool::

    "aten.add.Tensor":   add(x, y, alpha=2)  ->  x + y * 2.0
    "aten.relu.default": relu(x)             ->  tl.where(x < 0.0, 0.0, x)     # NaN stays NaN

A reduction (last dimension only) is a :class:`Reduction` whose ``build`` adds lines through a
builder: ``b.let(expr)`` a pointwise line, ``b.reduce("sum" | "max" | "min", name)`` a per-row
result. Composite row ops are written with them, so the looped kernel can recompute them::

    "aten._softmax.default": m = max(x); e = exp(x - m); s = sum(e); e / s

This module imports neither torch nor triton; ``graphopt.kernels.codegen`` does the analysis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Triton type of each compute type ("f32" holds fp16, bf16 and fp32 values).
TL = {
    "f32": "tl.float32",
    "i1": "tl.int1",
    "i8": "tl.int8",
    "i16": "tl.int16",
    "i32": "tl.int32",
    "i64": "tl.int64",
    "u8": "tl.uint8",
}


@dataclass(frozen=True)
class TArg:
    """A tensor argument: the name of the line that holds it, its compute type and ATen dtype."""

    name: str
    ct: str
    dtype: str  # "float16", "int32", "bool", ...


def literal(value: Any, ct: str) -> str:
    """A Python scalar as Triton source in compute type ``ct``."""
    if ct == "f32":
        v = float(value)
        if math.isnan(v):
            return 'float("nan")'
        if math.isinf(v):
            return 'float("inf")' if v > 0 else '(-float("inf"))'
        text = repr(v)
        return f"({text})" if v < 0 else text
    if ct == "i1":
        return "True" if value else "False"
    v = int(value)
    return f"({v})" if v < 0 else str(v)


def convert(expr: str, src: str, dst: str) -> str:
    """``expr`` (of compute type ``src``) as compute type ``dst``."""
    if src == dst:
        return expr
    return f"{expr}.to({TL[dst]})"


class Emit:
    """What an op's ``emit`` sees: bound arguments, the compute type, helper registration."""

    def __init__(self, args: dict[str, Any], ct: str, out_ct: str, out_dtype: str, use: set[str]):
        self.args = args
        self.ct = ct  # the type the op computes in
        self.out_ct = out_ct  # the compute type of the op's result
        self.out_dtype = out_dtype
        self._use = use

    def __getitem__(self, name: str) -> Any:
        return self.args[name]

    def a(self, name: str, ct: str | None = None) -> str:
        """Argument ``name`` converted to ``ct`` (default: the op's compute type; "own": as is)."""
        value = self.args[name]
        if isinstance(value, TArg):
            return value.name if ct == "own" else convert(value.name, value.ct, ct or self.ct)
        if ct == "own":
            ct = "i1" if isinstance(value, bool) else "f32" if isinstance(value, float) else "i32"
        return literal(value, ct or self.ct)

    def lit(self, value: Any, ct: str | None = None) -> str:
        return literal(value, ct or self.ct)

    def h(self, helper: str) -> str:
        self._use.add(helper)
        return helper


Emitter = Callable[[Emit], str]


@dataclass(frozen=True)
class Op:
    """A pointwise op. ``compute``: "out" computes in the result's type, "common" in the promoted
    type of ``self`` and ``other`` (comparisons). ``ints``: whether it also runs on integer and
    bool values (else the generator refuses those). ``check`` returns a reason the generator
    cannot emit this call, or None."""

    emit: Emitter
    compute: str = "out"
    ints: bool = False
    check: Callable[[dict[str, Any], str], str | None] | None = None


def clamp(x: str, lo: str | None, hi: str | None) -> str:
    """``min(max(x, lo), hi)`` that keeps NaN (``tl.maximum`` may drop it on the GPU)."""
    if lo is not None:
        x = f"tl.where({x} < {lo}, {lo}, {x})"
    if hi is not None:
        x = f"tl.where({x} > {hi}, {hi}, {x})"
    return x


def splat(like: str, value: str) -> str:
    """A block of ``value`` shaped like ``like`` (helpers take blocks, not Python scalars)."""
    return f"tl.where({like} == {like}, {value}, {value})"


def _scaled(e: Emit, name: str, alpha: str = "alpha") -> str:
    scale = e.args.get(alpha, 1)
    return e.a(name) if scale == 1 else f"{e.a(name)} * {e.lit(scale)}"


def _add(e: Emit) -> str:
    if e.ct == "i1":  # bool + bool is "or" in ATen
        return f"{e.a('self')} | {e.a('other')}"
    return f"{e.a('self')} + {_scaled(e, 'other')}"


def _mul(e: Emit) -> str:
    if e.ct == "i1":
        return f"{e.a('self')} & {e.a('other')}"
    return f"{e.a('self')} * {e.a('other')}"


def _max(e: Emit) -> str:
    if e.ct == "i1":
        return f"{e.a('self')} | {e.a('other')}"
    a, b = e.a("self"), e.a("other")
    return f"tl.where(({a} > {b}) | ({a} != {a}), {a}, {b})"


def _min(e: Emit) -> str:
    if e.ct == "i1":
        return f"{e.a('self')} & {e.a('other')}"
    a, b = e.a("self"), e.a("other")
    return f"tl.where(({a} < {b}) | ({a} != {a}), {a}, {b})"


def _cmp(symbol: str) -> Op:
    def emit(e: Emit) -> str:
        ct = "i32" if e.ct == "i1" else e.ct  # bools are ordered as 0/1
        return f"{e.a('self', ct)} {symbol} {e.a('other', ct)}"

    return Op(emit, compute="common", ints=True)


def _pow_scalar(e: Emit) -> str:
    x, y = e.a("self"), e["exponent"]
    if isinstance(y, bool):
        y = int(y)
    if y == 0:
        return splat(x, e.lit(1))  # pow(NaN, 0) is 1
    if e.ct != "f32" or y in (1, 2, 3):  # integers: checked 1 <= y <= 8
        return " * ".join([x] * int(y))
    special = {-1: f"1.0 / {x}", -2: f"1.0 / ({x} * {x})", 0.5: f"tl.sqrt_rn({x})"}
    return special.get(y) or f"{e.h('_pow')}({x}, {splat(x, e.lit(y))})"


def _check_pow_scalar(args: dict[str, Any], ct: str) -> str | None:
    y = args["exponent"]
    if ct == "f32" or (isinstance(y, int) and 0 <= y <= 8):
        return None
    return f"integer pow with exponent {y!r} (only 0..8)"


def _pow_base(e: Emit) -> str:
    base, y = float(e["self"]), e.a("exponent")
    if base == 1.0:
        return splat(y, "1.0")
    if base > 0.0 and math.isfinite(base):
        return f"tl.exp2({y} * {e.lit(math.log2(base))})"
    return f"{e.h('_pow')}({splat(y, e.lit(base))}, {y})"


def _cast(e: Emit) -> str:
    """``_to_copy``/``to``/``clone``: a value cast; fp16/bf16 results are rounded to their type."""
    value = e.a("self", e.out_ct)
    if e.out_dtype in ("float16", "bfloat16"):
        return f"{value}.to(tl.{e.out_dtype}).to(tl.float32)"
    return value


def _check_to_copy(args: dict[str, Any], ct: str) -> str | None:
    if args.get("layout") not in (None, "strided"):
        return f"_to_copy to layout {args['layout']}"
    if args.get("pin_memory"):
        return "_to_copy with pin_memory"
    return None


def _check_gelu(args: dict[str, Any], ct: str) -> str | None:
    if args["approximate"] in ("none", "tanh"):
        return None
    return f"gelu approximate={args['approximate']!r}"


def _gelu(e: Emit) -> str:
    x = e.a("self")
    if e["approximate"] == "tanh":
        inner = f"0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})"
        return f"0.5 * {x} * (1.0 + {e.h('_tanh')}({inner}))"
    return f"0.5 * {x} * (1.0 + {e.h('_erf')}({x} * 0.7071067811865476))"


def _sign(e: Emit) -> str:
    x = e.a("self")
    if e.ct == "i1":
        return x
    one, zero = e.lit(1), e.lit(0)
    return f"tl.where({x} > {zero}, {one}, {zero}) - tl.where({x} < {zero}, {one}, {zero})"


def _trunc(x: str) -> str:
    return f"tl.where({x} < 0.0, tl.ceil({x}), tl.floor({x}))"


def _rounding(float_expr: Callable[[str], str]) -> Op:
    """floor/ceil/trunc/round: the identity on integers."""
    return Op(lambda e: e.a("self") if e.ct != "f32" else float_expr(e.a("self")), ints=True)


def _lerp(e: Emit) -> str:
    a, b, w = e.a("self"), e.a("end"), e.a("weight")
    return f"tl.where(tl.abs({w}) < 0.5, {a} + {w} * ({b} - {a}), {b} - ({b} - {a}) * (1.0 - {w}))"


def _isfinite(e: Emit) -> str:
    x = e.a("self", "own")
    if e.args["self"].ct != "f32":
        return f"{x} == {x}"
    return f'({x} == {x}) & (tl.abs({x}) != float("inf"))'


def _isinf(e: Emit) -> str:
    x = e.a("self", "own")
    if e.args["self"].ct != "f32":
        return f"{x} != {x}"
    return f'tl.abs({x}) == float("inf")'


def _no_floats(args: dict[str, Any], ct: str) -> str | None:
    return "bitwise op on float values" if ct == "f32" else None


def _bitwise(symbol: str) -> Op:
    return Op(lambda e: f"{e.a('self')} {symbol} {e.a('other')}", ints=True, check=_no_floats)


def _logical(symbol: str) -> Op:
    return Op(
        lambda e: f"({e.a('self', 'own')} != 0) {symbol} ({e.a('other', 'own')} != 0)", ints=True
    )


def _clamp_op(lo: str | None, hi: str | None) -> Op:
    def emit(e: Emit) -> str:
        bounds = [e.a(n) if n and e.args.get(n) is not None else None for n in (lo, hi)]
        return clamp(e.a("self"), *bounds)

    def check(args: dict[str, Any], ct: str) -> str | None:
        if all(args.get(n) is None for n in (lo, hi) if n):
            return "clamp without min and max"
        return None

    return Op(emit, ints=True, check=check)


def _unary(fn: str) -> Op:
    return Op(lambda e: f"{fn}({e.a('self')})")


def _helper(fn: str) -> Op:
    return Op(lambda e: f"{e.h(fn)}({e.a('self')})")


def _elu(e: Emit) -> str:
    x, negcoef = e.a("self"), e.lit(float(e["alpha"]) * float(e["scale"]))
    negative = f"{e.h('_expm1')}({x} * {e.a('input_scale')}) * {negcoef}"
    return f"tl.where({x} > 0.0, {x} * {e.a('scale')}, {negative})"


def _softplus(e: Emit) -> str:
    x, beta = e.a("self"), e.a("beta")
    smooth = f"{e.h('_log1p')}(tl.exp({x} * {beta})) / {beta}"
    return f"tl.where({x} * {beta} > {e.a('threshold')}, {x}, {smooth})"


def _hardsigmoid(x: str) -> str:
    return f"{clamp(f'({x} + 3.0)', '0.0', '6.0')} / 6.0"


_TS = ("Tensor", "Scalar")
_CMP = [("eq", "=="), ("ne", "!="), ("lt", "<"), ("le", "<="), ("gt", ">"), ("ge", ">=")]

POINTWISE: dict[str, Op] = {
    # arithmetic; alpha scales the second operand; bool add/mul are or/and as in ATen
    **{f"aten.add.{o}": Op(_add, ints=True) for o in _TS},
    **{
        f"aten.sub.{o}": Op(lambda e: f"{e.a('self')} - {_scaled(e, 'other')}", ints=True)
        for o in _TS
    },
    **{
        f"aten.rsub.{o}": Op(lambda e: f"{e.a('other')} - {_scaled(e, 'self')}", ints=True)
        for o in _TS
    },
    **{f"aten.mul.{o}": Op(_mul, ints=True) for o in _TS},
    **{f"aten.div.{o}": Op(lambda e: f"{e.a('self')} / {e.a('other')}") for o in _TS},
    "aten.neg.default": Op(lambda e: f"-{e.a('self')}", ints=True),
    "aten.abs.default": Op(
        lambda e: e.a("self") if e.ct == "i1" else f"tl.abs({e.a('self')})", ints=True
    ),
    "aten.square.default": Op(lambda e: f"{e.a('self')} * {e.a('self')}", ints=True),
    "aten.reciprocal.default": Op(lambda e: f"1.0 / {e.a('self')}"),
    "aten.maximum.default": Op(_max, ints=True),
    "aten.minimum.default": Op(_min, ints=True),
    "aten.addcmul.default": Op(
        lambda e: f"{e.a('self')} + {e.a('value')} * {e.a('tensor1')} * {e.a('tensor2')}", ints=True
    ),
    "aten.addcdiv.default": Op(
        lambda e: f"{e.a('self')} + {e.a('value')} * ({e.a('tensor1')} / {e.a('tensor2')})"
    ),
    "aten.lerp.Scalar": Op(_lerp),
    "aten.lerp.Tensor": Op(_lerp),
    # powers: small integer exponents are products, the rest IEEE pow (libdevice on the GPU)
    "aten.pow.Tensor_Scalar": Op(_pow_scalar, ints=True, check=_check_pow_scalar),
    "aten.pow.Tensor_Tensor": Op(lambda e: f"{e.h('_pow')}({e.a('self')}, {e.a('exponent')})"),
    "aten.pow.Scalar": Op(_pow_base),
    # exponentials, logarithms, trigonometry
    "aten.exp.default": _unary("tl.exp"),
    "aten.exp2.default": _unary("tl.exp2"),
    "aten.expm1.default": _helper("_expm1"),
    "aten.log.default": _unary("tl.log"),
    "aten.log2.default": _unary("tl.log2"),
    "aten.log10.default": Op(lambda e: f"tl.log({e.a('self')}) * 0.4342944819032518"),
    "aten.log1p.default": _helper("_log1p"),
    "aten.sqrt.default": _unary("tl.sqrt_rn"),
    "aten.rsqrt.default": _unary("tl.rsqrt"),
    "aten.sin.default": _unary("tl.sin"),
    "aten.cos.default": _unary("tl.cos"),
    "aten.erf.default": _helper("_erf"),
    "aten.tanh.default": _helper("_tanh"),
    # activations
    "aten.sigmoid.default": Op(lambda e: f"1.0 / (1.0 + tl.exp(-{e.a('self')}))"),
    "aten.silu.default": Op(lambda e: f"{e.a('self')} / (1.0 + tl.exp(-{e.a('self')}))"),
    "aten.relu.default": Op(
        lambda e: f"tl.where({e.a('self')} < {e.lit(0)}, {e.lit(0)}, {e.a('self')})", ints=True
    ),
    "aten.gelu.default": Op(_gelu, check=_check_gelu),
    "aten.hardsigmoid.default": Op(lambda e: _hardsigmoid(e.a("self"))),
    "aten.hardswish.default": Op(lambda e: f"{e.a('self')} * {_hardsigmoid(e.a('self'))}"),
    "aten.hardtanh.default": Op(
        lambda e: clamp(e.a("self"), e.a("min_val"), e.a("max_val")), ints=True
    ),
    "aten.leaky_relu.default": Op(
        lambda e: (
            f"tl.where({e.a('self')} > 0.0, {e.a('self')}, {e.a('self')} * {e.a('negative_slope')})"
        )
    ),
    "aten.elu.default": Op(_elu),
    "aten.softplus.default": Op(_softplus),
    "aten.mish.default": Op(
        lambda e: f"{e.a('self')} * {e.h('_tanh')}({e.h('_log1p')}(tl.exp({e.a('self')})))"
    ),
    "aten.threshold.default": Op(
        lambda e: f"tl.where({e.a('self')} <= {e.a('threshold')}, {e.a('value')}, {e.a('self')})",
        ints=True,
    ),
    # clamps keep NaN; min > max gives max, as in ATen
    "aten.clamp.default": _clamp_op("min", "max"),
    "aten.clamp.Tensor": _clamp_op("min", "max"),
    "aten.clamp_min.default": _clamp_op("min", None),
    "aten.clamp_min.Tensor": _clamp_op("min", None),
    "aten.clamp_max.default": _clamp_op(None, "max"),
    "aten.clamp_max.Tensor": _clamp_op(None, "max"),
    # selection
    "aten.where.self": Op(
        lambda e: f"tl.where({e.a('condition', 'i1')}, {e.a('self')}, {e.a('other')})", ints=True
    ),
    "aten.masked_fill.Scalar": Op(
        lambda e: f"tl.where({e.a('mask', 'i1')}, {e.a('value')}, {e.a('self')})", ints=True
    ),
    "aten.masked_fill.Tensor": Op(
        lambda e: f"tl.where({e.a('mask', 'i1')}, {e.a('value')}, {e.a('self')})", ints=True
    ),
    # comparisons, in the promoted type of both sides
    **{f"aten.{n}.{o}": _cmp(s) for n, s in _CMP for o in _TS},
    "aten.isnan.default": Op(lambda e: f"{e.a('self', 'own')} != {e.a('self', 'own')}", ints=True),
    "aten.isinf.default": Op(_isinf, ints=True),
    "aten.isfinite.default": Op(_isfinite, ints=True),
    # logical and bitwise
    "aten.logical_and.default": _logical("&"),
    "aten.logical_or.default": _logical("|"),
    "aten.logical_xor.default": _logical("^"),
    "aten.logical_not.default": Op(lambda e: f"{e.a('self', 'own')} == 0", ints=True),
    **{
        f"aten.bitwise_{n}.{o}": _bitwise(s)
        for n, s in [("and", "&"), ("or", "|"), ("xor", "^")]
        for o in _TS
    },
    "aten.bitwise_not.default": Op(
        lambda e: f"{e.a('self')} == 0" if e.ct == "i1" else f"~{e.a('self')}",
        ints=True,
        check=_no_floats,
    ),
    # rounding; round is half to even
    "aten.sign.default": Op(_sign, ints=True),
    "aten.floor.default": _rounding(lambda x: f"tl.floor({x})"),
    "aten.ceil.default": _rounding(lambda x: f"tl.ceil({x})"),
    "aten.trunc.default": _rounding(_trunc),
    "aten.round.default": Op(
        lambda e: e.a("self") if e.ct != "f32" else f"{e.h('_rint')}({e.a('self')})", ints=True
    ),
    "aten.frac.default": Op(lambda e: f"{e.a('self')} - {_trunc(e.a('self'))}"),
    # casts and copies
    "aten._to_copy.default": Op(_cast, ints=True, check=_check_to_copy),
    "aten.to.dtype": Op(_cast, ints=True),
    "aten.clone.default": Op(_cast, ints=True),
}


# --- reductions over the last dimension -------------------------------------------------------


class Builder:
    """What a reduction's ``build`` sees (implemented by the generator)."""

    def let(self, expr: str) -> str:
        """A new line; it is per row if all the lines it reads are, else per element."""
        raise NotImplementedError

    def reduce(self, kind: str, name: str) -> str:
        """A per-row line: the "sum", "max" or "min" of the per-element line ``name``."""
        raise NotImplementedError


@dataclass(frozen=True)
class Reduction:
    """A reduction over the last dim (the schema's ``dim`` argument) or a row op.
    ``keepdim``: the argument that keeps the dim (None: the result has the input's shape).
    ``build(b, x, e)`` adds the lines computing it from line ``x`` and returns the result's."""

    build: Callable[[Builder, str, Emit], str]
    keepdim: str | None = "keepdim"


def _amax(b: Builder, x: str, kind: str) -> str:
    # tl.max may skip NaN on the GPU; ATen's amax returns NaN for a row holding one
    nan = b.reduce("sum", b.let(f"tl.where({x} != {x}, {x}, 0.0)"))
    return b.let(f"{b.reduce(kind, x)} + {nan}")


def _var(b: Builder, x: str, e: Emit) -> str:
    correction = 1.0 if e.args.get("correction") is None else float(e["correction"])
    mean = b.let(f"{b.reduce('sum', x)} / n_cols")
    d = b.let(f"{x} - {mean}")
    ss = b.reduce("sum", b.let(f"{d} * {d}"))
    return b.let(f"{ss} / tl.maximum(n_cols - {literal(correction, 'f32')}, 0.0)")


def _softmax_parts(b: Builder, x: str) -> tuple[str, str, str]:
    m = b.reduce("max", x)
    shifted = b.let(f"{x} - {m}")
    e = b.let(f"tl.exp({shifted})")
    return shifted, e, b.reduce("sum", e)


def _softmax(b: Builder, x: str, e: Emit) -> str:
    _, ex, s = _softmax_parts(b, x)
    return b.let(f"{ex} / {s}")


def _log_softmax(b: Builder, x: str, e: Emit) -> str:
    shifted, _, s = _softmax_parts(b, x)
    return b.let(f"{shifted} - tl.log({s})")


def _logsumexp(b: Builder, x: str, e: Emit) -> str:
    m = b.reduce("max", x)
    m = b.let(f'tl.where(tl.abs({m}) == float("inf"), 0.0, {m})')  # all -inf rows give -inf
    s = b.reduce("sum", b.let(f"tl.exp({x} - {m})"))
    return b.let(f"tl.log({s}) + {m}")


REDUCTIONS: dict[str, Reduction] = {
    "aten.sum.dim_IntList": Reduction(lambda b, x, e: b.reduce("sum", x)),
    "aten.mean.dim": Reduction(lambda b, x, e: b.let(f"{b.reduce('sum', x)} / n_cols")),
    "aten.amax.default": Reduction(lambda b, x, e: _amax(b, x, "max")),
    "aten.amin.default": Reduction(lambda b, x, e: _amax(b, x, "min")),
    "aten.var.correction": Reduction(_var),
    "aten.std.correction": Reduction(lambda b, x, e: b.let(f"tl.sqrt_rn({_var(b, x, e)})")),
    "aten.logsumexp.default": Reduction(_logsumexp),
    "aten.softmax.int": Reduction(_softmax, keepdim=None),
    "aten._softmax.default": Reduction(_softmax, keepdim=None),
    "aten.log_softmax.int": Reduction(_log_softmax, keepdim=None),
    "aten._log_softmax.default": Reduction(_log_softmax, keepdim=None),
}


# --- helpers: Triton functions a generated kernel may call -------------------------------------
# On a GPU the transcendental ones are libdevice's (correctly rounded to a few ulp); Triton's
# interpreter cannot run libdevice, so there the same functions are written out with formulas
# (Kahan's tricks keep expm1/log1p accurate near 0). Each entry: (dependencies, GPU body,
# interpreter body); the body is the function's text after its ``def`` line.

_EXPM1 = """    # Kahan: (u - 1) * x / log(u) with u = exp(x) cancels exp's rounding error near 0
    u = tl.exp(x)
    um1 = u - 1.0
    y = tl.where(um1 == 0.0, x, um1 * (x / tl.log(u)))
    y = tl.where(um1 == -1.0, -1.0, y)
    return tl.where(x > 80.0, u, y)
"""
_LOG1P = """    # Kahan: log(u) * x / (u - 1) with u = 1 + x cancels the rounding of 1 + x
    u = 1.0 + x
    d = u - 1.0
    y = tl.where(d == 0.0, x, tl.log(u) * (x / d))
    return tl.where(u == float("inf"), u, y)
"""
_TANH = """    # tanh|x| = -expm1(-2|x|) / (2 + expm1(-2|x|)), exact near 0, 1 for large |x|
    e = _expm1(-2.0 * tl.abs(x))
    y = -e / (2.0 + e)
    return tl.where(x < 0.0, -y, y)
"""
_POW = """    # exp2(y * log2|x|); negative x: the sign for odd integer y, NaN for fractional y
    r = tl.exp2(y * tl.log2(tl.abs(x)))
    y_int = tl.floor(y) == y
    y_odd = y_int & (tl.floor(y * 0.5) * 2.0 != y)
    r = tl.where((x < 0.0) & y_odd, -r, r)
    r = tl.where((x < 0.0) & (y_int == 0), float("nan"), r)
    return tl.where((y == 0.0) | (x == 1.0), 1.0, r)
"""
_RINT = """    # round half to even; x - floor(x) is exact in fp32
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return tl.where((d > 0.5) | ((d == 0.5) & odd), f + 1.0, f)
"""
# Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7); used only where tl.math has no erf
ERF_FALLBACK = """    t = 1.0 / (1.0 + 0.3275911 * tl.abs(x))
    p = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = 1.0 - p * tl.exp(-x * x)
    return tl.where(x < 0.0, -y, y)
"""


@dataclass(frozen=True)
class Helper:
    gpu: str  # body on a GPU
    interpreter: str  # body under TRITON_INTERPRET=1
    deps: tuple[str, ...] = ()  # helpers the interpreter body calls
    params: str = "x"

    @property
    def libdevice(self) -> bool:
        return "libdevice." in self.gpu


HELPERS: dict[str, Helper] = {
    "_expm1": Helper("    return libdevice.expm1(x)\n", _EXPM1),
    "_log1p": Helper("    return libdevice.log1p(x)\n", _LOG1P),
    "_tanh": Helper("    return libdevice.tanh(x)\n", _TANH, deps=("_expm1",)),
    "_pow": Helper("    return libdevice.pow(x, y)\n", _POW, params="x, y"),
    "_rint": Helper(_RINT, _RINT),
    "_erf": Helper("    return tl.math.erf(x)\n", "    return tl.math.erf(x)\n"),
}
