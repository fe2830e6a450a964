"""The activation table (``graphopt.kernels.activations``): each row's forms compute its torch
reference, the ATen calls it names are recognized and nothing else is, and graphopt's ops take
every name. The Triton side of each row is checked against the same reference by test_gemm.py
and test_int8_gemm.py (they run every name of EPILOGUES / INT8_EPILOGUES)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.nn import functional as F

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.kernels.activations import (
    ACTIVATIONS,
    ATEN_ACTIVATIONS,
    EPILOGUES,
    INT8_EPILOGUES,
    activation_of,
    has_math_erf,
)

aten = torch.ops.aten
NAMES = list(ACTIVATIONS)


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    """Values through every part of every activation: around 0, +-3, +-6, large, inf, NaN."""
    x = torch.linspace(-8.0, 8.0, 97, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 3.0, -3.0, 6.0, 1e4, -1e4, float("inf"), float("-inf")])
    return torch.cat([x, special.double(), torch.tensor([float("nan")])]).to(dtype)


def test_the_names() -> None:
    assert NAMES == [
        "none", "relu", "relu6", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "hardswish",
    ]  # fmt: skip
    assert EPILOGUES == ("none", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
    assert INT8_EPILOGUES == ("none", "relu", "gelu", "gelu_tanh", "silu")
    assert all(ACTIVATIONS[n].name == n for n in NAMES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("name", NAMES)
def test_in_place_form_computes_the_reference_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    x = _inputs(dtype)
    want = ACTIVATIONS[name].reference(x)
    assert torch.equal(x.nan_to_num(), _inputs(dtype).nan_to_num())  # the reference is pure
    got = ACTIVATIONS[name].in_place(x.clone())
    assert torch.equal(got.nan_to_num(), want.nan_to_num()) and got.isnan().equal(want.isnan())


def test_in_place_forms_write_into_their_argument_where_aten_can() -> None:
    for name in ("relu", "relu6", "silu", "sigmoid", "tanh", "hardswish"):
        buffer = _inputs(torch.float32)
        assert ACTIVATIONS[name].in_place(buffer) is buffer, name


@pytest.mark.parametrize("name", NAMES)
def test_every_aten_form_computes_the_reference(name: str) -> None:
    x = _inputs(torch.float32)
    want = ACTIVATIONS[name].reference(x)
    for op, fixed in ACTIVATIONS[name].aten:
        got = op(x, **fixed)
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), (name, op)
        assert activation_of(op, (x,), fixed) == name


@pytest.mark.parametrize(
    ("target", "args", "kwargs", "name"),
    [
        (aten.relu.default, ("x",), {}, "relu"),
        (aten.gelu.default, ("x",), {}, "gelu"),  # approximate defaults to "none"
        (aten.gelu.default, ("x", "tanh"), {}, "gelu_tanh"),
        (aten.gelu.default, ("x",), {"approximate": "tanh"}, "gelu_tanh"),
        (aten.hardtanh.default, ("x", 0.0, 6.0), {}, "relu6"),
        (aten.hardtanh.default, ("x", 0, 6), {}, "relu6"),
        (aten.hardtanh.default, ("x",), {"min_val": 0.0, "max_val": 6.0}, "relu6"),
        (aten.relu6.default, ("x",), {}, "relu6"),
        (aten.hardtanh.default, ("x",), {}, None),  # hardtanh's defaults are -1, 1
        (aten.hardtanh.default, ("x", 0.0, 5.0), {}, None),
        (aten.silu.default, ("x",), {}, "silu"),
        (aten.sigmoid.default, ("x",), {}, "sigmoid"),
        (aten.tanh.default, ("x",), {}, "tanh"),
        (aten.hardswish.default, ("x",), {}, "hardswish"),
        (aten.add.Tensor, ("x", "y"), {}, None),
        (aten.leaky_relu.default, ("x",), {}, None),
    ],
)
def test_activation_of_a_call(
    target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], name: str | None
) -> None:
    assert activation_of(target, args, kwargs) == name


def test_aten_activations_lists_every_op_once() -> None:
    ops = [op for row in ACTIVATIONS.values() for op, _ in row.aten]
    assert len(ATEN_ACTIVATIONS) == len(set(ATEN_ACTIVATIONS)) == len(set(ops))
    assert set(ATEN_ACTIVATIONS) == set(ops)
    assert aten.hardtanh.default in ATEN_ACTIVATIONS and aten.add.Tensor not in ATEN_ACTIVATIONS


@pytest.mark.parametrize("name", NAMES)
def test_graphopt_ops_take_every_name(name: str) -> None:
    # the ops' ATen path (the CPU here) computes the table's reference in place
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, generator=g) * 3, torch.randn(4, 7, generator=g)
    b, r = torch.randn(4, generator=g), torch.randn(5, 4, generator=g)
    want = ACTIVATIONS[name].reference(F.linear(x, w, b)) + r
    torch.testing.assert_close(torch.ops.graphopt.linear(x, w, b, r, name, 1.0), want)
    xc, wc = torch.randn(1, 3, 6, 6, generator=g) * 3, torch.randn(2, 3, 3, 3, generator=g)
    want = ACTIVATIONS[name].reference(F.conv2d(xc, wc, padding=1))
    got = torch.ops.graphopt.conv(xc, wc, None, None, [1, 1], [1, 1], [1, 1], 1, name)
    torch.testing.assert_close(got, want)


def test_has_math_erf_answers_for_this_triton() -> None:
    import triton.language as tl

    assert has_math_erf() == hasattr(tl.math, "erf")
