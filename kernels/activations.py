"""The activations a GEMM or convolution epilogue applies: one table, name -> what it computes.

Every user of an activation name reads this table: graphopt's ops (``graphopt::linear``,
``conv`` and the int8 GEMMs take ``act`` by name and compute it with :attr:`Activation.in_place`),
the Triton GEMMs (``kernels/gemm.py``, ``kernels/int8_gemm.py``: :data:`EPILOGUES` and
:data:`INT8_EPILOGUES` say which names they take; ``kernels/epilogue.py`` holds the Triton
implementation of each, one ``constexpr`` branch per name), the passes that fold an activation
into a GEMM (:func:`activation_of` recognizes the ATen calls of :attr:`Activation.aten`), the
fused-kernel generator (:func:`has_math_erf`) and ONNX export::

    "gelu_tanh": reference F.gelu(x, approximate="tanh"); ATen gelu(x, approximate="tanh");
                 Triton 0.5 * x * (1 + tanh(0.7978845608028654 * (x + 0.044715 * x**3)))

This module imports torch, not Triton: graphopt computes activations on machines without it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

aten = torch.ops.aten

# an ATen call that computes an activation: the overload and the arguments it must be given
# (by schema name; an argument left out has its schema default)
AtenForm = tuple[torch._ops.OpOverload, dict[str, Any]]


@dataclass(frozen=True)
class Activation:
    """One activation. ``reference`` (plain torch, out of place) is what it computes.
    ``in_place``: the same values, written into its argument where ATen has an in-place form
    (call it on a fresh buffer the caller owns). ``aten``: the ATen calls that compute it.
    ``triton``: the Triton GEMM epilogue (``kernels/epilogue.py``) implements it, in fp32 (to a
    few ulps of the reference); ``int8``: the int8 GEMMs offer it too."""

    name: str
    reference: Callable[[Tensor], Tensor]
    in_place: Callable[[Tensor], Tensor]
    aten: tuple[AtenForm, ...] = ()
    triton: bool = False
    int8: bool = False


def _identity(x: Tensor) -> Tensor:
    return x


def _relu6_(x: Tensor) -> Tensor:
    return x.clamp_(0.0, 6.0)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _silu_(x: Tensor) -> Tensor:
    return F.silu(x, inplace=True)


def _hardswish_(x: Tensor) -> Tensor:
    return F.hardswish(x, inplace=True)


_GELU = aten.gelu.default
_ROWS = [
    # name, reference, in place, ATen forms; which Triton GEMM epilogues take it
    Activation("none", _identity, _identity, (), triton=True, int8=True),
    Activation("relu", torch.relu, torch.relu_, ((aten.relu.default, {}),), triton=True, int8=True),
    Activation(
        "relu6",
        F.relu6,
        _relu6_,
        ((aten.relu6.default, {}), (aten.hardtanh.default, {"min_val": 0.0, "max_val": 6.0})),
    ),
    # gelu has no in-place form in ATen
    Activation("gelu", F.gelu, F.gelu, ((_GELU, {"approximate": "none"}),), triton=True, int8=True),
    Activation(
        "gelu_tanh",
        _gelu_tanh,
        _gelu_tanh,
        ((_GELU, {"approximate": "tanh"}),),
        triton=True,
        int8=True,
    ),
    Activation("silu", F.silu, _silu_, ((aten.silu.default, {}),), triton=True, int8=True),
    Activation(
        "sigmoid", torch.sigmoid, torch.sigmoid_, ((aten.sigmoid.default, {}),), triton=True
    ),
    Activation("tanh", torch.tanh, torch.tanh_, ((aten.tanh.default, {}),), triton=True),
    Activation("hardswish", F.hardswish, _hardswish_, ((aten.hardswish.default, {}),)),
]

# name -> activation, in the order the names are listed to users
ACTIVATIONS: dict[str, Activation] = {row.name: row for row in _ROWS}

# the names the Triton GEMM (kernels/gemm.py) and the int8 GEMMs (kernels/int8_gemm.py) take
EPILOGUES: tuple[str, ...] = tuple(name for name, row in ACTIVATIONS.items() if row.triton)
INT8_EPILOGUES: tuple[str, ...] = tuple(name for name, row in ACTIVATIONS.items() if row.int8)

# every ATen op that is some activation (with the right arguments), each once
ATEN_ACTIVATIONS: tuple[torch._ops.OpOverload, ...] = tuple(
    dict.fromkeys(op for row in _ROWS for op, _ in row.aten)
)


def _argument(
    op: torch._ops.OpOverload, args: Sequence[Any], kwargs: dict[str, Any], name: str
) -> Any:
    """The value of argument ``name`` in a call of ``op`` (its schema default when left out)."""
    for i, arg in enumerate(op._schema.arguments):
        if arg.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else arg.default_value
    raise KeyError(f"{op} has no argument {name!r}")


def activation_of(
    target: Any, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None
) -> str | None:
    """The name of the activation that the call ``target(*args, **kwargs)`` computes, or None
    (not an activation, or one with arguments no epilogue takes, e.g. ``hardtanh(x, -2, 2)``)::

        activation_of(aten.gelu.default, (x,), {"approximate": "tanh"}) == "gelu_tanh"
        activation_of(aten.hardtanh.default, (x, 0.0, 6.0)) == "relu6"
    """
    kwargs = kwargs or {}
    for row in _ROWS:
        for op, fixed in row.aten:
            if op == target and all(_argument(op, args, kwargs, k) == v for k, v in fixed.items()):
                return row.name
    return None


@functools.cache
def has_math_erf() -> bool:
    """Whether this Triton has ``tl.math.erf``; kernels use a polynomial erf where it has not.
    True without Triton (only kernel text is generated there)."""
    try:
        import triton.language as tl
    except ImportError:
        return True
    return hasattr(tl.math, "erf")
