"""Independent references for the ONNX tests: ONNX Runtime on a file, and the torch model in
float64. graphopt plays no part in either."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils import _pytree as pytree


def ort_run(model: onnx.ModelProto | Path | str, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """ONNX Runtime (CPU) on ``model``; inputs fed in the file's input order."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(np.asarray(y)) for y in session.run(None, feeds)]


def float64_run(model: nn.Module, inputs: tuple[Any, ...]) -> list[torch.Tensor]:
    """The original model run eagerly in float64 (a copy; the model is not touched)."""
    wide = copy.deepcopy(model).double().eval()
    args = [t.double() if t.is_floating_point() else t for t in inputs]
    with torch.no_grad():
        return [t for t in pytree.tree_leaves(wide(*args)) if isinstance(t, torch.Tensor)]
