"""graphopt's own ops: ``torch.ops.graphopt.*``, registered with ``torch.library.custom_op``.

Each op has a fake (meta) implementation for shape propagation and a reference implementation
in plain ATen that runs on every device, so an optimized graph stays a normal PyTorch graph: it
saves with ``torch.export.save``, runs under ``torch.compile`` and runs on the CPU. On CUDA the
op runs a Triton kernel (``graphopt.kernels``) where, for the shapes it is called with, the kernel
measures faster than the ATen implementation (``graphopt.ops.autotune.choose``, measured once per
shape and cached); elsewhere it runs the reference.

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

The int8 ops (quantize/dequantize, int8_linear, int8_conv1x1, ...) are in graphopt/ops/int8.py.
Compiled models call all of these through ``DIRECT`` (the same implementations, without the
dispatcher's Python overhead).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from graphopt.ir.program import Program
from graphopt.ops.autotune import choose, shape_key

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


class Impl:
    """An op's two implementations with one signature: the ATen ``reference`` (every device)
    and the Triton ``kernel`` (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``), plus
    ``why_not(*args)``: None when the kernel handles these arguments, else the reason."""

    def __init__(
        self,
        reference: Callable[..., Any],
        kernel: Callable[..., Any],
        why_not: Callable[..., str | None],
    ) -> None:
        self.reference, self.kernel, self.why_not = reference, kernel, why_not

    def cuda(self, name: str) -> Callable[..., Any]:
        """The CUDA implementation: the kernel where it handles the call and measures faster."""

        def impl(*args: Any) -> Any:
            tensors = [t for a in args for t in (a if isinstance(a, list) else [a])]
            tensors = [t for t in tensors if isinstance(t, Tensor)]
            if kernels_enabled() and self.why_not(*args) is None:
                others = repr([a for a in args if not isinstance(a, (Tensor, list))])
                digest = hashlib.sha256(others.encode()).hexdigest()[:16]
                key = f"{name} {digest} {shape_key(*tensors)}"
                run_kernel = functools.partial(self.kernel, *args)
                run_reference = functools.partial(self.reference, *args)
                if _use_kernel(key, run_reference, run_kernel, tensors[0]):
                    return run_kernel()
            return self.reference(*args)

        return impl


IMPLS: dict[str, Impl] = {}


def _define(name: str, impl: Impl, fake: Callable[..., Any], schema_fn: Callable[..., Any]) -> Any:
    """Register ``graphopt::<name>`` (signature from ``schema_fn``) with its fake and CUDA forms."""
    op = torch.library.custom_op(f"graphopt::{name}", mutates_args=())(schema_fn)
    op.register_fake(fake)
    op.register_kernel("cuda")(impl.cuda(name))
    IMPLS[name] = impl
    return op


def _always(*args: Any) -> None:
    return None


# -- fused pointwise / reduction groups ----------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def program_of(text: str) -> Program:
    return Program.from_json(text)


def _fused_ref(xs: list[Tensor], program: str) -> list[Tensor]:
    return [t.contiguous() for t in program_of(program).run(list(xs))]


def _fused_kernel(xs: list[Tensor], program: str) -> list[Tensor]:
    from graphopt.kernels import codegen

    return codegen.run(program_of(program), xs)


def _fused_why_not(xs: list[Tensor], program: str) -> str | None:
    from graphopt.kernels import codegen

    return codegen.why_not(program_of(program), xs)


def _fused_schema(xs: list[Tensor], program: str) -> list[Tensor]:
    """Run a fused group: its generated kernel on CUDA, its ATen decomposition elsewhere."""
    return _fused_ref(xs, program)


fused = _define("fused", Impl(_fused_ref, _fused_kernel, _fused_why_not), _fused_ref, _fused_schema)


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


def _linear_kernel(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    from graphopt.kernels import gemm

    return gemm.linear(x, w, b, act, r, alpha)


def _linear_why_not(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    from graphopt.kernels import gemm

    if x.dtype not in (torch.float16, torch.bfloat16):
        return "the Triton GEMM is used for fp16/bf16 (fp32 stays with cuBLAS)"
    if act not in gemm.EPILOGUES:
        return f"activation {act!r} has no GEMM epilogue"
    return None


def _linear_fake(x, w, b, r, act, alpha):  # type: ignore[no-untyped-def]
    y = x.new_empty((*x.shape[:-1], w.shape[0]))
    return y if r is None else y + r


def _linear_schema(
    x: Tensor, w: Tensor, b: Tensor | None, r: Tensor | None, act: str, alpha: float
) -> Tensor:
    """``act(alpha * (x @ w.T) + b) + r`` with the epilogue applied in place."""
    return _linear_ref(x, w, b, r, act, alpha)


linear = _define(
    "linear", Impl(_linear_ref, _linear_kernel, _linear_why_not), _linear_fake, _linear_schema
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
    return ACTIVATIONS[act](y)


def _conv_fake(x, w, b, r, stride, padding, dilation, groups, act):  # type: ignore[no-untyped-def]
    return torch.ops.aten.convolution.default(
        x, w, b, stride, padding, dilation, False, [0] * len(stride), groups
    )


def _no_kernel(*args: Any) -> str:
    return "no Triton convolution: cuDNN with an in-place epilogue"


conv = _define("conv", Impl(_conv_ref, _conv_ref, _no_kernel), _conv_fake, _conv_ref)


# -- norms, softmax, attention ------------------------------------------------------------------


def _norm_ref(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
    n = [x.shape[-1]]
    if kind == "rms":
        return torch.ops.aten.rms_norm.default(x, n, w, eps)
    return torch.ops.aten.layer_norm.default(x, n, w, b, eps)


def _norm_kernel(x, w, b, eps, kind):  # type: ignore[no-untyped-def]
    from graphopt.kernels import norms

    if kind == "rms":
        return norms.rms_norm(x, w, eps)[0]
    return norms.layer_norm(x, w, b, eps)[0]


def _norm_schema(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
    """``layer_norm`` (kind "layer") or ``rms_norm`` (kind "rms") over the last dim."""
    return _norm_ref(x, w, b, eps, kind)


norm = _define(
    "norm",
    Impl(_norm_ref, _norm_kernel, _always),
    lambda x, w, b, eps, kind: torch.empty_like(x),
    _norm_schema,
)


def _add_norm_ref(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    s = x + r
    return _norm_ref(s, w, b, eps, kind), s


def _add_norm_kernel(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    from graphopt.kernels import norms

    if kind == "rms":
        return norms.rms_norm(x, w, eps, residual=r)
    return norms.layer_norm(x, w, b, eps, residual=r)


def _add_norm_why_not(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    if x.shape != r.shape or x.dtype != r.dtype:
        return "the kernel takes a residual of the input's shape and dtype"
    return None


def _add_norm_schema(
    x: Tensor, r: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str
) -> tuple[Tensor, Tensor]:
    """``s = x + r; (norm(s), s)``: the residual stream and its normalized value in one pass."""
    return _add_norm_ref(x, r, w, b, eps, kind)


def _add_norm_fake(x, r, w, b, eps, kind):  # type: ignore[no-untyped-def]
    s = x + r
    return torch.empty_like(s), torch.empty_like(s)


add_norm = _define(
    "add_norm",
    Impl(_add_norm_ref, _add_norm_kernel, _add_norm_why_not),
    _add_norm_fake,
    _add_norm_schema,
)


def _softmax_ref(x: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    y = x * scale if scale != 1.0 else x
    if mask is not None:
        y = y.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else y + mask
    return torch.softmax(y, -1)


def _softmax_kernel(x, scale, mask):  # type: ignore[no-untyped-def]
    from graphopt.kernels import softmax as kernel_softmax

    return kernel_softmax.softmax(x, -1, scale, mask)


def _softmax_schema(x: Tensor, scale: float, mask: Tensor | None) -> Tensor:
    """``softmax(scale * x + mask, dim=-1)``; a bool mask keeps where True. The mask broadcasts
    to ``x`` without enlarging it (fuse-kernels checks this)."""
    return _softmax_ref(x, scale, mask)


softmax = _define(
    "softmax",
    Impl(_softmax_ref, _softmax_kernel, _always),
    lambda x, scale, mask: torch.empty_like(x),
    _softmax_schema,
)


def _sdpa(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


def _attention_kernel(q, k, v, mask, scale, causal):  # type: ignore[no-untyped-def]
    from graphopt.kernels import attention as kernel_attention

    return kernel_attention.attention(q, k, v, mask, scale, causal)


def _attention_schema(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None, causal: bool
) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, is_causal=causal, scale=scale)``."""
    return _sdpa(q, k, v, mask, scale, causal)


attention = _define(
    "attention",
    Impl(_sdpa, _attention_kernel, _always),
    lambda q, k, v, mask, scale, causal: q.new_empty((*q.shape[:-1], v.shape[-1])),
    _attention_schema,
)


GRAPHOPT_OPS = {name: getattr(torch.ops.graphopt, name).default for name in IMPLS}

# ops whose CPU implementation is exactly their ATen reference: fusing them pays the custom-op
# dispatch (about 10 us a call) and gains nothing on the CPU
REFERENCE_ONLY_ON_CPU = frozenset(
    GRAPHOPT_OPS[k] for k in ("fused", "norm", "add_norm", "softmax", "attention")
)


from graphopt.ops import int8 as ops_int8  # noqa: E402, F401  (registers the int8 ops in IMPLS)

GRAPHOPT_OPS.update({name: getattr(torch.ops.graphopt, name).default for name in IMPLS})


def _direct(name: str) -> Callable[..., Any]:
    impl = IMPLS[name]
    cuda = impl.cuda(name)

    def run(*args: Any) -> Any:
        first = next(
            t for a in args for t in (a if isinstance(a, list) else [a]) if isinstance(t, Tensor)
        )
        return cuda(*args) if first.device.type == "cuda" else impl.reference(*args)

    run.__name__ = f"graphopt_{name}"
    return run


# op overload -> the same computation as a plain function, without the dispatcher's Python
# overhead (25 to 50 us a call on the CPU, measured); compiled models execute through these
DIRECT: dict[Any, Callable[..., Any]] = {GRAPHOPT_OPS[name]: _direct(name) for name in IMPLS}


def executable(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of ``gm`` for execution, calling graphopt ops directly (weights shared)."""
    if not any(n.op == "call_function" and n.target in DIRECT for n in gm.graph.nodes):
        return gm
    graph = torch.fx.Graph()
    graph.set_codegen(gm.graph._codegen)  # the same input/output structure (pytree specs)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if new.op == "call_function" and new.target in DIRECT:
            new.target = DIRECT[new.target]
        env[node] = new
    return torch.fx.GraphModule(gm, graph)
