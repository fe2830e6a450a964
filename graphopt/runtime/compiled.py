"""The module ``graphopt.compile`` returns, its input checks, and saving/loading it."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

from graphopt.backends.base import Engine, Handoff, backend_named
from graphopt.errors import SerializationError, first_line
from graphopt.frontends.exported import batch_dims, export_program, graph_of
from graphopt.frontends.signature import InputSignature, TensorSpec, plain_call
from graphopt.ir.state import StateBinding, StatefulProgram, is_stateful
from graphopt.ops.fused import executable

FORMAT = "graphopt-model/1"


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
        engine: Engine | None = None,
    ) -> None:
        super().__init__()
        self.gm = gm  # the optimized graph: saved, exported and reported
        self._exec = executable(gm)  # the same graph calling graphopt ops without the dispatcher
        # another backend's engine runs the graph through the flat calling convention
        self.engine = engine
        self.backend = engine.backend if engine is not None else "aten"
        # a model that updates buffers or writes inputs: the graph threads them through, and the
        # binding writes them back once per call (its buffers are the graph's own copies)
        flat = engine is not None or is_stateful(gm)
        self._state = StateBinding(gm) if flat else None
        self.signature = signature
        self.report = report
        self.pipeline = pipeline
        self.target = target

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # forward directly while no hook is registered: nn.Module's call machinery costs a few
        # microseconds, which a small model on a fast engine notices
        if (
            self._forward_hooks
            or self._forward_pre_hooks
            or torch.nn.modules.module._global_forward_hooks
            or torch.nn.modules.module._global_forward_pre_hooks
        ):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.signature.check(args, kwargs)
        with torch.no_grad():  # compiled models are for inference: weights are folded constants
            if self._state is not None:
                run = self.engine.run if self.engine is not None else self._exec
                return self._state(run, self.gm, args, kwargs, plain_call(args, kwargs))
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
    path = Path(path)
    if not path.parent.is_dir():
        raise SerializationError(
            f"graphopt.save: the folder {path.parent} does not exist; create it first, or save "
            "somewhere that exists"
        )
    if path.is_dir():
        raise SerializationError(f"graphopt.save: {path} is a folder; give a file path")
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
    dynamic = batch_dims(program, args, kwargs) if sig.dynamic_batch else None
    if isinstance(program, StatefulProgram) and isinstance(dynamic, tuple):
        dynamic = {"args": dynamic}  # its forward(*args, **kwargs)
    try:
        ep = export_program(program, args, kwargs, dynamic)
        buffer = io.BytesIO()
        torch.export.save(ep, buffer)
    except Exception as exc:
        raise SerializationError(
            f"graphopt.save could not serialize the compiled graph: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}. Report this with the pipeline "
            f"{compiled.pipeline!r}"
        ) from None
    payload = compiled.engine.payload() if compiled.engine and compiled.engine.payload else {}
    meta = {
        "format": FORMAT,
        "pipeline": compiled.pipeline,
        "target": compiled.target,
        "backend": compiled.backend,
        "backend_files": sorted(payload),
        "signature": {
            "shared_batch": sig.shared_batch,
            "n_args": sig.n_args,
            "kwarg_names": list(sig.kwarg_names),
            "leaves": [asdict(s) for s in sig.leaves if s is not None],
            "dynamic_batch": sig.dynamic_batch,
            "values": [[i, name, list(v)] for i, name, v in sig.values],
        },
    }
    try:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("graphopt.json", json.dumps(meta, indent=1))
            zf.writestr("program.pt2", buffer.getvalue())
            for name, data in payload.items():  # what the backend rebuilds its engine from
                zf.writestr(f"backend/{name}", data)
    except OSError as exc:
        raise SerializationError(
            f"graphopt.save could not write {path}: {exc.strerror or exc}; check that the "
            "folder is writable and has space"
        ) from None


def load(path: str | Path) -> CompiledModule:
    """Read a model written by :func:`save`; it runs without recompiling."""
    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"graphopt.load: no file at {path}")
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("graphopt.json"))
            program = zf.read("program.pt2")
            payload = {name: zf.read(f"backend/{name}") for name in meta.get("backend_files", [])}
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
    try:
        s = meta["signature"]
        sig = InputSignature(
            s["n_args"],
            tuple(s["kwarg_names"]),
            tuple(TensorSpec(d["dtype"], tuple(d["shape"]), d["device"]) for d in s["leaves"]),
            s["dynamic_batch"],
            s.get("shared_batch", False),
            tuple((int(i), name, tuple(v)) for i, name, v in s.get("values", [])),
        )
        pipeline, target = meta["pipeline"], meta["target"]
    except (KeyError, TypeError) as exc:
        missing = f"has no {exc}" if isinstance(exc, KeyError) else f"is malformed ({exc})"
        raise SerializationError(
            f"graphopt.load: the metadata (graphopt.json) of {path} {missing}; the file was not "
            "written by graphopt.save or was edited: recompile the model and save it again"
        ) from None
    engine = _load_engine(gm, sig, meta, payload, path)
    return CompiledModule(gm, sig, pipeline=pipeline, target=target, engine=engine)


def _load_engine(
    gm: GraphModule,
    sig: InputSignature,
    meta: dict[str, Any],
    payload: dict[str, bytes],
    path: Path,
) -> Engine | None:
    """The saved backend's engine, rebuilt from what it stored (no recompiling)."""
    name = meta.get("backend", "aten")
    if name == "aten":
        return None
    backend = backend_named(name)
    why = backend.unavailable(meta["target"])
    if why is not None:
        raise SerializationError(
            f"graphopt.load: {path} runs on backend {name!r}, which is unavailable here ({why}); "
            "install it, or recompile the model with another backend"
        )
    leaves = pytree.tree_leaves(_example_inputs(sig, StateBinding(gm).in_spec))
    try:
        return backend.load(Handoff.of(gm, leaves, sig), payload, meta["target"])
    except Exception as exc:
        raise SerializationError(
            f"graphopt.load: could not rebuild the {name!r} engine of {path} "
            f"({type(exc).__name__}: {first_line(exc)}); recompile the model and save it again"
        ) from None
