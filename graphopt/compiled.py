"""The module ``graphopt.compile`` returns, its input checks, and saving/loading it."""

from __future__ import annotations

import functools
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.capture import _batch_dims, _export, graph_of
from graphopt.errors import InputMismatchError, SerializationError
from graphopt.ops import executable
from graphopt.state import StateBinding, StatefulProgram, is_stateful

FORMAT = "graphopt-model/1"


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int | None, ...]  # None: dynamic (the batch dimension)
    device: str

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.replace('torch.', '')}[{dims}] on {self.device}"


@dataclass(frozen=True)
class InputSignature:
    """What a compiled model accepts: arity, keyword names, each tensor's dtype/rank/device and
    static dims, and whether all inputs share one (dynamic) batch size."""

    n_args: int
    kwarg_names: tuple[str, ...]
    leaves: tuple[TensorSpec | None, ...]  # None for non-tensor leaves
    dynamic_batch: bool
    shared_batch: bool = False

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool) -> InputSignature:
        leaves: list[TensorSpec | None] = []
        batches = set()
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                shape = tuple(
                    None if (i == 0 and dynamic_batch) else int(d) for i, d in enumerate(leaf.shape)
                )
                leaves.append(TensorSpec(str(leaf.dtype), shape, leaf.device.type))
                if leaf.dim() >= 1:
                    batches.add(int(leaf.shape[0]))
            else:
                leaves.append(None)
        shared = dynamic_batch and len(batches) == 1
        return InputSignature(
            len(args), tuple(sorted(kwargs)), tuple(leaves), dynamic_batch, shared
        )

    @functools.cached_property
    def _expected(
        self,
    ) -> tuple[tuple[int, torch.dtype, str, int, tuple[tuple[int, int], ...]], ...]:
        """Per tensor leaf: (index, dtype, device type, rank, static dims) for the fast check."""
        out = []
        for i, spec in enumerate(self.leaves):
            if spec is not None:
                dtype = getattr(torch, spec.dtype.replace("torch.", ""))
                static = tuple((j, d) for j, d in enumerate(spec.shape) if d is not None)
                out.append((i, dtype, spec.device, len(spec.shape), static))
        return tuple(out)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise InputMismatchError unless the call matches; cheap when it does."""
        if len(args) != self.n_args:
            raise InputMismatchError(
                f"compiled model called with {len(args)} positional argument(s), expected "
                f"{self.n_args} (as in example_inputs)"
            )
        if len(kwargs) != len(self.kwarg_names) or any(k not in kwargs for k in self.kwarg_names):
            raise InputMismatchError(
                f"compiled model called with keyword arguments {sorted(kwargs)}, expected "
                f"{list(self.kwarg_names)}"
            )
        leaves = pytree.tree_leaves((args, kwargs))
        if len(leaves) != len(self.leaves):
            raise InputMismatchError(
                f"compiled model called with {len(leaves)} input tensors/values in its arguments' "
                f"structure, expected {len(self.leaves)}"
            )
        batch = None
        for i, dtype, device, rank, static in self._expected:
            leaf = leaves[i]
            if not (
                isinstance(leaf, torch.Tensor)
                and leaf.dtype is dtype
                and leaf.dim() == rank
                and leaf.device.type == device
                and all(leaf.shape[j] == d for j, d in static)
            ):
                raise self._mismatch(i, leaf)
            if self.shared_batch and rank >= 1:
                if batch is None:
                    batch = (i, leaf.shape[0])
                elif leaf.shape[0] != batch[1]:
                    raise InputMismatchError(
                        f"inputs {batch[0]} and {i} must have the same batch size (dim 0), as in "
                        f"example_inputs; got {batch[1]} and {leaf.shape[0]}"
                    )

    def _mismatch(self, i: int, leaf: Any) -> InputMismatchError:
        spec = self.leaves[i]
        assert spec is not None
        if not isinstance(leaf, torch.Tensor):
            return InputMismatchError(
                f"input {i}: expected a tensor {spec.describe()}, got {type(leaf).__name__}"
            )
        got = TensorSpec(str(leaf.dtype), tuple(leaf.shape), leaf.device.type)
        if got.dtype != spec.dtype:
            what = "dtype"
        elif got.device != spec.device:
            what = "device"
        else:
            what = "rank" if len(got.shape) != len(spec.shape) else "shape"
        hint = " (* is the dynamic batch dimension)" if self.dynamic_batch else ""
        return InputMismatchError(
            f"input {i}: wrong {what}: expected {spec.describe()}, got {got.describe()}{hint}"
        )


class CompiledModule(torch.nn.Module):
    """An optimized model: call it like the original. ``.report`` holds the per-pass report."""

    def __init__(
        self,
        gm: GraphModule,
        signature: InputSignature,
        *,
        report: Any = None,
        pipeline: str = "",
        target: str = "cpu",
    ) -> None:
        super().__init__()
        self.gm = gm  # the optimized graph: saved, exported and reported
        self._exec = executable(gm)  # the same graph calling graphopt ops without the dispatcher
        # a model that updates buffers or writes inputs: the graph threads them through, and the
        # binding writes them back once per call (its buffers are the graph's own copies)
        self._state = StateBinding(gm) if is_stateful(gm) else None
        self.signature = signature
        self.report = report
        self.pipeline = pipeline
        self.target = target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.signature.check(args, kwargs)
        with torch.no_grad():  # compiled models are for inference: weights are folded constants
            if self._state is not None:
                return self._state(self._exec, self.gm, args, kwargs)
            return self._exec(*args, **kwargs)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.gm.graph


def _example_inputs(sig: InputSignature, args_spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Random inputs matching a signature (batch 2 for dynamic dims), to re-export for saving."""
    leaves = []
    for spec in sig.leaves:
        assert spec is not None
        shape = tuple(2 if d is None else d for d in spec.shape)
        dtype = getattr(torch, spec.dtype.replace("torch.", ""))
        t = torch.randn(shape) if dtype.is_floating_point else torch.zeros(shape, dtype=torch.int64)
        leaves.append(t.to(dtype=dtype, device=spec.device))
    return pytree.tree_unflatten(leaves, args_spec)


def save(compiled: CompiledModule, path: str | Path) -> None:
    """Write ``compiled`` to ``path``: an ExportedProgram plus graphopt's metadata."""
    if not isinstance(compiled, CompiledModule):
        raise SerializationError(
            f"graphopt.save expects what graphopt.compile returned, got {type(compiled).__name__}"
        )
    sig = compiled.signature
    if any(s is None for s in sig.leaves):
        raise SerializationError(
            "graphopt.save: models with non-tensor inputs cannot be saved yet; make them tensors "
            "or constants of the model"
        )
    # a stateful graph is saved as a module that updates its buffers in place, which load
    # (like capture) turns back into a pure graph
    program = StatefulProgram(compiled.gm) if is_stateful(compiled.gm) else compiled.gm
    in_spec = (
        program.binding.in_spec if isinstance(program, StatefulProgram) else compiled.gm._in_spec
    )
    args, kwargs = _example_inputs(sig, in_spec)
    dynamic = _batch_dims(program, args, kwargs) if sig.dynamic_batch else None
    if isinstance(program, StatefulProgram) and isinstance(dynamic, tuple):
        dynamic = {"args": dynamic}  # its forward(*args, **kwargs)
    try:
        ep = _export(program, args, kwargs, dynamic)
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
    except Exception as exc:
        raise SerializationError(
            f"graphopt.save could not serialize the compiled graph: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Report this with the pipeline "
            f"{compiled.pipeline!r}"
        ) from None
    meta = {
        "format": FORMAT,
        "pipeline": compiled.pipeline,
        "target": compiled.target,
        "signature": {
            "shared_batch": sig.shared_batch,
            "n_args": sig.n_args,
            "kwarg_names": list(sig.kwarg_names),
            "leaves": [asdict(s) for s in sig.leaves if s is not None],
            "dynamic_batch": sig.dynamic_batch,
        },
    }
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("graphopt.json", json.dumps(meta, indent=1))
        zf.writestr("program.pt2", buffer.getvalue())


def load(path: str | Path) -> CompiledModule:
    """Read a model written by :func:`save`; it runs without recompiling."""
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"graphopt.load: no file at {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("graphopt.json"))
            program = zf.read("program.pt2")
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise SerializationError(
            f"graphopt.load: {path} is not a graphopt model file or is corrupt ({exc}); "
            "write it with graphopt.save"
        ) from None
    if meta.get("format") != FORMAT:
        raise SerializationError(
            f"graphopt.load: {path} has format {meta.get('format')!r}, this graphopt reads {FORMAT!r}"
        )
    try:
        ep = torch.export.load(io.BytesIO(program))
    except Exception as exc:
        raise SerializationError(
            f"graphopt.load: the program in {path} is corrupt or from an incompatible torch "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); recompile "
            "the model and save it again"
        ) from None
    gm = graph_of(ep, str(path))
    s = meta["signature"]
    sig = InputSignature(
        s["n_args"],
        tuple(s["kwarg_names"]),
        tuple(TensorSpec(d["dtype"], tuple(d["shape"]), d["device"]) for d in s["leaves"]),
        s["dynamic_batch"],
        s.get("shared_batch", False),
    )
    return CompiledModule(gm, sig, pipeline=meta["pipeline"], target=meta["target"])
