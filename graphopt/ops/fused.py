"""graphopt's float ops: ``torch.ops.graphopt.*``, each registered by one call of
:func:`graphopt.ops.registry.define` from its ATen reference (which runs on every device), with a
fake (meta) implementation and, on CUDA, a Triton kernel (``graphopt.kernels``) used where it
measures faster than the reference for the shapes it is called with.

=====================  ==========================================================================
op                     computes
=====================  ==========================================================================
fused(xs, program)     the group of pointwise / row-reduction calls in ``program`` (JSON text,
                       ``graphopt.ir.program.Program``); Triton: ``kernels/codegen.py``
linear(x, w, b, r,     ``act(alpha * (x @ w.T) + b) + r``; Triton: ``kernels/gemm.py``
  act, alpha)
conv(x, w, b, r, ...)  ``act(conv(x, w, b) + r)``; cuDNN/ATen convolution, in-place epilogue
norm(x, w, b, eps,     ``layer_norm`` or ``rms_norm`` over the last dim; Triton: ``kernels/norms.py``
  kind)
add_norm(x, r, w, b,   ``s = x + r; (norm(s), s)``: the residual add fused into the norm
  eps, kind)
softmax(x, scale, m)   ``softmax(scale * x + m, -1)`` (bool ``m``: False is masked out);
                       Triton: ``kernels/softmax.py``
attention(q, k, v, m,  ``scaled_dot_product_attention``; Triton flash kernel or torch's SDPA,
  scale, causal)       whichever measures faster; ``kernels/attention.py``
=====================  ==========================================================================

``act`` names an activation of ``graphopt.kernels.activations.ACTIVATIONS``. The int8 ops are in
graphopt/ops/int8.py, the 2:4 sparse linear in graphopt/ops/sparse.py.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn import functional as F

from graphopt.ir.program import Program
from graphopt.kernels.activations import ACTIVATIONS, EPILOGUES
from graphopt.ops.registry import (
    DIRECT,
    GRAPHOPT_OPS,
    IMPLS,
    REFERENCE_ONLY_ON_CPU,
    define,
    executable,
)

__all__ = [
    # the ops
    "add_norm",
    "attention",
    "conv",
    "fused",
    "linear",
    "norm",
    "softmax",
    # their helpers
    "epilogue",
    "norm_reference",
    "program_of",
    # the registry's tables and the activation table, re-exported at the path that passes,
    # tools and the runtime import them from
    "ACTIVATIONS",
    "DIRECT",
    "GRAPHOPT_OPS",
    "IMPLS",
    "REFERENCE_ONLY_ON_CPU",
    "executable",
]


# -- fused pointwise / reduction groups ----------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def program_of(text: str) -> Program:
    """The :class:`Program` of a ``fused`` call's JSON text (parsed once per text)."""
    return Program.from_json(text)


def _fused_ref(xs: list[Tensor], program: str) -> list[Tensor]:
    """The group's ATen decomposition (on CUDA its generated kernel runs where faster)."""
    return [t.contiguous() for t in program_of(program).run(list(xs))]


def _fused_kernel(xs: list[Tensor], program: str) -> list[Tensor]:
    from graphopt.kernels import codegen

    return codegen.run(program_of(program), xs)


def _fused_why_not(xs: list[Tensor], program: str) -> str | None:
    from graphopt.kernels import codegen

    return codegen.why_not(program_of(program), xs)


fused = define(
    "fused",
    _fused_ref,
    fake=_fused_ref,
    kernel=_fused_kernel,
    why_not=_fused_why_not,
    reference_only_on_cpu=True,
)


# -- GEMM / convolution with epilogue -----------------------------------------------------------


def epilogue(y: Tensor, b: Tensor | None, r: Tensor | None, act: str) -> Tensor:
    """``act(y + b) + r`` in place on ``y`` (a fresh buffer the caller owns) where ATen allows:
    the ATen form of a GEMM epilogue (the int8 ops use it too)."""
    if b is not None:
        y = y.add_(b)
    y = ACTIVATIONS[act].in_place(y)
    if r is not None:
        y = y.add_(r) if torch.broadcast_shapes(y.shape, r.shape) == y.shape else y + r
    return y


def _linear_ref(
    x: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, act: str, alpha: float
) -> Tensor:
    """``act(alpha * (x @ w.T) + b) + r`` with the epilogue applied in place."""
    y = F.linear(x, w)
    if alpha != 1.0:
        y.mul_(alpha)
    return epilogue(y, b, r, act)


def _linear_kernel(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    from graphopt.kernels import gemm

    return gemm.linear(x, w, b, act, r, alpha)


def _linear_why_not(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    if x.dtype not in (torch.float16, torch.bfloat16):
        return "the Triton GEMM is used for fp16/bf16 (fp32 stays with cuBLAS)"
    if act not in EPILOGUES:
        return f"activation {act!r} has no GEMM epilogue"
    return None


def _linear_fake(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    y = x.new_empty((*x.shape[:-1], w.shape[0]))
    return y if r is None else y + r


linear = define(
    "linear", _linear_ref, fake=_linear_fake, kernel=_linear_kernel, why_not=_linear_why_not
)


def _conv_ref(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    r: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    act: str,
) -> Tensor:
    """``act(conv(x, w, b) + r)`` with the residual add and activation applied in place."""
    y = torch.ops.aten.convolution.default(
        x, w, b, stride, padding, dilation, False, [0] * len(stride), groups
    )
    if r is not None:
        y.add_(r)
    return ACTIVATIONS[act].in_place(y)


def _conv_fake(x, w, b, r, stride, padding, dilation, groups, act):  # type: ignore[no-untyped-def]
    return torch.ops.aten.convolution.default(
        x, w, b, stride, padding, dilation, False, [0] * len(stride), groups
    )


# no Triton convolution: cuDNN (or the CPU's) with the epilogue in place on its output
conv = define("conv", _conv_ref, fake=_conv_fake)


# -- norms, softmax, attention ------------------------------------------------------------------


def norm_reference(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
    """``layer_norm`` (kind "layer") or ``rms_norm`` (kind "rms") over the last dim."""
    n = [x.shape[-1]]
    if kind == "rms":
        return torch.ops.aten.rms_norm.default(x, n, w, eps)
    return torch.ops.aten.layer_norm.default(x, n, w, b, eps)


def _norm_kernel(x, w, b, eps, kind):  # type: ignore[no-untyped-def]
    from graphopt.kernels import norms

    if kind == "rms":
        return norms.rms_norm(x, w, eps)[0]
    return norms.layer_norm(x, w, b, eps)[0]


def _norm_fake(x, w, b, eps, kind):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


norm = define(
    "norm", norm_reference, fake=_norm_fake, kernel=_norm_kernel, reference_only_on_cpu=True
)


def _add_norm_ref(
    x: Tensor, r: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str
) -> tuple[Tensor, Tensor]:
    """``s = x + r; (norm(s), s)``: the residual stream and its normalized value in one pass."""
    s = x + r
    return norm_reference(s, w, b, eps, kind), s


def _add_norm_kernel(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    from graphopt.kernels import norms

    if kind == "rms":
        return norms.rms_norm(x, w, eps, residual=r)
    return norms.layer_norm(x, w, b, eps, residual=r)


def _add_norm_why_not(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    if x.shape != r.shape or x.dtype != r.dtype:
        return "the kernel takes a residual of the input's shape and dtype"
    return None


def _add_norm_fake(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    s = x + r
    return torch.empty_like(s), torch.empty_like(s)


add_norm = define(
    "add_norm",
    _add_norm_ref,
    fake=_add_norm_fake,
    kernel=_add_norm_kernel,
    why_not=_add_norm_why_not,
    reference_only_on_cpu=True,
)


def _softmax_ref(x: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``softmax(scale * x + mask, dim=-1)``; a bool mask keeps where True. The mask broadcasts
    to ``x`` without enlarging it (fuse-kernels checks this)."""
    y = x * scale if scale != 1.0 else x
    if mask is not None:
        y = y.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else y + mask
    return torch.softmax(y, -1)


def _softmax_kernel(x, scale, mask):  # type: ignore[no-untyped-def]
    from graphopt.kernels import softmax as kernel_softmax

    return kernel_softmax.softmax(x, -1, scale, mask)


def _softmax_fake(x, scale, mask):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


softmax = define(
    "softmax",
    _softmax_ref,
    fake=_softmax_fake,
    kernel=_softmax_kernel,
    reference_only_on_cpu=True,
)


def _attention_ref(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool
) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _attention_kernel(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    from graphopt.kernels import attention as kernel_attention

    return kernel_attention.attention(q, k, v, mask, scale, causal)


def _attention_fake(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


attention = define(
    "attention",
    _attention_ref,
    fake=_attention_fake,
    kernel=_attention_kernel,
    reference_only_on_cpu=True,
)
