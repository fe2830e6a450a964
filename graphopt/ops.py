"""graphopt's own ops: ``torch.ops.graphopt.*``, registered with ``torch.library.custom_op``.

Each op has a fake (meta) implementation for shape propagation and a reference implementation
in plain ATen that runs on every device, so an optimized graph stays a normal PyTorch graph: it
saves with ``torch.export.save``, runs under ``torch.compile`` and runs on the CPU. On CUDA the
op runs a Triton kernel (``graphopt.kernels``) where, for the shapes it is called with, the kernel
measures faster than the ATen implementation (``graphopt.autotune.choose``, measured once per
shape and cached); elsewhere it runs the reference.

=====================  ==========================================================================
op                     computes
=====================  ==========================================================================
fused(xs, program)     the group of pointwise / row-reduction calls in ``program`` (JSON text,
                       ``graphopt.program.Program``); Triton: ``kernels/codegen.py``
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
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from graphopt.autotune import choose, shape_key
from graphopt.program import Program

# activation name -> ATen form, in place where one exists (on a fresh buffer the op owns)
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "none": lambda y: y,
    "relu": torch.relu_,
    "relu6": lambda y: y.clamp_(0.0, 6.0),
    "gelu": F.gelu,  # no in-place form in ATen
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": lambda y: F.silu(y, inplace=True),
    "sigmoid": torch.sigmoid_,
    "tanh": torch.tanh_,
    "hardswish": lambda y: F.hardswish(y, inplace=True),
}


def kernels_enabled() -> bool:
    """Triton kernels are used on CUDA unless ``GRAPHOPT_KERNELS=0``."""
    if os.environ.get("GRAPHOPT_KERNELS", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_kernel(
    key: str, reference: Callable[[], Any], kernel: Callable[[], Any], x: Tensor
) -> bool:
    """True when the Triton kernel measures faster than the ATen reference for this call."""
    if x.device.type != "cuda" or not kernels_enabled():
        return False
    try:
        choice, _ = choose(key, {"aten": reference, "triton": kernel}, x.device)
    except Exception:  # a kernel that cannot run for these inputs is simply not chosen
        return False
    return choice == "triton"


# -- fused pointwise / reduction groups ----------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def program_of(text: str) -> Program:
    return Program.from_json(text)


@torch.library.custom_op("graphopt::fused", mutates_args=())
def fused(xs: list[Tensor], program: str) -> list[Tensor]:
    """Run a fused group's ATen reference decomposition (outputs contiguous, as the kernel's)."""
    return [t.contiguous() for t in program_of(program).run(list(xs))]


@fused.register_fake
def _fused_fake(xs: list[Tensor], program: str) -> list[Tensor]:
    return [t.contiguous() for t in program_of(program).run(list(xs))]


@fused.register_kernel("cuda")
def _fused_cuda(xs: list[Tensor], program: str) -> list[Tensor]:
    prog = program_of(program)
    if kernels_enabled():
        from graphopt.kernels import codegen

        if codegen.why_not(prog, xs) is None:
            key = f"fused {prog.key} {shape_key(*xs)}"
            if _use_kernel(key, lambda: prog.run(list(xs)), lambda: codegen.run(prog, xs), xs[0]):
                return codegen.run(prog, xs)
    return [t.contiguous() for t in prog.run(list(xs))]


# -- GEMM / convolution with epilogue -----------------------------------------------------------


def _linear_ref(
    x: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, act: str, alpha: float
) -> Tensor:
    y = F.linear(x, w)
    if alpha != 1.0:
        y.mul_(alpha)
    if b is not None:
        y.add_(b)
    y = ACTIVATIONS[act](y)
    if r is not None:
        y = y.add_(r) if torch.broadcast_shapes(y.shape, r.shape) == y.shape else y + r
    return y


@torch.library.custom_op("graphopt::linear", mutates_args=())
def linear(
    x: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, act: str, alpha: float
) -> Tensor:
    """``act(alpha * (x @ w.T) + b) + r`` with the epilogue applied in place."""
    return _linear_ref(x, w, b, r, act, alpha)


@linear.register_fake
def _linear_fake(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    y = x.new_empty((*x.shape[:-1], w.shape[0]))
    return y if r is None else y + r


@linear.register_kernel("cuda")
def _linear_cuda(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    if x.dtype in (torch.float16, torch.bfloat16) and kernels_enabled():
        from graphopt.kernels import gemm

        if act in gemm.EPILOGUES:
            key = f"linear {act} {shape_key(x, w, b, r)}"

            def kernel() -> Tensor:
                return gemm.linear(x, w, b, act, r, alpha)

            if _use_kernel(key, lambda: _linear_ref(x, w, b, r, act, alpha), kernel, x):
                return kernel()
    return _linear_ref(x, w, b, r, act, alpha)


@torch.library.custom_op("graphopt::conv", mutates_args=())
def conv(
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
    return ACTIVATIONS[act](y)


@conv.register_fake
def _conv_fake(x, w, b, r, stride, padding, dilation, groups, act):  # type: ignore[no-untyped-def]
    return torch.ops.aten.convolution.default(
        x, w, b, stride, padding, dilation, False, [0] * len(stride), groups
    )


# -- norms, softmax, attention ------------------------------------------------------------------


def _norm_ref(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
    n = [x.shape[-1]]
    if kind == "rms":
        return torch.ops.aten.rms_norm.default(x, n, w, eps)
    return torch.ops.aten.layer_norm.default(x, n, w, b, eps)


def _norm_kernel(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str, r=None):  # type: ignore[no-untyped-def]
    from graphopt.kernels import norms

    if kind == "rms":
        return norms.rms_norm(x, w, eps, residual=r)
    return norms.layer_norm(x, w, b, eps, residual=r)


@torch.library.custom_op("graphopt::norm", mutates_args=())
def norm(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
    """``layer_norm`` (kind "layer") or ``rms_norm`` (kind "rms") over the last dim."""
    return _norm_ref(x, w, b, eps, kind)


@norm.register_fake
def _norm_fake(x, w, b, eps, kind):  # type: ignore[no-untyped-def]
    return torch.empty_like(x)


@norm.register_kernel("cuda")
def _norm_cuda(x, w, b, eps, kind):  # type: ignore[no-untyped-def]
    key = f"norm {kind} {shape_key(x, w, b)}"
    if _use_kernel(
        key, lambda: _norm_ref(x, w, b, eps, kind), lambda: _norm_kernel(x, w, b, eps, kind), x
    ):
        return _norm_kernel(x, w, b, eps, kind)[0]
    return _norm_ref(x, w, b, eps, kind)


@torch.library.custom_op("graphopt::add_norm", mutates_args=())
def add_norm(
    x: Tensor, r: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str
) -> tuple[Tensor, Tensor]:
    """``s = x + r; (norm(s), s)``: the residual stream and its normalized value in one pass."""
    s = x + r
    return _norm_ref(s, w, b, eps, kind), s


@add_norm.register_fake
def _add_norm_fake(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    s = x + r
    return torch.empty_like(s), torch.empty_like(s)


@add_norm.register_kernel("cuda")
def _add_norm_cuda(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    def ref() -> tuple[Tensor, Tensor]:
        s = x + r
        return _norm_ref(s, w, b, eps, kind), s

    if x.shape == r.shape and x.dtype == r.dtype:
        key = f"add_norm {kind} {shape_key(x, r, w, b)}"
        if _use_kernel(key, ref, lambda: _norm_kernel(x, w, b, eps, kind, r), x):
            y, s = _norm_kernel(x, w, b, eps, kind, r)
            return y, s
    return ref()


def _softmax_ref(x: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    y = x * scale if scale != 1.0 else x
    if mask is not None:
        y = y.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else y + mask
    return torch.softmax(y, -1)


@torch.library.custom_op("graphopt::softmax", mutates_args=())
def softmax(x: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``softmax(scale * x + mask, dim=-1)``; a bool mask keeps where True."""
    return _softmax_ref(x, scale, mask)


@softmax.register_fake
def _softmax_fake(x, scale, mask):  # type: ignore[no-untyped-def]
    return torch.empty_like(x) if mask is None else torch.empty_like(x + mask.to(x.dtype))


@softmax.register_kernel("cuda")
def _softmax_cuda(x, scale, mask):  # type: ignore[no-untyped-def]
    from graphopt.kernels import softmax as kernel_softmax

    key = f"softmax {shape_key(x, mask)}"

    def kernel() -> Tensor:
        return kernel_softmax.softmax(x, -1, scale, mask)

    if _use_kernel(key, lambda: _softmax_ref(x, scale, mask), kernel, x):
        return kernel()
    return _softmax_ref(x, scale, mask)


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool
) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


@torch.library.custom_op("graphopt::attention", mutates_args=())
def attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool
) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)``."""
    return _sdpa(q, k, v, mask, scale, causal)


@attention.register_fake
def _attention_fake(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    from graphopt.kernels import attention as kernel_attention

    key = f"attention causal={causal} {shape_key(q, k, v, mask)}"

    def kernel() -> Tensor:
        return kernel_attention.attention(q, k, v, mask, scale, causal)

    if _use_kernel(key, lambda: _sdpa(q, k, v, mask, scale, causal), kernel, q):
        return kernel()
    return _sdpa(q, k, v, mask, scale, causal)


GRAPHOPT_OPS = {
    "fused": torch.ops.graphopt.fused.default,
    "linear": torch.ops.graphopt.linear.default,
    "conv": torch.ops.graphopt.conv.default,
    "norm": torch.ops.graphopt.norm.default,
    "add_norm": torch.ops.graphopt.add_norm.default,
    "softmax": torch.ops.graphopt.softmax.default,
    "attention": torch.ops.graphopt.attention.default,
}

# ops whose CPU implementation is exactly their ATen reference: fusing them pays the custom-op
# dispatch (about 10 us a call) and gains nothing on the CPU
REFERENCE_ONLY_ON_CPU = frozenset(
    GRAPHOPT_OPS[k] for k in ("fused", "norm", "add_norm", "softmax", "attention")
)
