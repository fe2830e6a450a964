"""Backends: the engines a verified graph runs on (aten: the graph itself; inductor:
torch.compile; onnxruntime: an ONNX Runtime session), one module each, and ``auto``, which
verifies every available one against the float64 reference and keeps the fastest.

May import: graphopt.errors, graphopt.ir, graphopt.ops, graphopt.kernels, graphopt.frontends,
graphopt.verification, graphopt.export.
"""

from graphopt.backends import (  # noqa: F401  (registers the built-in backends)
    aten,
    inductor,
    onnxruntime,
)
from graphopt.backends.base import (
    AUTO,
    Backend,
    BackendError,
    Engine,
    Handoff,
    register_backend,
    registered_backends,
)

__all__ = [
    "AUTO",
    "Backend",
    "BackendError",
    "Engine",
    "Handoff",
    "register_backend",
    "registered_backends",
]
