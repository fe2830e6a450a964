"""The ONNX modes, all on the CPU: ONNX Runtime on the model as ``torch.onnx.export`` writes it,
graphopt on the graph imported from that file, and ONNX Runtime on graphopt's own export."""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt.tools.bench.mode import Mode, ModeUnavailable, Runner, Setup

# The original ONNX file of the setup measured now, so that every ONNX mode starts from one export.
_ORIGINAL_ONNX: dict[int, tuple[Setup, Path]] = {}


def onnxruntime(s: Setup) -> Runner:
    """ONNX Runtime on the original ONNX file."""
    return _ort_runner(_original_onnx(s))


def graphopt_onnx(pipeline: str) -> Mode:
    """graphopt on the graph imported from the original ONNX file."""

    def make(s: Setup) -> Runner:
        path = _original_onnx(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(str(path), s.inputs, pipeline=pipeline)

    return make


def ort_on_export(build: Mode) -> Mode:
    """ONNX Runtime on graphopt's export (graphopt.export_onnx) of what ``build`` compiles."""

    def make(s: Setup) -> Runner:
        if s.device != "cpu":
            raise ModeUnavailable("the ONNX modes are measured on the CPU only")
        compiled = build(s)
        path = Path(tempfile.mkdtemp(prefix="graphopt-bench-")) / "graphopt.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            graphopt.export_onnx(compiled, path)
        return _ort_runner(path)

    return make


def _original_onnx(s: Setup) -> Path:
    """The model as torch.onnx.export writes it (TorchScript exporter, symbolic batch; the
    dynamo exporter where TorchScript cannot trace the model), once per setup: the ONNX modes
    all start from this one file."""
    if s.device != "cpu":
        raise ModeUnavailable("the ONNX modes are measured on the CPU only (no onnxruntime-gpu)")
    cached = _ORIGINAL_ONNX.get(id(s))
    if cached is not None and cached[0] is s:
        return cached[1]
    path = Path(tempfile.mkdtemp(prefix="graphopt-bench-")) / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        names = [f"input_{i}" for i in range(len(pytree.tree_leaves(s.inputs)))]
        dynamic = {n: {0: "batch"} for n in names}
        try:
            torch.onnx.export(
                s.model, s.inputs, str(path), input_names=names, dynamic_axes=dynamic, dynamo=False
            )
        except Exception as exc:
            # transformers 5's models no longer trace with TorchScript ("got multiple values for
            # argument 'use_cache'"): torch.onnx's dynamo exporter (its default since torch 2.9)
            # is what a user gets there
            try:
                torch.onnx.export(
                    s.model, s.inputs, str(path), input_names=names, dynamic_axes=dynamic,
                    dynamo=True,
                )  # fmt: skip
            except Exception as again:
                raise RuntimeError(
                    f"torch.onnx.export failed: TorchScript: {type(exc).__name__}: {exc}; "
                    f"dynamo: {type(again).__name__}: {again}"
                ) from None
    _ORIGINAL_ONNX.clear()  # one model at a time: the previous setup's file is not needed
    _ORIGINAL_ONNX[id(s)] = (s, path)
    return path


def _ort_runner(path: Path) -> Runner:
    try:
        import onnxruntime as ort
    except Exception as exc:
        raise ModeUnavailable(f"onnxruntime not installed ({exc})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle ORT threads otherwise spin and steal the cores from the mode timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]

    def run(*args: Any) -> Any:
        leaves = [a.numpy() for a in pytree.tree_leaves(args)]
        outs = session.run(None, dict(zip(feed_names, leaves)))
        return [torch.from_numpy(o) for o in outs]

    return run
