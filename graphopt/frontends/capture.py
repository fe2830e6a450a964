"""Capture a ``torch.nn.Module`` as the graphopt IR (see DESIGN.md, "The IR").

``torch.export.export(model, args, strict=False)`` unlifted with ``.module()``: parameters and
buffers are ``get_attr`` nodes, every value node has ``meta["val"]``, and the batch dimension
(dim 0 of every tensor input) is dynamic unless the model cannot be exported that way, in which
case capture falls back to static shapes and records why in ``gm.meta["graphopt_capture"]``.
"""

from __future__ import annotations

import dataclasses
import os
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from graphopt.errors import CaptureError, first_line
from graphopt.frontends import onnx_import
from graphopt.frontends.exported import (
    StaticShapeWarning,
    TrainModeWarning,
    as_args,
    batch_dims,
    export_program,
    graph_of,
    has_symbolic_batch,
)
from graphopt.frontends.signature import InputSignature
from graphopt.ir.graph import storage_key, written_tensors

aten = torch.ops.aten


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the capture, then restore every submodule's flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# layers whose train() behaviour differs from eval(): batch statistics, dropout
_TRAIN_DIFFERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)


def _warn_if_training(model: torch.nn.Module, name: str) -> None:
    """Say once that a model left in train() mode is captured with its eval-mode behaviour,
    where that changes what it computes (batch norm, dropout); silent otherwise."""
    layers = [n or name for n, m in model.named_modules() if m.training and isinstance(m, _TRAIN_DIFFERS)]  # fmt: skip
    if layers:
        shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
        warnings.warn(
            f"{name} is in train() mode: graphopt optimizes for inference and captured it in eval "
            f"mode, so {shown} use running statistics / no dropout, and the compiled model "
            "differs from this model called in train mode. Call model.eval() first to say so.",
            TrainModeWarning,
            stacklevel=4,
        )


def source_of(model: Any, example_inputs: Any = None) -> tuple[torch.nn.Module, Any]:
    """The one hand-off between frontends: an ONNX file or ``onnx.ModelProto`` becomes its eager
    ``OnnxModule`` (graphopt.frontends.onnx_import), whose example inputs are synthesized from
    the ONNX input types when none are given; a torch module passes through. Anything else is a
    ``CaptureError``."""
    if onnx_import.is_onnx_source(model):
        model = onnx_import.load_onnx(model)
    if example_inputs is None and isinstance(model, onnx_import.OnnxModule):
        example_inputs = model.example_inputs()
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(
            f"graphopt captures torch.nn.Module objects, got {type(model).__name__}; "
            "wrap a function in an nn.Module, or pass the path of an ONNX file"
        )
    return model, example_inputs


def signature_for(args: tuple[Any, ...], kwargs: dict[str, Any], info: dict[str, Any]) -> Any:
    """What the compiled model accepts: dim 0 may vary (dynamic batch) for a torch capture,
    every dim that stayed symbolic for an ONNX import (``info`` is ``gm.meta["graphopt_capture"]``)."""
    if "dynamic_dims" in info:
        return onnx_import.input_signature(args, info)
    return InputSignature.of(args, kwargs, info["dynamic_batch"])


def capture(
    model: Any,
    example_inputs: Any = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    dynamic_batch: bool = True,
) -> GraphModule:
    """Capture ``model`` (in eval mode) as an FX GraphModule of ATen ops.

    ``model`` may also be an ONNX file path or ``onnx.ModelProto`` (graphopt.frontends.onnx_import); its
    example inputs are then optional (synthesized from the ONNX input types)."""
    model, example_inputs = source_of(model, example_inputs)
    if isinstance(model, onnx_import.OnnxModule):
        return onnx_import.capture_onnx(
            model, example_inputs, example_kwargs, dynamic_batch=dynamic_batch
        )
    # every run below works on copies: the user's inputs and buffers are never written
    args, kwargs = pytree.tree_map(_fresh, (as_args(example_inputs), dict(example_kwargs or {})))
    name = type(model).__name__
    _warn_if_training(model, name)
    with eval_mode(model), torch.no_grad():
        eager_out = _run_eagerly(model, *pytree.tree_map(_fresh, (args, kwargs)), name)
        _register_output_dataclasses(eager_out)
        info: dict[str, Any] = {
            "dynamic_batch": False,
            "static_reason": None,
            "torch": torch.__version__,
        }
        ep = None
        if dynamic_batch:
            # export specializes size-1 dims, so a batch-1 example is traced at batch 2
            wide_args, wide_kwargs = pytree.tree_map(_widen_batch, (args, kwargs))
            try:
                dims = batch_dims(model, wide_args, wide_kwargs)
                ep = export_program(model, wide_args, wide_kwargs, dims)
                info["dynamic_batch"] = True
            except Exception as exc:
                info["static_reason"] = f"{type(exc).__name__}: {first_line(exc)}"
        else:
            info["static_reason"] = "dynamic_batch=False"
        if ep is None:
            # Fresh tensors: a failed dynamic export leaves dynamic-dim marks on its inputs.
            args, kwargs = pytree.tree_map(_fresh, (args, kwargs))
            try:
                ep = export_program(model, args, kwargs, None)
            except Exception as exc:
                raise CaptureError(
                    f"torch.export could not capture {name}: {type(exc).__name__}: "
                    f"{first_line(exc)}{_user_frame(exc)}. Make that code traceable "
                    "(no Python control flow on tensor values, no unsupported ops), or "
                    "capture a submodule that is"
                ) from None
            if dynamic_batch:
                warnings.warn(
                    f"{name}: the batch dimension cannot be dynamic ({info['static_reason']}); "
                    "captured with static shapes, so the compiled model accepts only the "
                    "example's shapes",
                    StaticShapeWarning,
                    stacklevel=3,
                )
    gm = graph_of(ep, name)
    info["dynamic_batch"] = info["dynamic_batch"] and has_symbolic_batch(gm)
    gm.meta["graphopt_capture"] = info
    return gm


def _run_eagerly(
    model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], name: str
) -> Any:
    """Run the user's model once (to report a failing model before graphopt did anything) on
    copies of its buffers, with a guard that refuses writes into its parameters."""
    buffers = {k: b.clone() for k, b in model.named_buffers(remove_duplicate=False)}
    try:
        with _ParameterGuard(model, name):
            return torch.func.functional_call(model, buffers, args, kwargs, strict=False)
    except CaptureError:
        raise
    except Exception as exc:  # the user's model fails before graphopt did anything
        raise CaptureError(
            f"{name}(*example_inputs) fails when run eagerly: {type(exc).__name__}: "
            f"{first_line(exc)}{_user_frame(exc)}. Check that example_inputs match the "
            "model's forward() signature, shapes and dtypes"
        ) from exc


class _ParameterGuard(TorchDispatchMode):
    """Refuses, before it happens, any in-place write into one of the model's parameters:
    graphopt folds parameters as constants, and compile never changes the user's model."""

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.name = name
        keys = {k: storage_key(p) for k, p in model.named_parameters(remove_duplicate=False)}
        self.params = {key: k for k, key in keys.items() if key is not None}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for t in written_tensors(func, args, kwargs):
            key = storage_key(t)
            param = self.params.get(key) if key is not None else None
            if param is not None:
                raise CaptureError(
                    f"{self.name}.forward writes into its parameter {param!r} in place ({func}); "
                    "graphopt treats parameters as constants and never changes the user's "
                    "model. Register it as a buffer if it is state, or write the update out of "
                    "place"
                )
        return func(*args, **kwargs)


def _widen_batch(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == 1:
        return x.repeat(2, *([1] * (x.dim() - 1)))
    return x


def _fresh(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) else x


def _register_output_dataclasses(out: Any) -> None:
    """Let export carry dataclass outputs (HF-style ``ModelOutput`` are registered already)."""
    leaves = [out]
    while leaves:
        x = leaves.pop()
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            cls = type(x)
            if cls not in pytree.SUPPORTED_NODES:
                name = f"{cls.__module__}.{cls.__qualname__}"
                torch.export.register_dataclass(cls, serialized_type_name=name)
            leaves += [getattr(x, f.name) for f in dataclasses.fields(x)]
        elif isinstance(x, (list, tuple)):
            leaves += list(x)
        elif isinstance(x, dict):
            leaves += list(x.values())


_LIB_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _user_frame(exc: BaseException) -> str:
    """' at file:line in func: `code`' for the innermost frame of the user's own code."""
    frames = traceback.extract_tb(exc.__traceback__)
    user = [
        f
        for f in frames
        if not f.filename.startswith(_LIB_DIRS)
        and "site-packages" not in f.filename
        and "<" not in f.filename
    ]
    if not user:
        return _source_from_message(exc)
    f = user[-1]
    return f" (at {f.filename}:{f.lineno} in {f.name}: `{(f.line or '').strip()}`)"


def _source_from_message(exc: BaseException) -> str:
    """torch.export reports the user's source line inside its message; surface it."""
    for line in str(exc).splitlines():
        stripped = line.strip()
        if (
            stripped.startswith("File ")
            and ", line " in stripped
            and "site-packages" not in stripped
        ):
            return f" ({stripped})"
    return ""
