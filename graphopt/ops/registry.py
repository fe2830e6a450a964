"""How a ``graphopt::`` op is registered, and the tables every op lands in.

One call registers an op from its ATen reference, whose type hints are the op's schema::

    def norm_reference(x: Tensor, w: Tensor | None, b: Tensor | None, eps: float, kind: str) -> Tensor:
        ...  # layer_norm or rms_norm over the last dim, in ATen

    norm = define("norm", norm_reference, fake=_norm_fake, kernel=_norm_kernel)
    # -> torch.ops.graphopt.norm(Tensor x, Tensor? w, Tensor? b, float eps, str kind) -> Tensor

The reference runs on every device and is the op's definition. An op may have a Triton
``kernel`` (same signature) with a ``why_not`` that says which calls it cannot take; on CUDA the
kernel runs where it takes the call and measures faster than the reference for those shapes
(``graphopt.ops.autotune.choose``, once per shape, cached). An op with a CUDA implementation of
its own (not measured against the reference) passes it as ``cuda``.

Compiled models call the ops through :data:`DIRECT` (the same implementations, without the
dispatcher's Python overhead); :func:`executable` rewrites a graph to do so.

For Inductor on CUDA, :func:`triton_twin` registers an op's Triton kernel a second time, with
``torch.library.triton_op``, as ``graphopt_triton::<name>``: a custom op is opaque to Inductor,
a triton_op is not, so Inductor calls the kernel inside its own graph instead of breaking it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from graphopt.ops.autotune import cache_key, choose

Fn = Callable[..., Any]


def kernels_enabled() -> bool:
    """Triton kernels are used on CUDA unless ``GRAPHOPT_KERNELS=0``."""
    if os.environ.get("GRAPHOPT_KERNELS", "1") == "0":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _tensors(args: tuple[Any, ...]) -> list[Tensor]:
    """The tensor arguments of a call, those inside list arguments too, in order."""
    flat = [t for a in args for t in (a if isinstance(a, list) else [a])]
    return [t for t in flat if isinstance(t, Tensor)]


def _takes_every_call(*args: Any) -> None:
    return None


def _no_kernel(*args: Any) -> str:
    return "the op has no Triton kernel"


class Impl:
    """An op's implementations, all with the op's signature: the ATen ``reference`` (every
    device), the Triton ``kernel`` or None (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``),
    ``why_not(*args)``: None when the kernel takes these arguments, else the reason, and
    ``own_cuda``: a CUDA implementation of the op's own, or None."""

    def __init__(
        self,
        name: str,
        reference: Fn,
        kernel: Fn | None = None,
        why_not: Callable[..., str | None] | None = None,
        cuda: Fn | None = None,
        fake: Fn | None = None,
    ) -> None:
        self.name, self.reference, self.kernel, self.own_cuda = name, reference, kernel, cuda
        self.why_not = why_not or (_takes_every_call if kernel is not None else _no_kernel)
        self.fake = fake  # shape and dtype of the result (meta), as registered with the op

    def cuda(self) -> Fn:
        """The CUDA implementation: the op's own, else the kernel where it takes the call and
        measures faster, else the reference."""
        if self.own_cuda is not None:
            return self.own_cuda
        if self.kernel is None:
            return self.reference
        return functools.partial(_run_cuda, self)


def _run_cuda(impl: Impl, *args: Any) -> Any:
    """``impl`` on CUDA tensors: its kernel when enabled, able and measured faster."""
    if kernels_enabled() and impl.why_not(*args) is None:
        tensors = _tensors(args)
        key = cache_key(impl.name, *args)
        run_kernel = functools.partial(impl.kernel, *args)
        run_reference = functools.partial(impl.reference, *args)
        if _kernel_is_faster(key, run_reference, run_kernel, tensors[0]):
            return run_kernel()
    return impl.reference(*args)


def _kernel_is_faster(key: str, reference: Fn, kernel: Fn, x: Tensor) -> bool:
    """True when the Triton kernel measures faster than the ATen reference for this call."""
    if x.device.type != "cuda":
        return False
    try:
        choice, _ = choose(key, {"aten": reference, "triton": kernel}, x.device)
    except Exception:  # a kernel that cannot run for these inputs is simply not chosen
        return False
    return choice == "triton"


# op name -> its implementations, in the order the ops were defined
IMPLS: dict[str, Impl] = {}
# op name -> its overload (torch.ops.graphopt.<name>.default)
GRAPHOPT_OPS: dict[str, torch._ops.OpOverload] = {}
# op overload -> the same computation as a plain function, without the dispatcher's Python
# overhead (25 to 50 us a call on the CPU, measured); compiled models execute through these
DIRECT: dict[Any, Fn] = {}
# ops whose CPU implementation is exactly their ATen reference: fusing them pays the custom-op
# dispatch (about 10 us a call) and gains nothing on the CPU
REFERENCE_ONLY_ON_CPU: set[torch._ops.OpOverload] = set()


def define(
    name: str,
    reference: Fn,
    *,
    fake: Fn,
    kernel: Fn | None = None,
    why_not: Callable[..., str | None] | None = None,
    cuda: Fn | None = None,
    reference_only_on_cpu: bool = False,
) -> Any:
    """Register ``graphopt::<name>`` and return it (a ``torch.library.CustomOpDef``).

    The schema comes from ``reference``'s type hints (``torch.library.custom_op``); the op
    writes none of its inputs. ``fake`` computes the output's shape and dtype (meta); ``kernel``
    and ``why_not`` are the optional Triton implementation (see :class:`Impl`); ``cuda`` an
    implementation of the op's own for CUDA tensors, instead of the measured kernel choice.
    ``reference_only_on_cpu``: the op gains nothing over its unfused ATen form on the CPU.
    """
    if name in IMPLS:
        raise ValueError(f"graphopt::{name} is defined twice")
    if cuda is not None and kernel is not None:
        raise ValueError(f"graphopt::{name}: give a Triton kernel or a CUDA implementation")
    impl = Impl(name, reference, kernel, why_not, cuda, fake)
    op = torch.library.custom_op(f"graphopt::{name}", reference, mutates_args=())
    op.register_fake(fake)
    if kernel is not None or cuda is not None:
        op.register_kernel("cuda")(impl.cuda())
    overload = getattr(torch.ops.graphopt, name).default
    IMPLS[name] = impl
    GRAPHOPT_OPS[name] = overload
    DIRECT[overload] = _direct(impl)
    if reference_only_on_cpu:
        REFERENCE_ONLY_ON_CPU.add(overload)
    return op


def _direct(impl: Impl) -> Fn:
    """``impl`` as one plain function: its CUDA implementation on CUDA, else its reference."""
    cuda = impl.cuda()

    def run(*args: Any) -> Any:
        first = _tensors(args)[0]
        return cuda(*args) if first.device.type == "cuda" else impl.reference(*args)

    run.__name__ = f"graphopt_{impl.name}"
    return run


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


TRITON_NAMESPACE = "graphopt_triton"


@functools.cache
def triton_twin(name: str) -> torch._ops.OpOverload:
    """``graphopt_triton::<name>``: the Triton kernel of ``graphopt::<name>`` registered with
    ``torch.library.triton_op`` (on first use), for Inductor on CUDA: it calls the kernel inside
    its own graph where a custom op would break it. Same schema and fake as the op; eager, it
    runs the kernel (the caller has checked ``IMPLS[name].why_not``). Inductor traces the
    kernel's host wrapper, so the wrapper must launch through ``torch.library.wrap_triton``."""
    impl = IMPLS.get(name)
    if impl is None or impl.kernel is None:
        raise ValueError(f"graphopt::{name} has no Triton kernel to register as a triton_op")
    kernel = impl.kernel

    # the reference's signature (and type hints: the schema) around the kernel's body
    @functools.wraps(impl.reference)
    def run(*args: Any, **kwargs: Any) -> Any:
        return kernel(*args, **kwargs)

    op = torch.library.triton_op(f"{TRITON_NAMESPACE}::{name}", run, mutates_args=())
    if impl.fake is not None:  # the op's own fake, rather than the kernel run on fake tensors
        op.register_fake(impl.fake)
    return getattr(getattr(torch.ops, TRITON_NAMESPACE), name).default
