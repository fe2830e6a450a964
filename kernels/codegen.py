"""Triton code generation for fused groups (:class:`graphopt.ir.program.Program`).

A fused group is a straight line of ATen calls. This module turns it into one Triton kernel, writes
the kernel's source to a disk cache and launches it::

    Program(2, [mul(in0, 0.125), add(node0, in1), _softmax(node1, -1, False)], [node2])

    ->  @triton.jit
        def fused_rows_kernel(in0_ptr, in1_ptr, out0_ptr, n_rows, n_cols, ...):
            rows = ...; cols = ...; mask = ...
            x0 = tl.load(in0_ptr + rows * n_cols + cols, mask=mask, other=0).to(tl.float32)
            x1 = tl.load(in1_ptr + (r0 * stride_in1_r0 + cols), mask=mask, other=0)...
            t0 = x0 * 0.125
            t1 = t0 + x1
            t2 = tl.max(tl.where(mask, t1, float("-inf")), axis=1)[:, None]
            ...
            tl.store(out0_ptr + rows * n_cols + cols, t5, mask=mask)

Two shapes of program are accepted (see :func:`why_not` for the reasons others are refused):

* **pointwise**: every call is elementwise (``codegen_ops.POINTWISE``); the inputs broadcast to one
  shape and every output has that shape. The kernel walks the flattened output in 1-D blocks of
  ``BLOCK_SIZE``; inputs that are contiguous at the output's shape are read at the flat offset,
  others (broadcast, transposed, sliced) through a multi-index over the output's dims, collapsed
  where their strides allow.
* **rows**: one or more reductions over the *last* dim (``codegen_ops.REDUCTIONS``: sum, mean,
  amax, amin, var, std, logsumexp, softmax, log_softmax) of tensors of one shape ``S``, with a
  pointwise prologue and an epilogue that broadcasts per-row results back (``keepdim=True``).
  Outputs have shape ``S`` or are per-row (``S[:-1] + (1,)`` or ``S[:-1]``). The kernel views
  ``S`` as ``[n_rows, n_cols]``; a program instance handles ``BLOCK_M`` rows. When a row fits in
  ``PERSISTENT_MAX_COLS`` it is held in registers and read once (``fused_rows_kernel``); longer
  rows are walked in ``LOOP_BLOCK_N`` chunks, once per chain of dependent reductions plus once to
  write (``fused_rows_loop_kernel``).

Values are computed in fp32 whatever their float dtype (fp16/bf16 loads are widened, results are
rounded once when stored or explicitly cast) and in their own type when integer or bool;
reductions accumulate in fp32. Result dtypes follow ATen's type promotion: the analysis runs the
program on meta tensors.

The kernel source is keyed by the program's structure, the inputs' dtypes, ranks and broadcast
pattern and the memory-access pattern (which inputs are contiguous, which strides are 0 or 1),
never by concrete sizes, so one kernel serves every batch size. It is written to
``$GRAPHOPT_CACHE_DIR/kernels/<key>.py`` (default ``~/.cache/graphopt``), imported from there and
memoized in-process; another process finds the file and reuses it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from graphopt.errors import GraphoptError, SerializationError
from graphopt.ir.program import Program, Ref
from graphopt.kernels.activations import has_math_erf
from graphopt.kernels.cache import cache_dir
from graphopt.kernels.codegen_ops import (
    ERF_FALLBACK,
    HELPERS,
    POINTWISE,
    REDUCTIONS,
    TL,
    Builder,
    Emit,
    TArg,
)

__all__ = [
    "SUPPORTED_OPS",
    "CacheStats",
    "UnsupportedProgram",
    "cache_stats",
    "clear_memory_cache",
    "generate",
    "run",
    "why_not",
]

SUPPORTED_OPS: frozenset[str] = frozenset(POINTWISE) | frozenset(REDUCTIONS)

VERSION = "1"  # bump when the generated text changes, so stale cache files are not reused
BLOCK_SIZE = 1024  # pointwise: elements per program instance
POINTWISE_WARPS = 4
PERSISTENT_MAX_COLS = 4096  # rows up to this (padded to a power of 2) are held in registers
LOOP_BLOCK_N = 1024  # chunk of a longer row
ROW_TILE = 1024  # persistent rows kernel: about this many elements per program instance

# compute type of each supported dtype: floats are computed in fp32
_CT: dict[torch.dtype, str] = {
    torch.float16: "f32",
    torch.bfloat16: "f32",
    torch.float32: "f32",
    torch.int8: "i8",
    torch.int16: "i16",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.uint8: "u8",
    torch.bool: "i1",
}
_HALVES = (torch.float16, torch.bfloat16)
_INDEX_LIMIT = 2**31  # offsets at or past this need 64-bit index math
_IDENTITY = {"sum": "0.0", "max": 'float("-inf")', "min": 'float("inf")'}


class UnsupportedProgram(GraphoptError):
    """``run`` or ``generate`` was given a program or inputs that :func:`why_not` refuses."""


class _Refused(Exception):
    """Internal: the analysis refuses the program; the message is the reason."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- analysis: the program as lines of Triton --------------------------------------------------


@dataclass(frozen=True)
class _Line:
    """``name = expr``. ``kind``: "full" (one value per element) or "row" (one per row).
    A load line has ``load`` = the input's index; a reduction line has ``reduce`` = sum/max/min
    and ``expr`` = the name of the line it reduces."""

    name: str
    expr: str
    kind: str
    deps: tuple[str, ...]
    load: int | None = None
    reduce: str | None = None


@dataclass(frozen=True)
class _Output:
    name: str  # the line stored; it holds the output's compute type
    dtype: torch.dtype
    kind: str  # "full", "row1" (per row, keepdim) or "row0" (per row, dim dropped)


@dataclass
class _Plan:
    mode: str  # "flat" (pointwise) or "rows" (last-dim reductions)
    lines: tuple[_Line, ...]
    outputs: tuple[_Output, ...]
    used: tuple[int, ...]  # the inputs the outputs depend on, in order
    in_dtypes: tuple[torch.dtype, ...]
    helpers: frozenset[str]
    by_name: dict[str, _Line] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {ln.name: ln for ln in self.lines}


class _Lines(Builder):
    """Collects lines; a line is per row only if all of its inputs are."""

    def __init__(self) -> None:
        self.lines: list[_Line] = []
        self.kinds: dict[str, str] = {}

    def load(self, k: int) -> str:
        return self._add(_Line(f"x{k}", "", "full", (), load=k))

    def let(self, expr: str) -> str:
        deps = tuple(dict.fromkeys(t for t in _words(expr) if t in self.kinds))
        kind = "row" if deps and all(self.kinds[d] == "row" for d in deps) else "full"
        return self._add(_Line(self._name(), expr, kind, deps))

    def reduce(self, kind: str, name: str) -> str:
        assert self.kinds[name] == "full", "a reduction reads a per-element line"
        return self._add(_Line(self._name(), name, "row", (name,), reduce=kind))

    def _name(self) -> str:
        return f"t{len(self.lines)}"

    def _add(self, line: _Line) -> str:
        self.lines.append(line)
        self.kinds[line.name] = line.kind
        return line.name


def _words(expr: str) -> list[str]:
    """The identifiers of an expression (line names are ``x<k>`` and ``t<k>``)."""
    return "".join(ch if ch.isalnum() or ch == "_" else " " for ch in expr).split()


def _size_hint(s: Any) -> int:
    """A concrete size for a (possibly symbolic) dim: why_not may get FakeTensors."""
    if isinstance(s, int):
        return s
    hint = getattr(getattr(s, "node", None), "hint", None)
    return int(hint) if hint is not None else 8  # unbacked: any size but 0 and 1 behaves alike


def _bind(schema: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    positional = list(args)
    for arg in schema.arguments:
        if positional and not arg.kwarg_only:
            bound[arg.name] = positional.pop(0)
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise _Refused(f"{schema.name} is missing argument {arg.name!r}")
    return bound


def _refs(value: Any) -> list[Ref]:
    if isinstance(value, Ref):
        return [value]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    return []


def _check_last_dim(op: str, dims: Any, rank: int) -> None:
    if dims is None or dims == () or dims == []:
        dims = tuple(range(rank))  # None and [] reduce over every dim
    elif isinstance(dims, int):
        dims = (dims,)
    if sorted({d % rank for d in dims}) != [rank - 1]:
        raise _Refused(
            f"{op} reduces dims {list(dims)} of a {rank}-d tensor; only the last dim is supported"
        )


class _Analysis:
    """Runs the program on meta tensors (ATen's promotion and broadcasting), finds the iteration
    space, tells per-element from per-row values and turns each call into lines."""

    def __init__(self, program: Program, inputs: Sequence[Any]) -> None:
        self.program = program
        self.metas = self._meta_inputs(inputs)
        self.device = inputs[0].device.type
        self.values: list[torch.Tensor] = []
        self.bound: list[dict[str, Any]] = []
        for call in program.calls:
            self._meta_call(call)
        if not program.outputs:
            raise _Refused("program has no outputs")
        self.mode, self.shape = self._space()
        self.kinds = self._kinds()
        self.out_kinds = self._output_kinds()

    @staticmethod
    def _meta_inputs(inputs: Sequence[Any]) -> list[torch.Tensor]:
        if not inputs:
            raise _Refused("no tensor inputs")
        metas = []
        for k, x in enumerate(inputs):
            if not isinstance(x, torch.Tensor):
                raise _Refused(f"input {k} is a {type(x).__name__}, not a tensor")
            if x.dtype not in _CT:
                raise _Refused(f"{_dtype_name(x.dtype)} inputs")
            shape = [_size_hint(s) for s in x.shape]
            metas.append(torch.empty(shape, dtype=x.dtype, device="meta"))
        return metas

    def value(self, a: Any) -> Any:
        """The meta tensor a reference stands for (literals as they are)."""
        if isinstance(a, Ref):
            if a.kind == "item":
                raise _Refused("tuple results (getitem) are not supported")
            return self.metas[a.index] if a.kind == "in" else self.values[a.index]
        if isinstance(a, tuple):
            return tuple(self.value(v) for v in a)
        if isinstance(a, torch.device):
            if self.device != "meta" and a.type != self.device:
                raise _Refused(f"a copy to {a.type}")
            return torch.device("meta")
        return a

    def _meta_call(self, call: Any) -> None:
        if call.op not in SUPPORTED_OPS:
            raise _Refused(f"op {call.op} is not supported")
        try:
            overload = call.overload
        except SerializationError as exc:
            raise _Refused(str(exc)) from None
        args = [self.value(a) for a in call.args]
        kwargs = {k: self.value(v) for k, v in call.kwargs}
        try:
            out = overload(*args, **kwargs)
        except Exception as exc:  # ATen's own argument checks
            first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
            raise _Refused(f"{call.op} fails on these inputs: {first}") from None
        if not isinstance(out, torch.Tensor):
            raise _Refused(f"{call.op} returns a {type(out).__name__}")
        if out.dtype not in _CT:
            raise _Refused(f"{call.op} computes in {_dtype_name(out.dtype)}")
        self.values.append(out)
        self.bound.append(_bind(overload._schema, call.args, dict(call.kwargs)))

    def _space(self) -> tuple[str, tuple[int, ...]]:
        """ "flat" and the broadcast shape, or "rows" and the shape of the reduced tensors."""
        try:
            broadcast = tuple(torch.broadcast_shapes(*[m.shape for m in self.metas]))
        except RuntimeError:
            raise _Refused("inputs do not broadcast to one shape") from None
        calls = self.program.calls
        reductions = [j for j, c in enumerate(calls) if c.op in REDUCTIONS]
        if not reductions:
            return "flat", broadcast
        shapes = {tuple(self.value(self.bound[j]["self"]).shape) for j in reductions}
        if len(shapes) > 1:
            raise _Refused(f"reductions over tensors of different shapes {sorted(shapes)}")
        shape = shapes.pop()
        if not shape:
            raise _Refused("reduction of a 0-d tensor")
        for j in reductions:
            _check_last_dim(calls[j].op, self.bound[j]["dim"], len(shape))
        if broadcast != shape:
            raise _Refused(
                f"inputs broadcast to {list(broadcast)}, not to the reduced {list(shape)}"
            )
        return "rows", shape

    def kind(self, ref: Ref) -> str:
        return "full" if ref.kind == "in" else self.kinds[ref.index]

    def _kinds(self) -> list[str]:
        """Per element ("full") or per row ("row1": keepdim, "row0": the dim dropped)."""
        self.kinds = []
        for call, bound in zip(self.program.calls, self.bound):
            if call.op in REDUCTIONS:
                src = bound["self"]
                if self.kind(src) != "full" or tuple(self.value(src).shape) != self.shape:
                    raise _Refused(f"{call.op} of a per-row value")
                keep = REDUCTIONS[call.op].keepdim
                self.kinds.append("full" if keep is None else "row1" if bound[keep] else "row0")
                continue
            ks = {self.kind(r) for v in bound.values() for r in _refs(v)}
            if len(self.shape) == 1:  # a dropped dim of a 1-d tensor broadcasts like a kept one
                ks = {"row1" if k == "row0" else k for k in ks}
            if "row0" in ks and len(ks) > 1:
                raise _Refused(f"{call.op} broadcasts a per-row result without keepdim")
            self.kinds.append("full" if "full" in ks or not ks else ks.pop())
        return self.kinds

    def _output_kinds(self) -> list[str]:
        s = self.shape
        expected = {"full": s, "row1": s[:-1] + (1,), "row0": s[:-1]}
        kinds = []
        for i, ref in enumerate(self.program.outputs):
            k, shape = self.kind(ref), list(self.value(ref).shape)
            if shape != list(expected[k]):
                what = "the inputs' broadcast shape" if self.mode == "flat" else f"its {k} shape"
                raise _Refused(f"output {i} has shape {shape}, not {what} {list(expected[k])}")
            kinds.append(k)
        return kinds

    # lines ------------------------------------------------------------------------------
    def plan(self) -> _Plan:
        lines, helpers = _Lines(), set[str]()
        names = [lines.load(k) for k in range(len(self.metas))]
        nodes: list[str] = []

        def arg(a: Any) -> Any:
            if isinstance(a, Ref):
                v = self.value(a)
                name = names[a.index] if a.kind == "in" else nodes[a.index]
                return TArg(name, _CT[v.dtype], _dtype_name(v.dtype))
            if isinstance(a, (torch.dtype, torch.layout)):
                return str(a).removeprefix("torch.")
            return tuple(arg(v) for v in a) if isinstance(a, tuple) else a

        for call, bound, out in zip(self.program.calls, self.bound, self.values):
            args = {k: arg(v) for k, v in bound.items()}
            nodes.append(self._call(lines, call.op, args, bound, out, helpers))
        outputs = []
        for ref, k in zip(self.program.outputs, self.out_kinds):
            name = names[ref.index] if ref.kind == "in" else nodes[ref.index]
            outputs.append(_Output(name, self.value(ref).dtype, k))
        kept = _live(lines.lines, [o.name for o in outputs])
        used = tuple(ln.load for ln in kept if ln.load is not None)
        in_dtypes = tuple(m.dtype for m in self.metas)
        return _Plan(self.mode, kept, tuple(outputs), used, in_dtypes, frozenset(helpers))

    def _call(
        self,
        lines: _Lines,
        op: str,
        args: dict[str, Any],
        bound: dict[str, Any],
        out: torch.Tensor,
        helpers: set[str],
    ) -> str:
        out_ct, out_dtype = _CT[out.dtype], _dtype_name(out.dtype)
        if op in REDUCTIONS:
            src = args["self"]
            if src.ct != "f32" or out_ct != "f32":
                raise _Refused(f"{op} over {src.dtype} values")
            e = Emit(args, "f32", out_ct, out_dtype, helpers)
            return REDUCTIONS[op].build(lines, src.name, e)
        spec = POINTWISE[op]
        ct = out_ct
        if spec.compute == "common":
            ct = _CT[torch.result_type(self.value(bound["self"]), self.value(bound["other"]))]
        if ct != "f32" and not spec.ints:
            raise _Refused(f"{op} on {out_dtype} values")
        reason = spec.check(args, ct) if spec.check else None
        if reason:
            raise _Refused(reason)
        expr = spec.emit(Emit(args, ct, out_ct, out_dtype, helpers))
        if out_ct not in ("f32", "i1"):  # Triton may widen narrow ints and int literals
            expr = f"({expr}).to({TL[out_ct]})"
        return lines.let(expr)


def _live(lines: list[_Line], roots: list[str]) -> tuple[_Line, ...]:
    """The lines the roots need, in order."""
    by_name = {ln.name: ln for ln in lines}
    live: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in live:
            live.add(name)
            stack.extend(by_name[name].deps)
    return tuple(ln for ln in lines if ln.name in live)


# --- memory layout: how each input is addressed ------------------------------------------------


@dataclass(frozen=True)
class _Layout:
    """The access pattern of one call (part of the kernel's key) and its launch arguments.

    ``key`` is ``(mode, idx64, access)`` with one entry per used input: "c" when it is
    contiguous at the iteration shape (read at the flat offset), else ``(dims, col)``: the
    class ("0", "1" or "n") of its stride in each collapsed dim of the (row) multi-index, and of
    its stride along the row ("" for flat programs)."""

    key: tuple[Any, ...]
    sizes: tuple[int, ...]  # collapsed dims of the (row) multi-index
    strides: tuple[int, ...]  # the "n" strides, which the kernel takes as arguments, in order
    numel: int
    n_rows: int
    n_cols: int


def _stride_class(s: int) -> str:
    return "0" if s == 0 else "1" if s == 1 else "n"


def _expanded_strides(x: torch.Tensor, shape: tuple[int, ...]) -> list[int]:
    """``x``'s strides once broadcast to ``shape`` (0 along broadcast dims)."""
    off = len(shape) - x.dim()
    es = [0] * len(shape)
    for d, (size, stride) in enumerate(zip(x.shape, x.stride())):
        if size != 1:
            es[off + d] = stride
    return es


def _collapse(
    shape: tuple[int, ...], strided: dict[int, list[int]], ndims: int
) -> tuple[list[int], dict[int, list[int]]]:
    """Merge neighbouring dims of ``shape[:ndims]`` that every strided input walks as one."""
    sizes: list[int] = []
    per: dict[int, list[int]] = {k: [] for k in strided}
    for d in range(ndims):
        if shape[d] == 1:
            continue
        if sizes and all(per[k][-1] == shape[d] * es[d] for k, es in strided.items()):
            sizes[-1] *= shape[d]
            for k, es in strided.items():
                per[k][-1] = es[d]
        else:
            sizes.append(shape[d])
            for k, es in strided.items():
                per[k].append(es[d])
    return sizes, per


def _layout(plan: _Plan, inputs: Sequence[torch.Tensor], shape: tuple[int, ...]) -> _Layout:
    rows = plan.mode == "rows"
    numel = math.prod(shape)
    dense = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    idx64 = numel >= _INDEX_LIMIT
    strided: dict[int, list[int]] = {}
    for k in plan.used:
        es = _expanded_strides(inputs[k], shape)
        if any(es[d] != dense[d] for d in range(len(shape)) if shape[d] != 1):
            strided[k] = es
            idx64 |= sum((size - 1) * s for size, s in zip(shape, es)) >= _INDEX_LIMIT
    n_cols = shape[-1] if rows else 1
    sizes, per = _collapse(shape, strided, len(shape) - 1 if rows else len(shape))
    access: list[Any] = []
    strides: list[int] = []
    for k in plan.used:
        if k not in strided:
            access.append("c")
            continue
        col_stride = strided[k][-1] if rows and n_cols != 1 else 0
        dims = tuple(_stride_class(s) for s in per[k])
        col = _stride_class(col_stride) if rows else ""
        strides += [s for s in per[k] if _stride_class(s) == "n"]
        strides += [col_stride] if col == "n" else []
        access.append((dims, col))
    n_rows = numel // n_cols if n_cols else 0
    return _Layout(
        (plan.mode, idx64, tuple(access)), tuple(sizes), tuple(strides), numel, n_rows, n_cols
    )


# --- source ---------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _helpers_source(names: frozenset[str], interp: bool) -> list[str]:
    """The helper functions the kernel calls, each after the helpers it calls."""
    order: list[str] = []

    def add(name: str) -> None:
        for dep in HELPERS[name].deps if interp else ():
            add(dep)
        if name not in order:
            order.append(name)

    for name in sorted(names):
        add(name)
    out: list[str] = []
    for name in order:
        helper = HELPERS[name]
        body = helper.interpreter if interp else helper.gpu
        if name == "_erf" and not has_math_erf():
            body = ERF_FALLBACK
        out += ["", "", "@triton.jit", f"def {name}({helper.params}):", body.rstrip("\n")]
    return out


def _index_math(var: str, prefix: str, size: str, k: int, needed: set[int]) -> list[str]:
    """Lines computing ``<prefix><d>`` for the dims ``d`` in ``needed`` of the ``k``-dim
    multi-index of the flat index ``var``, whose dims have sizes ``<size><d>``."""
    if not needed:
        return []
    if k == 1:
        return [f"{prefix}0 = {var}"]
    lo, rest, out = min(needed), var, []
    for d in range(k - 1, max(lo, 1) - 1, -1):
        if d in needed:
            out.append(f"{prefix}{d} = {rest} % {size}{d}")
        if d - 1 >= lo:
            nxt = f"{prefix}0" if d == 1 else f"{prefix}q{d}"
            out.append(f"{nxt} = {rest} // {size}{d}")
            rest = nxt
    return out


class _Source:
    """The text of one kernel file: helpers, then the kernel(s) for the plan and layout."""

    def __init__(self, plan: _Plan, layout_key: tuple[Any, ...], interp: bool):
        self.plan = plan
        self.mode, self.idx64, access = layout_key
        self.rows = self.mode == "rows"
        self.interp = interp
        self.access = dict(zip(plan.used, access))
        self.k = next((len(a[0]) for a in access if a != "c"), 0)  # collapsed index dims

    def text(self, key_text: str) -> str:
        out = [
            f"# Generated by graphopt.kernels.codegen v{VERSION}; do not edit.",
            f"# key: {key_text}",
            "import triton",
            "import triton.language as tl",
        ]
        if not self.interp and any(HELPERS[h].libdevice for h in self.plan.helpers):
            out += [
                "",
                "try:",
                "    from triton.language.extra import libdevice",
                "except ImportError:  # older Triton",
                "    from triton.language.extra.cuda import libdevice",
            ]
        out += _helpers_source(self.plan.helpers, self.interp)
        if self.rows:
            out += self.rows_kernel() + self.rows_loop_kernel()
        else:
            out += self.flat_kernel()
        return "\n".join(out) + "\n"

    # signature and addressing -------------------------------------------------------------
    def params(self) -> list[str]:
        ps = [f"in{k}_ptr" for k in self.plan.used]
        ps += [f"out{i}_ptr" for i in range(len(self.plan.outputs))]
        ps += ["n_rows", "n_cols"] if self.rows else ["n_elements"]
        ps += [f"{'rsize_' if self.rows else 'size_'}{d}" for d in range(1, self.k)]
        for k, a in self.access.items():
            if a != "c":
                ps += [self._stride(k, d) for d, c in enumerate(a[0]) if c == "n"]
                ps += [f"stride_in{k}_c"] if a[1] == "n" else []
        if self.rows:
            return ps + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]
        return ps + ["BLOCK_SIZE: tl.constexpr"]

    def _stride(self, k: int, d: int) -> str:
        return f"stride_in{k}_r{d}" if self.rows else f"stride_in{k}_{d}"

    def _pid(self) -> str:
        return "tl.program_id(0).to(tl.int64)" if self.idx64 else "tl.program_id(0)"

    def _index(self, var: str) -> list[str]:
        needed = {
            d for a in self.access.values() if a != "c" for d, c in enumerate(a[0]) if c != "0"
        }
        return _index_math(
            var, "r" if self.rows else "i", "rsize_" if self.rows else "size_", self.k, needed
        )

    def load(self, k: int) -> str:
        a = self.access[k]
        flat, mask = ("rows * n_cols + cols", "mask") if self.rows else ("offs", "mask")
        if a != "c":
            dim = "r" if self.rows else "i"
            terms = [
                f"{dim}{d}" + ("" if c == "1" else f" * {self._stride(k, d)}")
                for d, c in enumerate(a[0])
                if c != "0"
            ]
            mask = "row_mask" if self.rows else "mask"
            if self.rows and a[1] != "0":  # a per-row input (col stride 0) loads one value per row
                terms.append("cols" if a[1] == "1" else f"cols * stride_in{k}_c")
                mask = "mask"
            if not terms:  # one element for all: a scalar load, splat to a block
                shape = "[BLOCK_M, 1]" if self.rows else "[BLOCK_SIZE]"
                return self._widen(f"tl.broadcast_to(tl.load(in{k}_ptr), {shape})", k)
            flat = terms[0] if len(terms) == 1 else f"({' + '.join(terms)})"
        return self._widen(f"tl.load(in{k}_ptr + {flat}, mask={mask}, other=0)", k)

    def _widen(self, expr: str, k: int) -> str:
        return f"{expr}.to(tl.float32)" if self.plan.in_dtypes[k] in _HALVES else expr

    def store(self, i: int) -> str:
        out = self.plan.outputs[i]
        value = out.name
        if out.dtype in _HALVES:  # the one rounding of a half-precision result
            value = f"{out.name}.to(tl.{_dtype_name(out.dtype)})"
        if not self.rows:
            return f"tl.store(out{i}_ptr + offs, {value}, mask=mask)"
        if out.kind == "full":
            return f"tl.store(out{i}_ptr + rows * n_cols + cols, {value}, mask=mask)"
        return f"tl.store(out{i}_ptr + rows, {value}, mask=row_mask)"

    def line(self, ln: _Line) -> str:
        if ln.load is not None:
            return f"{ln.name} = {self.load(ln.load)}"
        if ln.reduce is not None:
            masked = f"tl.where(mask, {ln.expr}, {_IDENTITY[ln.reduce]})"
            return f"{ln.name} = tl.{ln.reduce}({masked}, axis=1)[:, None]"
        return f"{ln.name} = {ln.expr}"

    def _function(self, name: str, body: list[str]) -> list[str]:
        params = "".join(f"    {p},\n" for p in self.params())
        return ["", "", "@triton.jit", f"def {name}(\n{params}):", *("    " + s for s in body)]

    # kernels ------------------------------------------------------------------------------
    def flat_kernel(self) -> list[str]:
        body = [
            f"pid = {self._pid()}",
            "offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)",
            "mask = offs < n_elements",
            *self._index("offs"),
            *(self.line(ln) for ln in self.plan.lines),
            *(self.store(i) for i in range(len(self.plan.outputs))),
        ]
        return self._function("fused_kernel", body)

    def _rows_prologue(self) -> list[str]:
        return [
            f"pid = {self._pid()}",
            "rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]",
            "row_mask = rows < n_rows",
            *self._index("rows"),
        ]

    def rows_kernel(self) -> list[str]:
        """Rows that fit in registers: read once, every line computed once."""
        body = [
            *self._rows_prologue(),
            "cols = tl.arange(0, BLOCK_N)[None, :]",
            "mask = row_mask & (cols < n_cols)",
            *(self.line(ln) for ln in self.plan.lines),
            *(self.store(i) for i in range(len(self.plan.outputs))),
        ]
        return self._function("fused_rows_kernel", body)

    def rows_loop_kernel(self) -> list[str]:
        """Long rows: one walk along the row per level of dependent reductions (the variance
        needs the mean first), then one that computes and stores the per-element outputs."""
        plan = self.plan
        level = _reduction_levels(plan)
        passes = max(level.values(), default=-1) + 1
        body = self._rows_prologue()
        known: set[str] = set()
        for p in range(passes + 1):
            reds = [ln for ln in plan.lines if ln.reduce is not None and level[ln.name] == p]
            stores = [i for i, o in enumerate(plan.outputs) if o.kind == "full" and p == passes]
            if reds or stores:
                body += self._walk(reds, stores)
            for ln in reds:
                body.append(f"{ln.name} = tl.{ln.reduce}(acc_{ln.name}, axis=1)[:, None]")
                known.add(ln.name)
            for ln in plan.lines:  # per-row lines whose inputs are now known
                if ln.kind == "row" and ln.name not in known and all(d in known for d in ln.deps):
                    body.append(self.line(ln))
                    known.add(ln.name)
        body += [self.store(i) for i, o in enumerate(plan.outputs) if o.kind != "full"]
        return self._function("fused_rows_loop_kernel", body)

    def _walk(self, reds: list[_Line], stores: list[int]) -> list[str]:
        """One loop along the row: accumulate ``reds``, store the ``stores`` outputs."""
        plan = self.plan
        roots = [ln.expr for ln in reds] + [plan.outputs[i].name for i in stores]
        cone = _full_cone(plan, roots)
        out = [
            f"acc_{ln.name} = tl.full([BLOCK_M, BLOCK_N], {_IDENTITY[ln.reduce]}, tl.float32)"
            for ln in reds
        ]
        loop = [
            "cols = col0 + tl.arange(0, BLOCK_N)[None, :]",
            "mask = row_mask & (cols < n_cols)",
            *(self.line(ln) for ln in plan.lines if ln.name in cone),
        ]
        for ln in reds:
            masked = f"tl.where(mask, {ln.expr}, {_IDENTITY[ln.reduce]})"
            if ln.reduce == "sum":
                loop.append(f"acc_{ln.name} += {masked}")
            else:
                fn = {"max": "tl.maximum", "min": "tl.minimum"}[ln.reduce]
                loop.append(f"acc_{ln.name} = {fn}(acc_{ln.name}, {masked})")
        loop += [self.store(i) for i in stores]
        return [*out, "for col0 in range(0, n_cols, BLOCK_N):", *("    " + s for s in loop)]


def _full_cone(plan: _Plan, roots: list[str]) -> set[str]:
    """The per-element lines the roots are computed from (per-row lines are known already)."""
    out: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in out and plan.by_name[name].kind == "full":
            out.add(name)
            stack.extend(plan.by_name[name].deps)
    return out


def _reduction_levels(plan: _Plan) -> dict[str, int]:
    """For each reduction line: the walk along the row that computes it (0 for reductions of
    the inputs, 1 for those that need a level-0 result, ...)."""
    level: dict[str, int] = {}
    row_level: dict[str, int] = {}  # per-row line -> the walk after which it is known
    for ln in plan.lines:
        if ln.reduce is not None:
            needs = [row_level[n] for n in _row_inputs(plan, ln.expr)]
            level[ln.name] = row_level[ln.name] = 1 + max(needs, default=-1)
        elif ln.kind == "row":
            row_level[ln.name] = max(row_level[d] for d in ln.deps)
    return level


def _row_inputs(plan: _Plan, name: str) -> set[str]:
    """The per-row lines a per-element line depends on."""
    cone = _full_cone(plan, [name])
    return {d for n in cone for d in plan.by_name[n].deps if plan.by_name[d].kind == "row"}


# --- cache --------------------------------------------------------------------------------------


@dataclass
class CacheStats:
    """Counters of the kernel cache (tests and ``graphopt debug`` read them)."""

    generated: int = 0  # kernel files written
    disk_hits: int = 0  # kernel files found on disk and imported
    memory_hits: int = 0  # kernels found in this process's memo
    files: list[str] = field(default_factory=list)  # the files imported, in order


cache_stats = CacheStats()
_PLANS: dict[tuple[Any, ...], _Plan | str] = {}
_MODULES: dict[tuple[Any, ...], ModuleType] = {}
_MAX_PLANS = 4096  # why_not is asked about many candidate groups; forget them past this


def clear_memory_cache() -> None:
    """Forget the in-process memo (the disk cache stays)."""
    _PLANS.clear()
    _MODULES.clear()


def _input_key(inputs: Sequence[Any]) -> tuple[Any, ...]:
    """What a plan depends on: dtypes, ranks, broadcast pattern (dims of size 1), device."""
    return tuple(
        (x.dtype, tuple(_size_hint(s) == 1 for s in x.shape), x.device.type)
        if isinstance(x, torch.Tensor)
        else type(x)
        for x in inputs
    )


def _plan_for(program: Program, inputs: Sequence[Any]) -> _Plan:
    key = (program.key, _input_key(inputs))
    plan = _PLANS.get(key)
    if plan is None:
        try:
            if len(inputs) != program.n_inputs:
                raise _Refused(f"program takes {program.n_inputs} inputs, got {len(inputs)}")
            plan = _Analysis(program, inputs).plan()
        except _Refused as exc:
            plan = str(exc)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    if isinstance(plan, str):
        raise _Refused(plan)
    return plan


def _key_text(program: Program, inputs: Sequence[Any], layout_key: tuple[Any, ...]) -> str:
    """Everything the kernel text depends on; the file name is its hash."""
    ins = ",".join(
        f"{_dtype_name(x.dtype)}:{''.join('1' if _size_hint(s) == 1 else 'n' for s in x.shape)}"
        for x in inputs
    )
    target = "interpret" if _interpreting() else "gpu"
    erf = "" if has_math_erf() else ":erf-fallback"
    return f"v{VERSION}:{target}{erf} program={program.key} inputs={ins} layout={layout_key!r}"


def _import(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # Triton reads a kernel's source through its module
    spec.loader.exec_module(module)
    return module


def _load_cached(path: Path, key_text: str, name: str) -> ModuleType | None:
    """The kernel module at ``path`` if it is there, whole and for this key."""
    try:
        with open(path) as f:
            f.readline()
            if f.readline().rstrip("\n") != f"# key: {key_text}":
                return None
        return _import(path, name)
    except (OSError, SyntaxError, ImportError):
        return None  # missing or damaged: written again


def _kernel_module(
    program: Program, inputs: Sequence[Any], plan: _Plan, layout: _Layout
) -> ModuleType:
    memo = (program.key, _input_key(inputs), layout.key, _interpreting())
    module = _MODULES.get(memo)
    if module is not None:
        cache_stats.memory_hits += 1
        return module
    key_text = _key_text(program, inputs, layout.key)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    directory = cache_dir() / "kernels"
    path, name = directory / f"{key}.py", f"graphopt_kernel_{key}"
    module = _load_cached(path, key_text, name)
    if module is not None:
        cache_stats.disk_hits += 1
    else:
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(_Source(plan, layout.key, _interpreting()).text(key_text))
        os.replace(tmp, path)  # atomic: a concurrent reader sees no file or the whole file
        module = _import(path, name)
        cache_stats.generated += 1
    cache_stats.files.append(str(path))
    _MODULES[memo] = module
    return module


# --- public API -----------------------------------------------------------------------------------


def why_not(program: Program, inputs: Sequence[torch.Tensor]) -> str | None:
    """None if :func:`run` can run ``program`` on inputs of these shapes and dtypes, else the
    reason ("op aten.cumsum.default is not supported", "... only the last dim is supported").

    Only metadata is read (shape, dtype, device): FakeTensors, also with symbolic sizes, and meta
    tensors are fine.
    """
    try:
        _plan_for(program, inputs)
    except _Refused as exc:
        return str(exc)
    return None


def generate(program: Program, inputs: Sequence[torch.Tensor]) -> str:
    """The Triton source :func:`run` uses for these inputs (their strides matter)."""
    try:
        plan = _plan_for(program, inputs)
    except _Refused as exc:
        raise UnsupportedProgram(f"cannot generate a kernel: {exc}") from None
    shape = tuple(torch.broadcast_shapes(*[x.shape for x in inputs]))
    layout = _layout(plan, inputs, shape)
    return _Source(plan, layout.key, _interpreting()).text(_key_text(program, inputs, layout.key))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check_device(inputs: Sequence[torch.Tensor]) -> torch.device:
    device = inputs[0].device
    if any(x.device != device for x in inputs):
        names = sorted({str(x.device) for x in inputs})
        raise UnsupportedProgram(f"fused program inputs are on several devices: {names}")
    if device.type != "cuda" and not (device.type == "cpu" and _interpreting()):
        raise UnsupportedProgram(
            f"fused kernels run on CUDA tensors, got {device.type} tensors "
            "(TRITON_INTERPRET=1 runs them on the CPU, slowly)"
        )
    return device


def _launch(module: ModuleType, plan: _Plan, layout: _Layout, tensors: list[torch.Tensor]) -> None:
    if plan.mode == "flat":
        grid = (_cdiv(layout.numel, BLOCK_SIZE),)
        args = [*tensors, layout.numel, *layout.sizes[1:], *layout.strides]
        module.fused_kernel[grid](*args, BLOCK_SIZE=BLOCK_SIZE, num_warps=POINTWISE_WARPS)
        return
    block_n = _next_pow2(layout.n_cols)
    if block_n <= PERSISTENT_MAX_COLS:
        block_m = min(max(1, ROW_TILE // block_n), _next_pow2(layout.n_rows))
        kernel, warps = module.fused_rows_kernel, 4 if block_m * block_n <= 2048 else 8
    else:
        block_n, block_m = LOOP_BLOCK_N, 1
        kernel, warps = module.fused_rows_loop_kernel, 8
    grid = (_cdiv(layout.n_rows, block_m),)
    args = [*tensors, layout.n_rows, layout.n_cols, *layout.sizes[1:], *layout.strides]
    kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)


def run(program: Program, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Run ``program`` on ``inputs`` with a generated Triton kernel.

    The results match ``program.run(inputs)`` in shape, dtype and value (within float rounding)
    and are new contiguous tensors. Inputs are CUDA tensors on one device (CPU tensors under
    ``TRITON_INTERPRET=1``).
    """
    inputs = list(inputs)
    try:
        plan = _plan_for(program, inputs)
    except _Refused as exc:
        raise UnsupportedProgram(f"cannot run fused program: {exc}") from None
    device = _check_device(inputs)
    shape = tuple(torch.broadcast_shapes(*[x.shape for x in inputs]))
    if math.prod(shape) == 0:  # nothing to launch; the reference makes the empty results
        return [t.contiguous() for t in program.run(inputs)]
    layout = _layout(plan, inputs, shape)
    module = _kernel_module(program, inputs, plan, layout)
    per_kind = {"full": shape, "row1": shape[:-1] + (1,), "row0": shape[:-1]}
    outs = [torch.empty(per_kind[o.kind], dtype=o.dtype, device=device) for o in plan.outputs]
    tensors = [inputs[k] for k in plan.used] + outs
    if device.type == "cuda" and device.index not in (None, torch.cuda.current_device()):
        with torch.cuda.device(device):
            _launch(module, plan, layout, tensors)
    else:
        _launch(module, plan, layout, tensors)
    return outs
