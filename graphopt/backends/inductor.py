"""inductor: the verified graph compiled by Inductor, ahead of time, once, when the model is
compiled; ``graphopt.save`` stores the compiled package and ``load`` runs it without compiling.

    build:  lowering.prepare(handoff.flat())     graphopt ops in the forms Inductor optimizes
            torch.export (Handoff.dynamic's dims dynamic)
            aoti_compile_and_package (freezing)   weights are constants: oneDNN prepacks them
                                                  and int8 layers run as oneDNN int8 kernels
            aoti_load_package                     the engine; run once (select.py verifies it)
    save:   the package's bytes                   nothing compiled again
    load:   aoti_load_package

Why AOTInductor and not ``torch.compile``'s just-in-time path: Inductor's freezing, which its
x86 int8 lowering needs, is decided by a global flag that must be set while Dynamo traces, so
a JIT engine would set it around every call (16 to 57 us, measured) or risk a recompile (a
batch of 1 after a batch of 4 is one) that fails on an int8 graph. An AOTInductor package has no
guards and no recompiles, serves every size of a dynamic dim (1 included) with one compile,
runs from C++ (less overhead per call than the JIT's Python wrapper), and is what ``save``
stores, so a saved model runs the very code that was verified.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphopt.backends.base import Backend, Engine, Handoff, register_backend
from graphopt.backends.lowering import prepare
from graphopt.errors import first_line

# Inductor's settings for every graph it compiles here: freezing turns the weights into
# constants (what its oneDNN weight prepacking and its x86 int8 lowering need)
OPTIONS: dict[str, Any] = {"freezing": True}
PACKAGE = "model.pt2"  # the AOTInductor package's name among the saved backend files


@register_backend
class Inductor(Backend):
    name = "inductor"

    def unavailable(self, target: str) -> str | None:
        if target == "cuda":
            if importlib.util.find_spec("triton") is None:
                return "triton not installed (Inductor generates Triton kernels on CUDA)"
            return None
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as exc:  # Inductor's own check, whatever it raises
            return (
                "no C++ compiler for Inductor's CPU code generation "
                f"({type(exc).__name__}: {first_line(exc)}); install g++ or set CXX"
            )
        return None

    def unsupported(self, handoff: Handoff, target: str) -> str | None:
        others = [type(x).__name__ for x in handoff.example if not isinstance(x, torch.Tensor)]
        if others:
            return (
                f"inputs that are not tensors ({', '.join(others)}): an AOTInductor package "
                "takes tensors (other values would be compiled in as constants)"
            )
        return None

    def build(self, handoff: Handoff, target: str) -> Engine:
        prepared = prepare(handoff.flat(), target)
        folder = tempfile.TemporaryDirectory(prefix="graphopt-inductor-")
        path = Path(folder.name, PACKAGE)
        compile_package(prepared.gm, export_inputs(handoff), handoff.dynamic, path)

        def payload() -> dict[str, bytes]:  # read when saved; holds the folder while needed
            return {PACKAGE: Path(folder.name, PACKAGE).read_bytes()}

        run = runner(path, tensor_outputs(prepared.gm))
        return Engine(self.name, run, payload, detail=prepared.summary())

    def load(self, handoff: Handoff, payload: dict[str, bytes], target: str) -> Engine:
        with tempfile.TemporaryDirectory(prefix="graphopt-inductor-") as folder:
            path = Path(folder, PACKAGE)
            path.write_bytes(payload[PACKAGE])
            # the package's code is loaded now: the file is not read again
            run = runner(path, tensor_outputs(handoff.gm))
        return Engine(self.name, run, lambda: payload)


def export_inputs(handoff: Handoff) -> list[Any]:
    """The example inputs to export with, contiguous (as the engine passes them), a dynamic dim
    of size 1 repeated to size 2: torch.export specializes sizes 0 and 1 (the package still
    takes a batch of 1)."""
    inputs = []
    for x, dims in zip(handoff.example, handoff.dynamic, strict=True):
        x = x.contiguous()
        for d in dims:
            if x.shape[d] == 1:
                x = torch.cat([x, x], d)
        inputs.append(x)
    return inputs


def compile_package(
    gm: torch.fx.GraphModule, inputs: list[Any], dynamic: list[tuple[int, ...]], path: Path
) -> None:
    """Export ``gm`` (flat tensor inputs; ``dynamic[i]``: the dims of input ``i`` that may
    vary) and compile it with AOTInductor into the package at ``path``."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim, export

    shapes = [{d: Dim.DYNAMIC for d in dims} or None for dims in dynamic]
    with torch.no_grad():
        program = export(gm, tuple(inputs), dynamic_shapes=shapes, strict=False)
        aoti_compile_and_package(program, package_path=str(path), inductor_configs=OPTIONS)


def runner(path: Path, tensors_out: bool) -> Callable[..., Sequence[Any]]:
    """``run(*flat_inputs) -> flat outputs`` of the package at ``path``.

    Inputs are made contiguous: the compiled code assumes the strides it was exported with (a
    no-op for contiguous tensors). Where every output is a tensor, the package's loader is
    called with the flat tensors directly, skipping the parsing of its input and output specs
    that ``AOTICompiledModel.__call__`` does on every call (its flat convention is ours)."""
    from torch._inductor import aoti_load_package

    model = aoti_load_package(str(path))
    call = model.loader.boxed_run if tensors_out else _unboxed(model)

    def run(*inputs: Any) -> Sequence[Any]:
        return call([x.contiguous() for x in inputs])  # a fresh list: boxed_run consumes it

    return run


def _unboxed(model: Any) -> Callable[[list[Any]], Sequence[Any]]:
    return lambda inputs: model(*inputs)


def tensor_outputs(gm: torch.fx.GraphModule) -> bool:
    """Whether every output of the flat graph ``gm`` is a tensor (what the loader returns)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values = torch.fx.node.map_aggregate(output.args[0], lambda a: a)
    leaves = values if isinstance(values, (tuple, list)) else [values]
    return all(
        isinstance(v, torch.fx.Node) and isinstance(v.meta.get("val"), torch.Tensor) for v in leaves
    )
