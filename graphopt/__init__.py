"""graphopt: a verified graph optimizer for neural networks.

compiled = graphopt.compile(model, (x,))     # capture, optimize, verify every pass
compiled(x)                                   # behaves like model(x)
graphopt.save(compiled, "m.graphopt"); graphopt.load("m.graphopt")
"""

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt.*, needed to load saved models)
from graphopt.api import compile
from graphopt.capture import StaticShapeWarning, capture
from graphopt.compiled import CompiledModule, load, save
from graphopt.errors import (
    CaptureError,
    EquivalenceError,
    GraphoptError,
    InputMismatchError,
    OnnxExportError,
    OnnxImportError,
    PassError,
    PipelineError,
    SerializationError,
    UnsupportedOpError,
)
from graphopt.ir import format_graph, propagate_meta
from graphopt.onnx_export import export_onnx
from graphopt.onnx_import import OnnxModule, load_onnx
from graphopt.pass_manager import EquivalenceWarning, PassContext, PassManager, Report
from graphopt.passes_base import (
    OPT_LEVELS,
    Contract,
    FixedPoint,
    Pass,
    PassResult,
    parse_pipeline,
    register_group,
    register_pass,
    registered_passes,
)
from graphopt.recover import recover
from graphopt.rewriter import Rewriter, apply_rules

__all__ = [
    "CaptureError",
    "CompiledModule",
    "Contract",
    "EquivalenceError",
    "EquivalenceWarning",
    "FixedPoint",
    "GraphoptError",
    "InputMismatchError",
    "OnnxExportError",
    "OnnxImportError",
    "OnnxModule",
    "OPT_LEVELS",
    "Pass",
    "PassContext",
    "PassError",
    "PassManager",
    "PassResult",
    "PipelineError",
    "Report",
    "Rewriter",
    "SerializationError",
    "StaticShapeWarning",
    "UnsupportedOpError",
    "apply_rules",
    "export_onnx",
    "capture",
    "compile",
    "format_graph",
    "load",
    "load_onnx",
    "parse_pipeline",
    "propagate_meta",
    "recover",
    "register_group",
    "register_pass",
    "registered_passes",
    "save",
]

__version__ = "0.1.0"
