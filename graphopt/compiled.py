"""The module ``graphopt.compile`` returns, its input checks, and saving/loading it."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.capture import _batch_dims, _export, normalize
from graphopt.errors import InputMismatchError, SerializationError

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
    """What a compiled model accepts: arity, keyword names, and each tensor's dtype/rank/device."""

    n_args: int
    kwarg_names: tuple[str, ...]
    leaves: tuple[TensorSpec | None, ...]  # None for non-tensor leaves
    dynamic_batch: bool

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool) -> InputSignature:
        leaves = []
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                shape = tuple(
                    None if (i == 0 and dynamic_batch) else int(d) for i, d in enumerate(leaf.shape)
                )
                leaves.append(TensorSpec(str(leaf.dtype), shape, leaf.device.type))
            else:
                leaves.append(None)
        return InputSignature(len(args), tuple(sorted(kwargs)), tuple(leaves), dynamic_batch)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if len(args) != self.n_args:
            raise InputMismatchError(
                f"compiled model called with {len(args)} positional argument(s), expected "
                f"{self.n_args} (as in example_inputs)"
            )
        if tuple(sorted(kwargs)) != self.kwarg_names:
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
        for i, (leaf, spec) in enumerate(zip(leaves, self.leaves)):
            if spec is None:
                continue
            if not isinstance(leaf, torch.Tensor):
                raise InputMismatchError(
                    f"input {i}: expected a tensor {spec.describe()}, got {type(leaf).__name__}"
                )
            got = TensorSpec(str(leaf.dtype), tuple(leaf.shape), leaf.device.type)
            bad_shape = len(got.shape) != len(spec.shape) or any(
                e is not None and e != g for e, g in zip(spec.shape, got.shape)
            )
            if got.dtype != spec.dtype or got.device != spec.device or bad_shape:
                what = (
                    "dtype"
                    if got.dtype != spec.dtype
                    else "device"
                    if got.device != spec.device
                    else ("rank" if len(got.shape) != len(spec.shape) else "shape")
                )
                hint = " (* is the dynamic batch dimension)" if self.dynamic_batch else ""
                raise InputMismatchError(
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
        self.gm = gm
        self.signature = signature
        self.report = report
        self.pipeline = pipeline
        self.target = target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.signature.check(args, kwargs)
        with torch.no_grad():  # compiled models are for inference: weights are folded constants
            return self.gm(*args, **kwargs)

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
    in_spec = compiled.gm._in_spec  # type: ignore[attr-defined]
    args, kwargs = _example_inputs(sig, in_spec)
    dynamic = _batch_dims(compiled.gm, args, kwargs) if sig.dynamic_batch else None
    try:
        ep = _export(compiled.gm, args, kwargs, dynamic)
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
    gm = ep.module()
    normalize(gm)
    s = meta["signature"]
    sig = InputSignature(
        s["n_args"],
        tuple(s["kwarg_names"]),
        tuple(TensorSpec(d["dtype"], tuple(d["shape"]), d["device"]) for d in s["leaves"]),
        s["dynamic_batch"],
    )
    return CompiledModule(gm, sig, pipeline=meta["pipeline"], target=meta["target"])
