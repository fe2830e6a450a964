"""The ONNX op table: one entry per ONNX op type, each a small function building torch/ATen ops.

Every entry takes an ``OnnxNode`` (its input values, attributes and the model's opset) and returns
the node's output value, or a tuple of them. Values are ``torch.Tensor`` or ``ShapeVal``: a small
integer tensor (a shape, an axis list, an index) kept as a Python list of ints or SymInts, so shape
arithmetic (Shape -> Gather -> Concat -> Reshape) stays symbolic under ``torch.export`` instead of
becoming data-dependent tensor math. An op that needs a tensor turns a ``ShapeVal`` into one
(``T``); an op that needs a list reads it (``L``).

Users add an op with ``OPS["MyOp"] = fn`` before importing.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from graphopt.errors import OnnxImportError

# ONNX TensorProto data type -> torch dtype (string, bytes and 4-bit types are not supported)
DTYPES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.uint16,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    16: torch.bfloat16,
}

# ShapeVal is used only for small integer tensors: larger ones are ordinary tensors.
SHAPE_VAL_MAX = 64
_INT_DTYPES = (torch.int64, torch.int32)


# Float inputs that an op reads as Python numbers; when they are initializers, the importer keeps
# them as ShapeVals (like small integer constants) so torch.export never sees them as data.
STATIC_INPUTS: dict[str, tuple[int, ...]] = {
    "Resize": (1, 2),  # roi, scales
}


@dataclass
class ShapeVal:
    """A 0-d or 1-d tensor held as Python values: small integer tensors (ints or SymInts) and
    scalar constants of any type."""

    values: list[Any]
    scalar: bool = False
    dtype: torch.dtype = torch.int64
    const: torch.Tensor | None = None  # the module's buffer, for a constant of the ONNX file

    def tensor(self) -> torch.Tensor:
        if self.const is not None:
            return self.const
        # not torch.tensor(values): export traces it as lift_fresh_copy + an in-place detach_,
        # which a saved and reloaded program rejects
        parts = [torch.scalar_tensor(v, dtype=self.dtype) for v in self.values]
        if self.scalar:
            return parts[0]
        return torch.stack(parts) if parts else torch.zeros(0, dtype=self.dtype)


@dataclass
class OnnxNode:
    """One ONNX node as an op function sees it."""

    op: str
    name: str
    inputs: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    n_outputs: int = 1

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def input(self, i: int) -> Any:
        return self.inputs[i] if i < len(self.inputs) else None


def unsupported(n: OnnxNode, what: str) -> OnnxImportError:
    return OnnxImportError(
        f"ONNX node {n.name!r} ({n.op}): {what} is not supported by graphopt's importer; "
        "re-export the model without it, or replace graphopt.frontends.onnx_ops.OPS["
        + repr(n.op)
        + "]"
    )


def T(v: Any) -> Any:
    """The value as a tensor (None stays None)."""
    return v.tensor() if isinstance(v, ShapeVal) else v


def L(v: Any) -> list[Any]:
    """The value as a Python list (constant tensors only; a ShapeVal keeps its SymInts)."""
    if isinstance(v, ShapeVal):
        return list(v.values)
    seen = _VALUE_READS.get()
    if seen is not None:
        seen.add(id(v))
    return [x for x in v.reshape(-1).tolist()]


# ids of the tensors whose numbers an op read with L()/scalar() (a Reshape's shape, a TopK's k):
# the importer specializes graph inputs read this way (see onnx_import.capture_onnx)
_VALUE_READS: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "graphopt_onnx_value_reads", default=None
)


@contextlib.contextmanager
def recording_value_reads() -> Iterator[set[int]]:
    """Within the block, collect the ids of the tensors ops read as Python numbers."""
    seen: set[int] = set()
    token = _VALUE_READS.set(seen)
    try:
        yield seen
    finally:
        _VALUE_READS.reset(token)


def scalar(v: Any) -> Any:
    """A 0-d or 1-element value as a Python number (or SymInt)."""
    return L(v)[0]


def _is_shape(*vs: Any) -> bool:
    return all(isinstance(v, ShapeVal) for v in vs)


def shape_val(
    values: Sequence[Any], *, scalar: bool = False, dtype: torch.dtype = torch.int64
) -> ShapeVal:
    return ShapeVal(list(values), scalar, dtype)


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _axes(n: OnnxNode, index: int, rank: int) -> list[int] | None:
    """Axes from input ``index`` (opset 13+/18+) or the ``axes`` attribute (older opsets)."""
    v = n.input(index)
    axes = L(v) if v is not None else n.attr("axes")
    return None if axes is None else [_axis(int(a), rank) for a in axes]


def _rank(v: Any) -> int:
    if isinstance(v, ShapeVal):
        return 0 if v.scalar else 1
    return v.dim()


# -- elementwise ---------------------------------------------------------------------------------


def _broadcast(
    a: ShapeVal, b: ShapeVal, fn: Callable[[Any, Any], Any], dtype: torch.dtype
) -> ShapeVal:
    av, bv = a.values, b.values
    if len(av) == 1 and len(bv) != 1:
        av = av * len(bv)
    if len(bv) == 1 and len(av) != 1:
        bv = bv * len(av)
    return ShapeVal([fn(x, y) for x, y in zip(av, bv)], a.scalar and b.scalar, dtype)


def _int_div(x: Any, y: Any) -> Any:
    q = abs(x) // abs(y)  # ONNX integer division truncates toward zero
    return q if (x >= 0) == (y >= 0) else -q


def _div(a: Any, b: Any) -> Any:
    a, b = T(a), T(b)
    if not a.is_floating_point() and not a.is_complex():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def binary(
    tensor_fn: Callable[[Any, Any], Any], list_fn: Callable[[Any, Any], Any] | None = None
) -> Callable[[OnnxNode], Any]:
    """An elementwise binary op; on two ShapeVals it computes in Python (symbolic shapes)."""

    def run(n: OnnxNode) -> Any:
        a, b = n.inputs[0], n.inputs[1]
        if list_fn is not None and _is_shape(a, b) and not a.dtype.is_floating_point:
            dtype = torch.bool if tensor_fn in _COMPARE else a.dtype
            return _broadcast(a, b, list_fn, dtype)
        if list_fn is not None and isinstance(a, torch.Tensor):
            b = _python_scalar(b, a)
        return _wide_uint(tensor_fn, T(a), T(b))

    return run


_WIDE_UINTS = (torch.uint16, torch.uint32, torch.uint64)


def _wide_uint(fn: Callable[..., torch.Tensor], *xs: Any) -> torch.Tensor:
    """torch's CPU kernels lack most ops on uint16/32/64: compute in int64, cast back."""
    if xs[0].dtype not in _WIDE_UINTS:
        return fn(*xs)
    out = fn(*(x.to(torch.int64) if isinstance(x, torch.Tensor) else x for x in xs))
    return out.to(xs[0].dtype) if out.dtype == torch.int64 else out


def _python_scalar(v: Any, other: torch.Tensor) -> Any:
    """A scalar constant operand as a Python number: ``x + 1`` is then ``aten.add(x, 1)``, as a
    torch model captures, which the pattern passes read. Type promotion is the same as with a 0-d
    tensor of the same type; a shape-[1] constant stays a tensor where it would add a dim."""
    if isinstance(v, ShapeVal) and len(v.values) == 1 and (v.scalar or other.dim() >= 1):
        if v.dtype in (torch.uint8, torch.int8, torch.int16) or v.dtype in _WIDE_UINTS:
            return v  # a Python int would not wrap like the small integer type does
        return v.values[0]
    return v


_COMPARE = (torch.eq, torch.lt, torch.gt, torch.le, torch.ge)


def unary(
    fn: Callable[[torch.Tensor], torch.Tensor], list_fn: Callable[[Any], Any] | None = None
) -> Callable[[OnnxNode], Any]:
    """An elementwise unary op; on an integer ShapeVal it computes in Python (like binary)."""

    def run(n: OnnxNode) -> Any:
        x = n.inputs[0]
        if list_fn is not None and isinstance(x, ShapeVal) and x.dtype in _INT_DTYPES:
            return ShapeVal([list_fn(v) for v in x.values], x.scalar, x.dtype)
        return fn(T(x))

    return run


def variadic(fn: Callable[[Any, Any], Any]) -> Callable[[OnnxNode], Any]:
    def run(n: OnnxNode) -> Any:
        vals = [T(v) for v in n.inputs if v is not None]
        out = vals[0]
        for v in vals[1:]:
            out = _wide_uint(fn, out, v)
        return out

    return run


def _mean(n: OnnxNode) -> Any:
    vals = [T(v) for v in n.inputs if v is not None]
    return variadic(torch.add)(n) / len(vals)


def _pow(n: OnnxNode) -> Any:
    a = T(n.inputs[0])
    b = T(_python_scalar(n.inputs[1], a))
    return torch.pow(a, b).to(a.dtype)  # ONNX lets the exponent's type differ; the base's wins


def _mod(n: OnnxNode) -> Any:
    a, b = T(n.inputs[0]), T(n.inputs[1])
    return _wide_uint(torch.fmod if n.attr("fmod", 0) else torch.remainder, a, b)


def _clip(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    lo, hi = (n.input(1), n.input(2)) if n.opset >= 11 else (n.attr("min"), n.attr("max"))
    # constant bounds as Python numbers: clamp(x, 0, 6) is hardtanh, as a torch ReLU6 captures
    lo = lo.values[0] if isinstance(lo, ShapeVal) else T(lo)
    hi = hi.values[0] if isinstance(hi, ShapeVal) else T(hi)
    if lo is None and hi is None:
        return x
    if isinstance(lo, float) and isinstance(hi, float) and x.is_floating_point():
        return F.hardtanh(x, lo, hi)
    return torch.clamp(x, lo, hi)


def _hard_sigmoid(n: OnnxNode) -> Any:
    alpha, beta = n.attr("alpha", 0.2), n.attr("beta", 0.5)
    x = T(n.inputs[0])
    if math.isclose(alpha, 1 / 6, rel_tol=1e-6) and beta == 0.5:
        return F.hardsigmoid(x)
    return torch.clamp(x * alpha + beta, 0.0, 1.0)


def _prelu(n: OnnxNode) -> Any:
    x, slope = T(n.inputs[0]), T(n.inputs[1])
    if slope.dim() == 1 and x.dim() > 2 and slope.shape[0] == x.shape[1] != x.shape[-1]:
        slope = slope.reshape(-1, *([1] * (x.dim() - 2)))  # per-channel slope (old PyTorch exports)
    return torch.where(x < 0, x * slope, x)


def _cast(n: OnnxNode) -> Any:
    to = n.attr("to")
    if to not in DTYPES:
        raise unsupported(n, f"Cast to ONNX data type {to}")
    dtype = DTYPES[to]
    return _cast_to(n.inputs[0], dtype)


def _cast_to(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, ShapeVal) and dtype in _INT_DTYPES:
        values = [int(v) if isinstance(v, (bool, float)) else v for v in x.values]  # truncates
        return ShapeVal(values, x.scalar, dtype)
    return T(x).to(dtype)


def _cast_like(n: OnnxNode) -> Any:
    return _cast_to(n.inputs[0], T(n.inputs[1]).dtype)


def _where(n: OnnxNode) -> Any:
    c, a, b = n.inputs[:3]
    if _is_shape(c, a, b):
        k = max(len(c.values), len(a.values), len(b.values))
        pick = [
            (
                a.values[i % len(a.values)]
                if c.values[i % len(c.values)]
                else b.values[i % len(b.values)]
            )
            for i in range(k)
        ]
        return ShapeVal(pick, c.scalar and a.scalar and b.scalar, a.dtype)
    return torch.where(T(c), T(a), T(b))


def _not(n: OnnxNode) -> Any:
    x = n.inputs[0]
    if isinstance(x, ShapeVal):
        return ShapeVal([not v for v in x.values], x.scalar, torch.bool)
    return torch.logical_not(x)


def _is_inf(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    if pos and neg:
        return torch.isinf(x)
    if pos:
        return torch.isposinf(x)
    if neg:
        return torch.isneginf(x)
    return torch.zeros_like(x, dtype=torch.bool)


# -- activations ---------------------------------------------------------------------------------


def _elu(n: OnnxNode) -> Any:
    return F.elu(T(n.inputs[0]), alpha=n.attr("alpha", 1.0))


def _selu(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    alpha, gamma = (
        n.attr("alpha", 1.67326319217681884765625),
        n.attr("gamma", 1.05070102214813232421875),
    )
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


def _celu(n: OnnxNode) -> Any:
    return F.celu(T(n.inputs[0]), alpha=n.attr("alpha", 1.0))


def _thresholded_relu(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    return torch.where(x > n.attr("alpha", 1.0), x, 0.0)


def _gelu(n: OnnxNode) -> Any:
    return F.gelu(T(n.inputs[0]), approximate=n.attr("approximate", "none"))


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[[OnnxNode], Any]:
    def run(n: OnnxNode) -> Any:
        x = T(n.inputs[0])
        if n.opset >= 13:
            return fn(x, _axis(n.attr("axis", -1), x.dim()))
        # opset < 13: the input is coerced to 2-D at `axis` (default 1) and normalized per row
        axis = _axis(n.attr("axis", 1), x.dim())
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, 1).reshape(x.shape)

    return run


def _hardmax(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axis = _axis(n.attr("axis", -1), x.dim())
    return F.one_hot(x.argmax(axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)


# -- linear algebra and convolution --------------------------------------------------------------


def _gemm(n: OnnxNode) -> Any:
    a, b, c = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    a = a.t() if n.attr("transA", 0) else a
    if n.attr("transB", 0) and alpha == 1.0 and beta == 1.0 and (c is None or c.dim() == 1):
        return F.linear(a, b, c)  # the form torch models capture as (fold-bn, epilogues match it)
    b = b.t() if n.attr("transB", 0) else b
    y = a @ b
    y = y * alpha if alpha != 1.0 else y
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return y


def _spatial_pads(
    n: OnnxNode, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] with auto_pad resolved from the input's sizes."""
    k = len(kernel)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for i in range(k):
            size = x.shape[2 + i]
            out = -(-size // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size, 0)
            small = total // 2
            begins.append(small if auto == "SAME_UPPER" else total - small)
            ends.append(total - small if auto == "SAME_UPPER" else small)
        return begins + ends
    if auto == "VALID":
        return [0] * (2 * k)
    return list(n.attr("pads", [0] * (2 * k)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1..bk, e1..ek] -> F.pad's (last dim first) [bk, ek, ..., b1, e1]."""
    k = len(pads) // 2
    out: list[int] = []
    for i in reversed(range(k)):
        out += [pads[i], pads[k + i]]
    return out


def _conv(n: OnnxNode) -> Any:
    x, w, b = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    k = w.dim() - 2
    kernel = list(n.attr("kernel_shape", w.shape[2:]))
    strides = list(n.attr("strides", [1] * k))
    dilations = list(n.attr("dilations", [1] * k))
    pads = _spatial_pads(n, x, kernel, strides, dilations)
    if pads[:k] == pads[k:]:
        padding: Any = pads[:k]
    else:
        x, padding = F.pad(x, _torch_pad(pads)), 0
    conv = (F.conv1d, F.conv2d, F.conv3d)[k - 1]
    return conv(x, w, b, strides, padding, dilations, n.attr("group", 1))


def _conv_transpose(n: OnnxNode) -> Any:
    x, w, b = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    k = w.dim() - 2
    kernel = list(n.attr("kernel_shape", w.shape[2:]))
    strides = list(n.attr("strides", [1] * k))
    dilations = list(n.attr("dilations", [1] * k))
    out_pad = list(n.attr("output_padding", [0] * k))
    full = [
        (x.shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i]
        for i in range(k)
    ]
    out_shape = n.attr("output_shape")
    auto = n.attr("auto_pad", "NOTSET")
    if out_shape is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = (
            list(out_shape)[-k:]
            if out_shape is not None
            else [x.shape[2 + i] * strides[i] for i in range(k)]
        )
        totals = [full[i] - target[i] for i in range(k)]
        upper = (
            auto == "SAME_UPPER"
        )  # NOTSET with output_shape puts the odd pad first, as SAME_LOWER
        begins = [(t // 2 if upper else t - t // 2) for t in totals]
        pads = begins + [t - bg for t, bg in zip(totals, begins)]
    elif auto == "VALID":
        pads = [0] * (2 * k)
    else:
        pads = list(n.attr("pads", [0] * (2 * k)))
    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[k - 1]
    group = n.attr("group", 1)
    if (
        pads[:k] == pads[k:]
        and all(p >= 0 for p in pads)
        and all(o < max(s, d) for o, s, d in zip(out_pad, strides, dilations))
    ):
        return conv(x, w, b, strides, pads[:k], out_pad, group, dilations)
    # asymmetric (or negative) padding: run unpadded, then crop (or zero-pad) each side
    y = conv(x, w, None, strides, 0, 0, group, dilations)
    y = F.pad(y, _torch_pad([-p for p in pads[:k]] + [op - p for op, p in zip(out_pad, pads[k:])]))
    return y if b is None else y + b.reshape(1, -1, *([1] * k))


def _pool(n: OnnxNode, kind: str) -> Any:
    x = T(n.inputs[0])
    kernel = list(n.attr("kernel_shape"))
    k = len(kernel)
    strides = list(n.attr("strides", [1] * k))
    dilations = list(n.attr("dilations", [1] * k))
    pads = _spatial_pads(n, x, kernel, strides, dilations)
    ceil = bool(n.attr("ceil_mode", 0))
    symmetric = pads[:k] == pads[k:] and all(2 * p <= kk for p, kk in zip(pads[:k], kernel))
    if kind == "max":
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[k - 1]
        if n.n_outputs > 1:
            return _max_pool_indices(n, x, pool, kernel, strides, pads, dilations, ceil, symmetric)
        if not symmetric:
            x, pads = F.pad(x, _torch_pad(pads), value=float("-inf")), [0] * (2 * k)
        return pool(x, kernel, strides, pads[:k], dilations, ceil_mode=ceil)
    include = bool(n.attr("count_include_pad", 0))
    if any(d != 1 for d in dilations):  # torch's avg_pool has no dilation: sum the windows
        total, cells = _window_sum(x, kernel, strides, dilations, pads, ceil, include)
        return total / cells
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
    if symmetric:
        return pool(x, kernel, strides, pads[:k], ceil_mode=ceil, count_include_pad=include)
    # asymmetric pads: sum over the padded window, divided by the count of (real) cells in it
    area = math.prod(kernel)
    total = pool(F.pad(x, _torch_pad(pads)), kernel, strides, 0, ceil_mode=ceil) * area
    if include:
        return total / area
    ones = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return total / (pool(ones, kernel, strides, 0, ceil_mode=ceil) * area)


def _window_sum(
    x: torch.Tensor,
    kernel: list[int],
    strides: list[int],
    dilations: list[int],
    pads: list[int],
    ceil: bool,
    include_pad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output cell of a (dilated) pooling window: the sum of x over the window and the count
    of cells summed (pad cells count when ``include_pad``; cells past the pads, which ceil_mode's
    last window reaches, never do), with unfold along each spatial dim."""
    k = len(kernel)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype)
    xs, mask = F.pad(x, _torch_pad(pads)), F.pad(ones, _torch_pad(pads), value=float(include_pad))
    extra = []
    for i in range(k):
        span = (kernel[i] - 1) * dilations[i] + 1
        size = x.shape[2 + i] + pads[i] + pads[k + i]
        out = (size - span + (strides[i] - 1 if ceil else 0)) // strides[i] + 1
        if ceil and (out - 1) * strides[i] >= x.shape[2 + i] + pads[i]:
            out -= 1  # a last window that starts in the end padding is dropped
        extra.append(max(0, (out - 1) * strides[i] + span - size))
    tail = _torch_pad([0] * k + extra)
    xs, mask = F.pad(xs, tail), F.pad(mask, tail)
    for i in range(k):
        span = (kernel[i] - 1) * dilations[i] + 1
        xs = xs.unfold(2 + i, span, strides[i])[..., :: dilations[i]]
        mask = mask.unfold(2 + i, span, strides[i])[..., :: dilations[i]]
    window = tuple(range(-k, 0))
    return xs.sum(window), mask.sum(window)


def _max_pool_indices(
    n: OnnxNode,
    x: Any,
    pool: Any,
    kernel: Any,
    strides: Any,
    pads: Any,
    dil: Any,
    ceil: bool,
    ok: bool,
) -> Any:
    """MaxPool's Indices output: torch's per-plane flat indices, offset to whole-tensor ones."""
    if not ok:
        raise unsupported(n, "MaxPool Indices with asymmetric pads")
    k = len(kernel)
    y, idx = pool(x, kernel, strides, pads[:k], dil, ceil_mode=ceil, return_indices=True)
    plane = math.prod(x.shape[2:])
    if n.attr("storage_order", 0):  # column-major: the spatial coordinates' strides reversed
        dims, col = list(x.shape[2:]), torch.zeros_like(idx)
        for d in range(k):  # coordinate d: (idx // row-major stride) % size, times col-major's
            col = col + (idx // math.prod(dims[d + 1 :])) % dims[d] * math.prod(dims[:d])
        idx = col
    offset = torch.arange(x.shape[0] * x.shape[1]).reshape(x.shape[0], x.shape[1], *([1] * k))
    return y, idx + offset * plane


def _lp_pool(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    kernel = list(n.attr("kernel_shape"))
    k = len(kernel)
    strides = list(n.attr("strides", [1] * k))
    p = n.attr("p", 2)
    dilations = list(n.attr("dilations", [1] * k))
    if any(d != 1 for d in dilations) or n.attr("ceil_mode", 0):
        pads = _spatial_pads(n, x, kernel, strides, dilations)
        ceil = bool(n.attr("ceil_mode", 0))
        total, _ = _window_sum(x.abs() ** p, kernel, strides, dilations, pads, ceil, True)
        return total ** (1.0 / p)
    pads = _spatial_pads(n, x, kernel, strides, [1] * k)
    x = F.pad(x, _torch_pad(pads))
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[k - 1]
    return (pool(x.abs() ** p, kernel, strides, 0) * math.prod(kernel)) ** (1.0 / p)


def _batch_norm(n: OnnxNode) -> Any:
    x, scale, bias, mean, var = (T(v) for v in n.inputs[:5])
    eps = n.attr("epsilon", 1e-5)
    if not n.attr("training_mode", 0) and n.n_outputs == 1:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    if n.opset < 14:
        raise unsupported(n, "BatchNormalization training outputs before opset 14")
    # training mode: normalized with the batch's statistics; the running ones are updated as
    # running * momentum + batch * (1 - momentum), with the population variance (onnx.reference)
    dims = [d for d in range(x.dim()) if d != 1]
    batch_mean, batch_var = x.mean(dims), x.var(dims, correction=0)
    y = F.batch_norm(x, batch_mean, batch_var, scale, bias, False, 0.0, eps)
    m = n.attr("momentum", 0.9)
    return y, mean * m + batch_mean * (1 - m), var * m + batch_var * (1 - m)


def _layer_norm(n: OnnxNode) -> Any:
    x, scale, bias = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    axis = _axis(n.attr("axis", -1), x.dim())
    eps = n.attr("epsilon", 1e-5)
    if n.n_outputs == 1 and tuple(scale.shape) == tuple(x.shape[axis:]):
        if bias is None or tuple(bias.shape) == tuple(x.shape[axis:]):
            return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, eps)
    dims = list(range(axis, x.dim()))
    xf = x.float() if n.attr("stash_type", 1) == 1 and x.dtype != torch.float64 else x
    mean = xf.mean(dims, keepdim=True)
    inv = torch.rsqrt(((xf - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = ((xf - mean) * inv).to(x.dtype) * scale
    y = y + bias if bias is not None else y
    return (y, mean, inv)[: n.n_outputs] if n.n_outputs > 1 else y


def _instance_norm(n: OnnxNode) -> Any:
    x, scale, bias = (T(v) for v in n.inputs[:3])
    return F.instance_norm(x, weight=scale, bias=bias, eps=n.attr("epsilon", 1e-5))


def _lrn(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    return F.local_response_norm(
        x, n.attr("size"), n.attr("alpha", 1e-4), n.attr("beta", 0.75), n.attr("bias", 1.0)
    )


def _global_pool(fn: Callable[..., torch.Tensor]) -> Callable[[OnnxNode], Any]:
    def run(n: OnnxNode) -> Any:
        x = T(n.inputs[0])
        return fn(x, list(range(2, x.dim())), keepdim=True)

    return run


# -- shape and data movement ---------------------------------------------------------------------


def _shape(n: OnnxNode) -> Any:
    x = n.inputs[0]
    dims = ([] if x.scalar else [len(x.values)]) if isinstance(x, ShapeVal) else list(x.shape)
    start, end = n.attr("start", 0), n.attr("end")
    return shape_val(dims[start:end] if end is not None else dims[start:])


def _size(n: OnnxNode) -> Any:
    x = n.inputs[0]
    count = len(x.values) if isinstance(x, ShapeVal) else math.prod(x.shape)
    return shape_val([count], scalar=True)


def _gather(n: OnnxNode) -> Any:
    data, idx = n.inputs[0], n.inputs[1]
    axis = n.attr("axis", 0)
    if isinstance(data, ShapeVal) and isinstance(idx, ShapeVal):
        picked = [data.values[int(i)] for i in idx.values]
        return ShapeVal(picked, idx.scalar, data.dtype)
    data = T(data)
    axis = _axis(axis, data.dim())
    if isinstance(idx, ShapeVal) and idx.scalar and isinstance(idx.values[0], int):
        return data.select(axis, idx.values[0])
    # numpy take: advanced indexing wraps negative indices and keeps the index tensor's shape
    return data[(slice(None),) * axis + (T(idx),)]


def _gather_elements(n: OnnxNode) -> Any:
    data, idx = T(n.inputs[0]), T(n.inputs[1])
    axis = _axis(n.attr("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    return torch.gather(data, axis, idx)


def _gather_nd(n: OnnxNode) -> Any:
    data, idx = T(n.inputs[0]), T(n.inputs[1])
    b, m = n.attr("batch_dims", 0), idx.shape[-1]
    if not b:
        return data[tuple(idx[..., i] for i in range(m))]
    # the leading b dims are shared: flatten them into one, index it with its own position
    batch = list(data.shape[:b])
    data = data.reshape(-1, *data.shape[b:])
    idx = idx.reshape(-1, *idx.shape[b:]).long()
    rows = torch.arange(data.shape[0]).reshape(-1, *([1] * (idx.dim() - 2)))
    out = data[(rows, *(idx[..., i] for i in range(m)))]
    return out.reshape(*batch, *out.shape[1:])


def _unsqueeze(n: OnnxNode) -> Any:
    x = n.inputs[0]
    raw = L(n.input(1)) if n.input(1) is not None else n.attr("axes")
    axes = sorted(_axis(int(a), _rank(x) + len(raw)) for a in raw)
    if isinstance(x, ShapeVal) and x.scalar and axes == [0]:
        return ShapeVal(list(x.values), False, x.dtype)
    y = T(x)
    for a in axes:
        y = y.unsqueeze(a)
    return y


def _squeeze(n: OnnxNode) -> Any:
    x = n.inputs[0]
    axes = _axes(n, 1, _rank(x))
    if isinstance(x, ShapeVal) and not x.scalar and len(x.values) == 1 and axes in (None, [0]):
        return ShapeVal(list(x.values), True, x.dtype)
    y = T(x)
    if axes is None:
        return y.squeeze()
    return y.squeeze(tuple(axes)) if axes else y


def _concat(n: OnnxNode) -> Any:
    vals = [v for v in n.inputs if v is not None]
    if _is_shape(*vals):
        return ShapeVal([x for v in vals for x in v.values], False, vals[0].dtype)
    tensors = [T(v) for v in vals]
    return torch.cat(tensors, _axis(n.attr("axis"), tensors[0].dim()))


def _reshape(n: OnnxNode) -> Any:
    x, shape = n.inputs[0], L(n.inputs[1])
    dims = list(x.shape) if not isinstance(x, ShapeVal) else ([] if x.scalar else [len(x.values)])
    if not n.attr("allowzero", 0):
        shape = [dims[i] if (isinstance(s, int) and s == 0) else s for i, s in enumerate(shape)]
    if isinstance(x, ShapeVal) and len(shape) <= 1:
        return ShapeVal(list(x.values), len(shape) == 0, x.dtype)
    return T(x).reshape(shape)  # a ShapeVal reshaped to 2-D or more is a tensor again


def _flatten(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axis = _axis(n.attr("axis", 1), x.dim())
    if axis == 0:
        return x.reshape(1, -1)
    y = x.flatten(axis) if axis < x.dim() else x.unsqueeze(-1)
    return y.flatten(0, axis - 1)


def _transpose(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    perm = n.attr("perm") or list(reversed(range(x.dim())))
    return x.permute(*perm)


def _split(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axis = _axis(n.attr("axis", 0), x.dim())
    sizes = L(n.input(1)) if n.input(1) is not None else n.attr("split")
    if not sizes:
        parts = n.attr("num_outputs", n.n_outputs)
        sizes = -(-x.shape[axis] // parts)  # opset 18: equal chunks, the last one smaller
    return tuple(torch.split(x, sizes, axis))


def _slice(n: OnnxNode) -> Any:
    x = n.inputs[0]
    if n.opset < 10:
        starts, ends, axes, steps = n.attr("starts"), n.attr("ends"), n.attr("axes"), None
    else:
        starts, ends = L(n.inputs[1]), L(n.inputs[2])
        axes = L(n.input(3)) if n.input(3) is not None else None
        steps = L(n.input(4)) if n.input(4) is not None else None
    rank = _rank(x)
    axes = [_axis(a, rank) for a in (axes if axes is not None else range(len(starts)))]
    steps = steps or [1] * len(starts)
    if isinstance(x, ShapeVal):
        return ShapeVal(list(x.values)[slice(starts[0], ends[0], steps[0])], False, x.dtype)
    y = x
    for a, s, e, st in zip(axes, starts, ends, steps):
        if st > 0:
            y = y[(slice(None),) * a + (slice(_clamp_int(s), _clamp_int(e), st),)]
        else:  # torch slices have positive steps: pick the indices numpy would
            idx = torch.arange(*slice(s, e, st).indices(y.shape[a]))
            y = y.index_select(a, idx)
    return y


def _clamp_int(v: Any) -> Any:
    # INT64_MAX/MIN ends mean "to the end"; keep them representable for torch's slice
    if isinstance(v, int) and abs(v) > 2**62:
        return None if v > 0 else -(2**62)
    return v


def _expand(n: OnnxNode) -> Any:
    x, shape = T(n.inputs[0]), L(n.inputs[1])
    rank = max(x.dim(), len(shape))
    xs = [1] * (rank - x.dim()) + list(x.shape)
    ts = [1] * (rank - len(shape)) + list(shape)
    out = [xd if (isinstance(td, int) and td == 1) else td for xd, td in zip(xs, ts)]
    return x.reshape(xs).expand(out)


def _tile(n: OnnxNode) -> Any:
    return T(n.inputs[0]).repeat(L(n.inputs[1]))


def _pad(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    mode = n.attr("mode", "constant")
    if n.opset >= 11:
        pads, value = L(n.inputs[1]), n.input(2)
        value = scalar(value) if value is not None else 0
        axes = L(n.input(3)) if n.input(3) is not None else None
    else:
        pads, value, axes = n.attr("pads"), n.attr("value", 0.0), None
    if axes is not None:
        k = len(axes)
        full = [0] * (2 * x.dim())
        for i, a in enumerate(axes):
            a = _axis(a, x.dim())
            full[a], full[x.dim() + a] = pads[i], pads[k + i]
        pads = full
    torch_pads = _torch_pad(pads)
    while len(torch_pads) >= 2 and torch_pads[-2:] == [0, 0] and mode != "constant":
        torch_pads = torch_pads[:-2]  # torch pads only trailing dims in the non-constant modes
    modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}
    if mode not in modes:
        raise unsupported(n, f"Pad mode {mode!r}")
    if mode == "constant":
        return F.pad(x, torch_pads, value=value)
    return F.pad(x, torch_pads, mode=modes[mode])


def _constant_of_shape(n: OnnxNode) -> Any:
    shape = L(n.inputs[0])
    value = n.attr("value")  # a ShapeVal: the importer reads small tensor attributes as values
    fill, dtype = (value.values[0], value.dtype) if value is not None else (0.0, torch.float32)
    if (
        dtype in _INT_DTYPES
        and len(shape) == 1
        and isinstance(shape[0], int)
        and shape[0] <= SHAPE_VAL_MAX
    ):
        return ShapeVal([int(fill)] * shape[0], False, dtype)
    return torch.full(shape, fill, dtype=dtype)


def _range(n: OnnxNode) -> Any:
    start, limit, delta = (scalar(v) for v in n.inputs[:3])
    dtype = T(n.inputs[0]).dtype if not isinstance(n.inputs[0], ShapeVal) else n.inputs[0].dtype
    known = all(type(v) is int for v in (start, limit, delta))
    if known and dtype in _INT_DTYPES and len(range(start, limit, delta)) <= SHAPE_VAL_MAX:
        # an axis list (RMSNormalization's expanded body: Range(axis, rank)) stays a ShapeVal
        return ShapeVal(list(range(start, limit, delta)), False, dtype)
    return torch.arange(start, limit, delta, dtype=dtype)


def _trilu(n: OnnxNode) -> Any:
    x, k = T(n.inputs[0]), n.input(1)
    k = int(scalar(k)) if k is not None else 0
    return torch.triu(x, k) if n.attr("upper", 1) else torch.tril(x, k)


def _identity(n: OnnxNode) -> Any:
    return n.inputs[0]


def _dropout(n: OnnxNode) -> Any:
    x, training = n.inputs[0], n.input(2)
    if training is not None and bool(scalar(training)):
        raise unsupported(n, "Dropout in training mode (it draws random numbers)")
    if n.n_outputs > 1:  # inference: nothing is dropped, the mask is all true
        return x, torch.ones_like(T(x), dtype=torch.bool)
    return x


def _einsum(n: OnnxNode) -> Any:
    return torch.einsum(n.attr("equation"), *[T(v) for v in n.inputs])


def _reduce(fn: Callable[..., torch.Tensor], axes_input_from: int) -> Callable[[OnnxNode], Any]:
    """ReduceX: axes are an input from ``axes_input_from`` on (ReduceSum 13, the rest 18)."""

    def run(n: OnnxNode) -> Any:
        x = T(n.inputs[0])
        raw = L(n.input(1)) if n.opset >= axes_input_from and n.input(1) is not None else None
        raw = n.attr("axes") if n.opset < axes_input_from else raw
        axes = None if raw is None else [_axis(int(a), x.dim()) for a in raw]
        keep = bool(n.attr("keepdims", 1))
        if not axes:
            if n.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        return fn(x, axes, keep)

    return run


def _extreme(
    fn: Callable[..., torch.Tensor],
) -> Callable[[torch.Tensor, list[int], bool], torch.Tensor]:
    def run(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
        if x.numel() == 0 and all(isinstance(d, int) for d in x.shape):
            # ONNX reduces an empty set to the identity element; torch refuses to reduce it
            shape = [1 if i in axes else d for i, d in enumerate(x.shape)]
            shape = shape if keep else [d for i, d in enumerate(x.shape) if i not in axes]
            info = torch.finfo(x.dtype) if x.is_floating_point() else None
            if x.dtype == torch.bool:
                fill: Any = fn is torch.amin
            elif info is not None:
                fill = -math.inf if fn is torch.amax else math.inf
            else:
                ii = torch.iinfo(x.dtype)
                fill = ii.min if fn is torch.amax else ii.max
            return torch.full(shape, fill, dtype=x.dtype)
        return _wide_uint(lambda t: fn(t, axes, keepdim=keep), x)

    return run


def _reduce_prod(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    for a in sorted(axes, reverse=True):
        x = x.prod(a, keepdim=keep)
    return x


def _logsumexp(x: torch.Tensor, axes: list[int], keep: bool) -> torch.Tensor:
    return torch.logsumexp(x, axes, keepdim=keep)


def _arg(fn: Callable[..., torch.Tensor]) -> Callable[[OnnxNode], Any]:
    def run(n: OnnxNode) -> Any:
        x = T(n.inputs[0])
        axis = _axis(n.attr("axis", 0), x.dim())
        keep = bool(n.attr("keepdims", 1))
        if n.attr("select_last_index", 0):  # the last extreme: search the flipped tensor
            return (x.shape[axis] - 1) - fn(x.flip(axis), axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)

    return run


def _cumsum(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axis = _axis(int(scalar(n.inputs[1])), x.dim())
    y = x.flip(axis) if n.attr("reverse", 0) else x
    out = torch.cumsum(y, axis, dtype=y.dtype)  # torch would widen int32 to int64
    out = out - y if n.attr("exclusive", 0) else out
    return out.flip(axis) if n.attr("reverse", 0) else out


def _topk(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    k = int(scalar(n.inputs[1])) if n.opset >= 10 else n.attr("k")
    axis = _axis(n.attr("axis", -1), x.dim())
    # ONNX breaks ties by the lower index; a stable sort does too (torch.topk does not promise it)
    largest = bool(n.attr("largest", 1))
    wide = x.to(torch.int64) if x.dtype in _WIDE_UINTS else x  # no uint64 sort kernel on CPU
    values, indices = torch.sort(wide, dim=axis, descending=largest, stable=True)
    values = values.to(x.dtype)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _one_hot(n: OnnxNode) -> Any:
    idx, depth, values = T(n.inputs[0]), int(scalar(n.inputs[1])), T(n.inputs[2])
    axis = n.attr("axis", -1)
    idx = torch.where(idx < 0, idx + depth, idx).long()
    valid = (idx >= 0) & (idx < depth)  # out-of-range indices give a row of off values
    hot = F.one_hot(torch.where(valid, idx, 0), depth).bool() & valid.unsqueeze(-1)
    out = torch.where(hot, values[1], values[0])
    return out.movedim(-1, _axis(axis, out.dim()))


def _constant(n: OnnxNode) -> Any:
    raise unsupported(n, "a Constant evaluated at run time")  # constants are read at build time


# -- quantization --------------------------------------------------------------------------------


def _per_axis(scale: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    if scale.numel() == 1 or x.dim() == 0:  # per tensor
        return scale.reshape(())
    shape = [1] * x.dim()
    shape[_axis(axis, x.dim())] = -1
    return scale.reshape(shape)


def _dequantize(n: OnnxNode) -> Any:
    x, scale, zp = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    if n.attr("block_size", 0):
        raise unsupported(n, "blocked DequantizeLinear")
    axis = n.attr("axis", 1)
    s = _per_axis(scale, x, axis)
    y = x.to(torch.float32) if s.dtype == torch.float16 else x.to(s.dtype)
    if zp is not None:
        y = y - _per_axis(zp, x, axis).to(y.dtype)
    return (y * s.to(y.dtype)).to(scale.dtype)


_QRANGE = {
    torch.uint8: (0, 255),
    torch.int8: (-128, 127),
    torch.uint16: (0, 65535),
    torch.int16: (-32768, 32767),
}


def _quantize(n: OnnxNode) -> Any:
    x, scale, zp = T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))
    if n.attr("block_size", 0):
        raise unsupported(n, "blocked QuantizeLinear")
    dtype = zp.dtype if zp is not None else DTYPES.get(n.attr("output_dtype", 2) or 2, torch.uint8)
    if dtype not in _QRANGE:
        raise unsupported(n, f"QuantizeLinear to {dtype}")
    axis = n.attr("axis", 1)
    y = torch.round(x.to(torch.float32) / _per_axis(scale, x, axis).to(torch.float32))
    if zp is not None:
        y = y + _per_axis(zp, x, axis).to(torch.float32)
    lo, hi = _QRANGE[dtype]
    return torch.clamp(y, lo, hi).to(dtype)


def _matmul_integer(n: OnnxNode) -> Any:
    a, b = T(n.inputs[0]).to(torch.int32), T(n.inputs[1]).to(torch.int32)
    a_zp, b_zp = T(n.input(2)), T(n.input(3))
    if a_zp is not None:
        a = a - (a_zp.reshape(-1, 1) if a_zp.dim() == 1 and a.dim() >= 2 else a_zp).to(torch.int32)
    if b_zp is not None:
        b = b - b_zp.to(torch.int32)
    # integer matmul: exact in float64 for int8 ranges up to k = 2^37, and it runs on every device
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def _max_list(a: Any, b: Any) -> Any:
    return a if a >= b else b


def _min_list(a: Any, b: Any) -> Any:
    return a if a <= b else b


def _max(n: OnnxNode) -> Any:
    vals = [v for v in n.inputs if v is not None]
    if len(vals) == 2 and _is_shape(*vals):
        return _broadcast(vals[0], vals[1], _max_list, vals[0].dtype)
    return variadic(torch.maximum)(n)


def _min(n: OnnxNode) -> Any:
    vals = [v for v in n.inputs if v is not None]
    if len(vals) == 2 and _is_shape(*vals):
        return _broadcast(vals[0], vals[1], _min_list, vals[0].dtype)
    return variadic(torch.minimum)(n)


def _rms_norm(n: OnnxNode) -> Any:
    x, scale = T(n.inputs[0]), T(n.inputs[1])
    axis = _axis(n.attr("axis", -1), x.dim())
    eps = n.attr("epsilon", 1e-5)
    if tuple(scale.shape) == tuple(x.shape[axis:]):
        return F.rms_norm(x, tuple(x.shape[axis:]), scale, eps)
    dims = list(range(axis, x.dim()))
    xf = x.float() if x.dtype != torch.float64 else x
    y = (xf * torch.rsqrt((xf * xf).mean(dims, keepdim=True) + eps)).to(x.dtype)
    return y * scale


def _group_norm(n: OnnxNode) -> Any:
    x, scale, bias = (T(v) for v in n.inputs[:3])
    groups, eps = n.attr("num_groups"), n.attr("epsilon", 1e-5)
    if scale.numel() != x.shape[1]:
        raise unsupported(n, "GroupNormalization with per-group scale (opset 18 form)")
    return F.group_norm(x, groups, scale, bias, eps)


def _mvn(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axes = [_axis(a, x.dim()) for a in n.attr("axes", [0, 2, 3])]
    mean = x.mean(axes, keepdim=True)
    var = ((x - mean) ** 2).mean(axes, keepdim=True)
    return (x - mean) / (var.sqrt() + 1e-9)


def _lp_norm(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    p, axis = n.attr("p", 2), _axis(n.attr("axis", -1), x.dim())
    norm = torch.linalg.vector_norm(x, p, dim=axis, keepdim=True)
    return x / torch.where(norm == 0, 1, norm)  # a zero vector stays zero (ONNX reference)


def _shrink(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    lambd, bias = n.attr("lambd", 0.5), n.attr("bias", 0.0)
    out = torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, 0))
    return out.to(x.dtype)


def _depth_to_space(n: OnnxNode) -> Any:
    x, b = T(n.inputs[0]), n.attr("blocksize")
    if n.attr("mode", "DCR") == "CRD":
        return F.pixel_shuffle(x, b)
    N, C, H, W = x.shape
    y = x.reshape(N, b, b, C // (b * b), H, W).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(N, C // (b * b), H * b, W * b)


def _space_to_depth(n: OnnxNode) -> Any:
    x, b = T(n.inputs[0]), n.attr("blocksize")
    if n.attr("mode", "DCR") == "CRD":
        return F.pixel_unshuffle(x, b)
    N, C, H, W = x.shape
    y = x.reshape(N, C, H // b, b, W // b, b).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(N, C * b * b, H // b, W // b)


def _eye_like(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    dtype = DTYPES.get(n.attr("dtype"), x.dtype) if n.attr("dtype") is not None else x.dtype
    rows, cols, k = x.shape[0], x.shape[1], n.attr("k", 0)
    idx = torch.arange(cols).unsqueeze(0) - torch.arange(rows).unsqueeze(1)
    return (idx == k).to(dtype)


def _scatter_elements(n: OnnxNode) -> Any:
    data, idx, upd = (T(v) for v in n.inputs[:3])
    axis = _axis(n.attr("axis", 0), data.dim())
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    reduce = n.attr("reduction", "none")
    if reduce == "none":
        return data.scatter(axis, idx, upd)
    names = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}
    return data.scatter_reduce(axis, idx, upd, names[reduce], include_self=True)


def _scatter_nd(n: OnnxNode) -> Any:
    data, idx, upd = (T(v) for v in n.inputs[:3])
    reduce = n.attr("reduction", "none")
    m = idx.shape[-1]
    key = tuple(idx[..., i] for i in range(m))
    out = data.clone()
    if reduce == "none":
        out[key] = upd
        return out
    if reduce == "add":
        return out.index_put_(key, upd, accumulate=True)
    names = {"mul": "prod", "max": "amax", "min": "amin"}
    if reduce not in names:
        raise unsupported(n, f"ScatterND reduction {reduce!r}")
    # the indexed dims flattened into one: a scatter_reduce along it
    lead, rest = list(data.shape[:m]), list(data.shape[m:])
    row = torch.zeros_like(idx[..., 0])
    for i in range(m):
        row = row * lead[i] + torch.where(idx[..., i] < 0, idx[..., i] + lead[i], idx[..., i])
    flat_upd = upd.reshape(-1, *rest)
    index = row.reshape(-1, *([1] * len(rest))).expand_as(flat_upd)
    flat = data.reshape(-1, *rest).scatter_reduce(0, index, flat_upd, names[reduce])
    return flat.reshape(data.shape)


def _bit_shift(n: OnnxNode) -> Any:
    a, b = T(n.inputs[0]), T(n.inputs[1])
    left = n.attr("direction") == "LEFT"
    return _wide_uint(torch.bitwise_left_shift if left else torch.bitwise_right_shift, a, b)


def _cumprod(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    axis = _axis(int(scalar(n.inputs[1])), x.dim())
    y = x.flip(axis) if n.attr("reverse", 0) else x
    out = torch.cumprod(y, axis, dtype=y.dtype)
    if n.attr("exclusive", 0):  # shift by one, starting at the identity 1
        ones = torch.ones_like(y.narrow(axis, 0, 1))
        out = torch.cat([ones, out.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return out.flip(axis) if n.attr("reverse", 0) else out


def _swish(n: OnnxNode) -> Any:
    x, alpha = T(n.inputs[0]), n.attr("alpha", 1.0)
    return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(alpha * x)


def _non_zero(n: OnnxNode) -> Any:
    return torch.nonzero(T(n.inputs[0])).t()  # data-dependent size: eager only, not exportable


def _nearest_index(
    out: int, size: int, scale: float, ctm: str, nearest: str, declared: float
) -> list[int]:
    """ONNX Resize's source index of each of ``out`` output positions along one axis of
    ``size`` (onnx.reference's op_resize): the coordinate transform, then the nearest mode,
    clamped to the edge. ``declared`` is the output width as the scale states it
    (``scale * size``, fractional when the size was rounded)."""
    index = []
    for y in range(out):
        if ctm == "align_corners":
            x = 0.0 if declared == 1 else y * (size - 1) / (declared - 1)
        elif ctm == "asymmetric":
            x = y / scale
        elif ctm == "pytorch_half_pixel":
            x = -0.5 if declared == 1 else (y + 0.5) / scale - 0.5
        elif ctm == "half_pixel":
            x = (y + 0.5) / scale - 0.5
        elif ctm == "half_pixel_symmetric":
            x = size / 2 * (1 - out / declared) + (y + 0.5) / scale - 0.5
        elif ctm == "tf_half_pixel_for_nn":
            x = (y + 0.5) / scale
        else:
            raise ValueError(ctm)
        low = math.floor(x)
        ratio = x - low
        if ratio == 0:
            pick = low
        elif nearest == "round_prefer_floor":
            pick = low if ratio <= 0.5 else low + 1
        elif nearest == "round_prefer_ceil":
            pick = low if ratio < 0.5 else low + 1
        elif nearest == "floor":
            pick = low
        elif nearest == "ceil":
            pick = low + 1
        else:
            raise ValueError(nearest)
        index.append(min(max(pick, 0), size - 1))
    return index


NEAREST_CTMS = (
    "align_corners", "asymmetric", "pytorch_half_pixel", "half_pixel", "half_pixel_symmetric",
    "tf_half_pixel_for_nn",
)  # fmt: skip


def _resize_nearest(n: OnnxNode, x: Any, scales: Any, sizes: Any) -> Any:
    """Resize in nearest mode, any coordinate transform, nearest mode, ``axes`` and
    ``keep_aspect_ratio_policy``, as a gather of precomputed source indices along each resized
    axis (the resized dims must be static; the others, batch included, stay dynamic)."""
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    nearest = n.attr("nearest_mode", "round_prefer_floor")
    policy = n.attr("keep_aspect_ratio_policy", "stretch")
    if ctm not in NEAREST_CTMS or nearest not in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):  # fmt: skip
        raise unsupported(n, f"Resize nearest with {ctm}/{nearest}")
    rank = x.dim()
    axes = [a % rank for a in (n.attr("axes") or range(rank))]
    have = [x.shape[a] for a in axes]
    if not all(isinstance(d, int) for d in have):
        raise unsupported(n, "Resize nearest of a dim whose size is not fixed")
    if sizes is not None and L(sizes):
        want = [int(v) for v in L(sizes)]
        factors = [w / h for w, h in zip(want, have)]
        if policy in ("not_larger", "not_smaller"):
            scale = min(factors) if policy == "not_larger" else max(factors)
            factors = [scale] * len(axes)
            want = [int(scale * h + 0.5) for h in have]
        declared = [f * h for f, h in zip(factors, have)]
    else:
        factors = [float(v) for v in L(scales)]
        declared = [f * h for f, h in zip(factors, have)]
        want = [int(d) for d in declared]
    for axis, size, out, f, d in zip(axes, have, want, factors, declared):
        if out == size and f == 1.0:
            continue
        index = _nearest_index(out, size, f, ctm, nearest, d)
        x = x.index_select(axis, torch.tensor(index, dtype=torch.long, device=x.device))
    return x


def _resize(n: OnnxNode) -> Any:
    x = T(n.inputs[0])
    roi, scales, sizes = n.input(1), n.input(2), n.input(3)
    mode = n.attr("mode", "nearest")
    ctm = n.attr("coordinate_transformation_mode", "half_pixel")
    if mode == "nearest" and (
        n.attr("axes") is not None
        or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch"
        or not _interpolate_nearest(ctm, n.attr("nearest_mode", "round_prefer_floor"))
    ):
        return _resize_nearest(n, x, scales, sizes)
    if (
        n.attr("axes") is not None
        or n.attr("antialias", 0)
        or n.attr("keep_aspect_ratio_policy", "stretch") != "stretch"
    ):
        raise unsupported(n, "Resize with axes, antialias or keep_aspect_ratio_policy")
    spatial = x.dim() - 2
    size = None
    if sizes is not None and L(sizes):
        full = L(sizes)
        size = full[2:]
        if full[:2] != list(x.shape[:2]):
            raise unsupported(n, "Resize of the batch or channel dims")
    else:
        sc = [float(v) for v in L(scales)]
        if sc[:2] != [1.0, 1.0]:
            raise unsupported(n, "Resize of the batch or channel dims")
        factor = sc[2:]
    del roi
    if mode == "nearest":
        # the two forms torch's interpolate computes (dynamic spatial dims stay dynamic)
        kind = _interpolate_nearest(ctm, n.attr("nearest_mode", "round_prefer_floor"))
        return F.interpolate(x, size=size, scale_factor=None if size else factor, mode=kind)
    out = size if size is not None else [math.floor(d * f) for d, f in zip(x.shape[2:], factor)]
    if ctm in ("align_corners", "pytorch_half_pixel") and any(o == 1 for o in out):
        raise unsupported(n, f"Resize {ctm} to a size-1 dim (ONNX samples 0, torch does not)")
    if mode == "cubic" and ctm == "align_corners" and any(o < i for o, i in zip(out, x.shape[2:])):
        raise unsupported(n, "Resize cubic align_corners downsampling (torch samples differently)")
    if mode in ("linear", "cubic") and ctm in ("half_pixel", "align_corners", "pytorch_half_pixel"):
        if mode == "cubic" and n.attr("cubic_coeff_a", -0.75) != -0.75:
            raise unsupported(n, "Resize cubic with cubic_coeff_a other than -0.75")
        if mode == "cubic" and spatial != 2:
            raise unsupported(n, "Resize cubic outside 2-D")
        kind = (
            {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial] if mode == "linear" else "bicubic"
        )
        return F.interpolate(
            x, size=size, scale_factor=None if size else factor, mode=kind,
            align_corners=ctm == "align_corners",
        )  # fmt: skip
    raise unsupported(n, f"Resize mode {mode!r} with {ctm}")


def _interpolate_nearest(ctm: str, nearest: str) -> str | None:
    """torch's interpolate mode that computes ONNX nearest with ``ctm``/``nearest``, if any."""
    if ctm == "asymmetric" and nearest == "floor":
        return "nearest"
    if ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
        return "nearest-exact"
    return None


def _heads(x: torch.Tensor, heads: int | None) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D); a 4-D input is already split."""
    if x.dim() == 4:
        return x
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _attention(n: OnnxNode) -> Any:
    """Attention (opset 23+), following onnx.reference's op_attention step by step."""
    q, k, v, mask, past_k, past_v = (T(n.input(i)) for i in range(6))
    if (
        n.input(6) is not None
        or n.attr("left_window_size", -1) >= 0
        or n.attr("right_window_size", -1) >= 0
    ):
        raise unsupported(n, "Attention with nonpad_kv_seqlen or a sliding window")
    rank = q.dim()
    q, k, v = (
        _heads(q, n.attr("q_num_heads")),
        _heads(k, n.attr("kv_num_heads")),
        _heads(v, n.attr("kv_num_heads")),
    )
    scale = n.attr("scale") or 1 / math.sqrt(q.shape[3])
    root = math.sqrt(scale)  # applied to q and k each, as the reference does
    k = torch.cat([past_k, k], 2) if past_k is not None else k
    v = torch.cat([past_v, v], 2) if past_v is not None else v
    present_k, present_v = k, v
    lq, lk = q.shape[2], k.shape[2]
    bias = torch.zeros(lq, lk, dtype=q.dtype)
    if mask is not None and mask.shape[-1] < lk:  # a short mask is padded as masked
        fill = False if mask.dtype == torch.bool else -math.inf
        mask = F.pad(mask, [0, lk - mask.shape[-1]], value=fill)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, -math.inf).to(q.dtype)
    if n.attr("is_causal", 0):
        offset = past_k.shape[2] if past_k is not None else 0
        allowed = torch.arange(lk).reshape(1, lk) <= torch.arange(lq).reshape(lq, 1) + offset
        base = mask if mask is not None else bias
        bias = base + torch.where(allowed, 0.0, -math.inf).to(q.dtype)
    elif mask is not None:
        bias = bias + mask
    if q.shape[1] != k.shape[1] and q.shape[1] % k.shape[1] == 0:  # grouped-query attention
        k = k.repeat_interleave(q.shape[1] // k.shape[1], 1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], 1)
    softcap = n.attr("softcap", 0.0)
    plain = mask is None and past_k is None and not (softcap and softcap > 0)
    if plain and n.attr("softmax_precision") is None and n.n_outputs <= 3:
        # the form torch's exporter writes for SDPA: back to aten.scaled_dot_product_attention,
        # what graphopt's attention pattern and kernels take (no row can be fully masked here)
        causal = bool(n.attr("is_causal", 0))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
        if rank == 3:
            y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
        return (y, present_k, present_v)[: n.n_outputs]
    qk = (q * root) @ (k * root).transpose(-1, -2)
    if softcap and softcap > 0:
        qk = torch.tanh(qk / softcap) * softcap
    with_bias = qk + bias
    precision = n.attr("softmax_precision")
    scores = with_bias.to(DTYPES[precision]) if precision in DTYPES else with_bias
    probs = torch.softmax(scores, -1)
    all_masked = torch.isneginf(bias.amax(-1, keepdim=True))
    probs = torch.where(all_masked, 0.0, probs).to(q.dtype)
    mode = n.attr("qk_matmul_output_mode", 0)
    qk_out = {2: with_bias, 3: probs}.get(mode, qk).to(q.dtype)
    y = probs @ v
    if rank == 3:
        y = y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1)
    return (y, present_k, present_v, qk_out)[: n.n_outputs]


def _xor(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.logical_xor(a, b)


OPS: dict[str, Callable[[OnnxNode], Any]] = {
    # elementwise arithmetic: ONNX broadcasting is numpy's, as torch's
    "Add": binary(torch.add, operator.add),  # a + b
    "Sub": binary(torch.sub, operator.sub),  # a - b
    "Mul": binary(torch.mul, operator.mul),  # a * b
    "Div": binary(_div, _int_div),  # a / b (integers truncate toward zero)
    "Pow": _pow,  # a ** b, in a's dtype
    "Mod": _mod,  # remainder (sign of divisor) or fmod=1 (sign of dividend)
    "Max": _max,  # elementwise max of n inputs
    "Min": _min,  # elementwise min of n inputs
    "Sum": variadic(torch.add),  # a + b + ...
    "Mean": _mean,  # (a + b + ...) / n
    "Neg": unary(torch.neg, operator.neg),  # -x
    "Abs": unary(torch.abs, abs),  # |x|
    "Reciprocal": unary(torch.reciprocal),  # 1 / x
    "Sqrt": unary(torch.sqrt),  # sqrt(x)
    "Exp": unary(torch.exp),  # e ** x
    "Log": unary(torch.log),  # ln x
    "Floor": unary(torch.floor),  # floor(x)
    "Ceil": unary(torch.ceil),  # ceil(x)
    "Round": unary(torch.round),  # round half to even
    "Sign": unary(torch.sign),  # -1, 0, 1
    "Sin": unary(torch.sin),  # sin x
    "Cos": unary(torch.cos),  # cos x
    "Tan": unary(torch.tan),  # tan x
    "Asin": unary(torch.asin),  # asin x
    "Acos": unary(torch.acos),  # acos x
    "Atan": unary(torch.atan),  # atan x
    "Sinh": unary(torch.sinh),  # sinh x
    "Cosh": unary(torch.cosh),  # cosh x
    "Erf": unary(torch.erf),  # erf x
    "IsNaN": unary(torch.isnan),  # x != x
    "IsInf": _is_inf,  # |x| == inf, by sign
    "Clip": _clip,  # clamp(x, min, max); bounds are inputs from opset 11
    # comparisons and logic
    "Equal": binary(torch.eq, operator.eq),  # a == b
    "Less": binary(torch.lt, operator.lt),  # a < b
    "Greater": binary(torch.gt, operator.gt),  # a > b
    "LessOrEqual": binary(torch.le, operator.le),  # a <= b
    "GreaterOrEqual": binary(torch.ge, operator.ge),  # a >= b
    "Not": _not,  # ~x
    "And": binary(torch.logical_and),  # a & b
    "Or": binary(torch.logical_or),  # a | b
    "Xor": binary(_xor),  # a ^ b
    "Where": _where,  # cond ? a : b
    # activations
    "Relu": unary(F.relu),  # max(x, 0)
    "Sigmoid": unary(torch.sigmoid),  # 1 / (1 + e ** -x)
    "Tanh": unary(torch.tanh),  # tanh x
    "Gelu": _gelu,  # x * Phi(x), erf or tanh form
    "HardSigmoid": _hard_sigmoid,  # clamp(alpha * x + beta, 0, 1)
    "HardSwish": unary(F.hardswish),  # x * hardsigmoid(x)
    "LeakyRelu": lambda n: F.leaky_relu(T(n.inputs[0]), n.attr("alpha", 0.01)),  # x < 0 ? a*x : x
    "PRelu": _prelu,  # x < 0 ? slope * x : x
    "Elu": _elu,  # x < 0 ? alpha * (e**x - 1) : x
    "Selu": _selu,  # gamma * elu(x, alpha)
    "Celu": _celu,  # max(0,x) + min(0, alpha * (e**(x/alpha) - 1))
    "Softplus": unary(F.softplus),  # ln(1 + e**x)
    "Softsign": unary(F.softsign),  # x / (1 + |x|)
    "Mish": unary(F.mish),  # x * tanh(softplus(x))
    "ThresholdedRelu": _thresholded_relu,  # x > alpha ? x : 0
    "Softmax": _softmax(torch.softmax),  # e**x / sum e**x over axis
    "LogSoftmax": _softmax(torch.log_softmax),  # x - logsumexp(x) over axis
    "Hardmax": _hardmax,  # one-hot of the argmax over axis
    # linear algebra, convolution, pooling, normalization
    "MatMul": lambda n: torch.matmul(T(n.inputs[0]), T(n.inputs[1])),  # numpy matmul
    "Gemm": _gemm,  # alpha * A' @ B' + beta * C (linear when it is one)
    "Einsum": _einsum,  # einsum(equation, ...)
    "Conv": _conv,  # conv1d/2d/3d, asymmetric pads via F.pad
    "ConvTranspose": _conv_transpose,  # conv_transpose1d/2d/3d, output_shape/auto_pad via crop
    "MaxPool": lambda n: _pool(n, "max"),  # max_pool1d/2d/3d
    "AveragePool": lambda n: _pool(n, "avg"),  # avg_pool1d/2d/3d (count_include_pad honored)
    "LpPool": _lp_pool,  # (sum |x|**p over the window) ** (1/p)
    "GlobalAveragePool": _global_pool(torch.mean),  # mean over spatial dims, kept
    "GlobalMaxPool": _global_pool(torch.amax),  # max over spatial dims, kept
    "BatchNormalization": _batch_norm,  # inference batch norm (running statistics)
    "LayerNormalization": _layer_norm,  # layer_norm over dims axis..-1
    "InstanceNormalization": _instance_norm,  # per-sample, per-channel normalization
    "LRN": _lrn,  # local response normalization across channels
    # reductions
    "ReduceSum": _reduce(lambda x, a, k: x.sum(a, keepdim=k), 13),  # sum over axes
    "ReduceMean": _reduce(lambda x, a, k: x.mean(a, keepdim=k), 18),  # mean over axes
    "ReduceMax": _reduce(_extreme(torch.amax), 18),  # max over axes (empty: lowest value)
    "ReduceMin": _reduce(_extreme(torch.amin), 18),  # min over axes (empty: highest value)
    "ReduceProd": _reduce(_reduce_prod, 18),  # product over axes
    "ReduceL1": _reduce(lambda x, a, k: x.abs().sum(a, keepdim=k), 18),  # sum |x|
    "ReduceL2": _reduce(lambda x, a, k: (x * x).sum(a, keepdim=k).sqrt(), 18),  # sqrt(sum x**2)
    "ReduceSumSquare": _reduce(lambda x, a, k: (x * x).sum(a, keepdim=k), 18),  # sum x**2
    "ReduceLogSumExp": _reduce(_logsumexp, 18),  # log(sum e**x)
    "ReduceLogSum": _reduce(lambda x, a, k: x.sum(a, keepdim=k).log(), 18),  # log(sum x)
    "ArgMax": _arg(torch.argmax),  # index of the max along axis
    "ArgMin": _arg(torch.argmin),  # index of the min along axis
    "CumSum": _cumsum,  # running sum along axis (exclusive, reverse)
    "TopK": _topk,  # k largest/smallest values and their indices
    # shapes and data movement (ShapeVal-aware where shapes flow through them)
    "Shape": _shape,  # x.shape[start:end] as a ShapeVal
    "Size": _size,  # numel(x)
    "Reshape": _reshape,  # x.reshape(shape), 0 copies a dim unless allowzero
    "Flatten": _flatten,  # 2-D: dims before axis x dims from axis
    "Transpose": _transpose,  # permute(perm), reversed by default
    "Squeeze": _squeeze,  # drop size-1 dims (axes: input from opset 13)
    "Unsqueeze": _unsqueeze,  # insert size-1 dims (axes: input from opset 13)
    "Concat": _concat,  # cat along axis
    "Split": _split,  # split by sizes, or into equal chunks
    "Slice": _slice,  # numpy slicing per axis (starts/ends/axes/steps inputs from opset 10)
    "Gather": _gather,  # numpy take along axis
    "GatherElements": _gather_elements,  # torch.gather
    "GatherND": _gather_nd,  # data[idx[..., 0], idx[..., 1], ...]
    "Expand": _expand,  # bidirectional broadcast to shape
    "Tile": _tile,  # repeat
    "Pad": _pad,  # constant/reflect/edge/wrap padding (pads: input from opset 11)
    "Trilu": _trilu,  # triu/tril with diagonal k
    "OneHot": _one_hot,  # values[1] at the index, values[0] elsewhere
    "Cast": _cast,  # x.to(dtype); shapes stay ShapeVals
    "CastLike": _cast_like,  # x.to(other.dtype)
    "Identity": _identity,  # x
    "Dropout": _dropout,  # inference: x (mask all true)
    "ConstantOfShape": _constant_of_shape,  # full(shape, value)
    "Range": _range,  # arange(start, limit, delta)
    "Constant": _constant,  # folded into the module's constants at import
    # extras: normalizations, layout, scatter, bits, resize
    "RMSNormalization": _rms_norm,  # x / sqrt(mean(x**2) + eps) * scale
    "GroupNormalization": _group_norm,  # group_norm(num_groups)
    "MeanVarianceNormalization": _mvn,  # (x - mean) / std over axes
    "LpNormalization": _lp_norm,  # x / ||x||_p along axis
    "Shrink": _shrink,  # soft/hard shrinkage by lambd, bias
    "Swish": _swish,  # x * sigmoid(alpha * x)
    "Acosh": unary(torch.acosh),  # acosh x
    "Asinh": unary(torch.asinh),  # asinh x
    "Atanh": unary(torch.atanh),  # atanh x
    "DepthToSpace": _depth_to_space,  # channels -> blocks of space (DCR or CRD)
    "SpaceToDepth": _space_to_depth,  # blocks of space -> channels
    "EyeLike": _eye_like,  # ones on diagonal k
    "ScatterElements": _scatter_elements,  # data.scatter(axis, idx, upd) [with reduction]
    "ScatterND": _scatter_nd,  # data[idx] = upd (or += with reduction=add)
    "BitShift": _bit_shift,  # a << b or a >> b
    "BitwiseAnd": binary(torch.bitwise_and),  # a & b
    "BitwiseOr": binary(torch.bitwise_or),  # a | b
    "BitwiseXor": binary(torch.bitwise_xor),  # a ^ b
    "BitwiseNot": lambda n: _wide_uint(torch.bitwise_not, T(n.inputs[0])),  # ~a
    "CumProd": _cumprod,  # running product along axis (exclusive, reverse)
    "NonZero": _non_zero,  # indices of non-zeros, [rank, count] (eager only)
    "Attention": _attention,  # softmax(q k^T * scale + mask) v, GQA, KV cache, softcap
    "Resize": _resize,  # interpolate: nearest, (bi/tri)linear, bicubic, common coordinate modes
    # graphopt's own, made at import (onnx_import.fuse_linear): MatMul(x, W) [+ b], W stored as W^T
    "graphopt::Linear": lambda n: F.linear(T(n.inputs[0]), T(n.inputs[1]), T(n.input(2))),
    # quantization
    "DequantizeLinear": _dequantize,  # (x - zero_point) * scale, per tensor or per axis
    "QuantizeLinear": _quantize,  # saturate(round(x / scale) + zero_point)
    "MatMulInteger": _matmul_integer,  # (a - a_zp) @ (b - b_zp) in int32
}
