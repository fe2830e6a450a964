"""graphopt: a verified graph optimizer for neural networks.

compiled = graphopt.compile(model, (x,))     # capture, optimize, verify every pass
compiled(x)                                   # behaves like model(x)
graphopt.save(compiled, "m.graphopt"); graphopt.load("m.graphopt")
"""

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt.*, needed to load saved models)
import graphopt.passes  # noqa: F401  (registers the built-in passes by name)
from graphopt.api import compile
from graphopt.backends import Backend, BackendError, Engine, Handoff, register_backend
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
from graphopt.export.onnx import export_onnx
from graphopt.frontends.capture import capture
from graphopt.frontends.exported import StaticShapeWarning, TrainModeWarning
from graphopt.frontends.onnx_import import OnnxModule, load_onnx
from graphopt.ir.graph import format_graph, propagate_meta
from graphopt.ir.rewriter import Rewriter, apply_rules
from graphopt.ir.rules import Call, Const, Match, Rule
from graphopt.pipeline.manager import EquivalenceWarning, PassManager
from graphopt.pipeline.parse import OPT_LEVELS, parse_pipeline
from graphopt.pipeline.passes import (
    FixedPoint,
    Pass,
    PassContext,
    PassResult,
    RulePass,
    option,
    register_group,
    register_pass,
    registered_passes,
)
from graphopt.pipeline.report import Report
from graphopt.runtime.compiled import CompiledModule, load, save
from graphopt.runtime.recover import recover
from graphopt.verification.contracts import Contract

__all__ = [
    "Backend",
    "BackendError",
    "Engine",
    "Handoff",
    "register_backend",
    "Call",
    "Const",
    "Match",
    "Rule",
    "RulePass",
    "option",
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
    "TrainModeWarning",
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
