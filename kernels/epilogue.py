"""The Triton side of a GEMM epilogue: :func:`apply_activation` computes every activation of
``kernels/activations.py`` whose row says ``triton=True``, on an fp32 tile, one ``constexpr``
branch per name (the branch not taken is not compiled)::

    acc = apply_activation(acc, "gelu", HAS_ERF)  # 0.5 * acc * (1 + erf(acc / sqrt(2)))

``kernels/gemm.py`` and ``kernels/int8_gemm.py`` call it; tests/kernels/test_gemm.py checks every
name against the row's torch reference.
"""

from __future__ import annotations

import triton
import triton.language as tl

from graphopt.kernels.activations import has_math_erf

# pass as the HAS_ERF constexpr: False on a Triton without tl.math.erf (the polynomial serves)
HAS_ERF = has_math_erf()


@triton.jit
def erf(x, HAS_ERF: tl.constexpr):
    if HAS_ERF:
        y = tl.math.erf(x)
    else:
        # Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7), for a Triton without tl.math.erf.
        a = tl.abs(x)
        t = 1.0 / (1.0 + 0.3275911 * a)
        poly = t * (
            0.254829592
            + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
        )
        r = 1.0 - poly * tl.exp(-a * a)
        y = tl.where(x < 0, -r, r)
    return y


@triton.jit
def tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates to +-1 without inf/inf for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr, HAS_ERF: tl.constexpr):
    if ACTIVATION == "relu":
        x = tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        x = 0.5 * x * (1.0 + erf(x * 0.7071067811865476, HAS_ERF))
    elif ACTIVATION == "gelu_tanh":
        x = 0.5 * x * (1.0 + tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == "silu":
        x = x / (1.0 + tl.exp(-x))
    elif ACTIVATION == "sigmoid":
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACTIVATION == "tanh":
        x = tanh(x)
    return x
