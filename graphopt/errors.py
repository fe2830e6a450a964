"""Every user-facing failure of graphopt is a ``GraphoptError``.

Each message says what went wrong, where (op, node, file) and what to do about it. The exception
is raised ``from None`` wherever a deep library traceback would add nothing to that message; the
original exception stays available as ``__cause__``/``detail`` for debugging.
"""

from __future__ import annotations

from typing import Any


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (at most 300 characters): what a
    graphopt message quotes of a library's error."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__


class GraphoptError(Exception):
    """Base class of every error graphopt raises on purpose."""


class CaptureError(GraphoptError):
    """The model could not be captured as an FX graph of ATen ops."""


class PipelineError(GraphoptError):
    """A pipeline string or pass list is malformed (unknown pass, unknown option, bad order)."""


class InputMismatchError(GraphoptError):
    """A compiled model was called with inputs that do not match the ones it was compiled for."""


class SerializationError(GraphoptError):
    """A saved graphopt model could not be written or read back."""


class OnnxExportError(GraphoptError):
    """An optimized graph could not be written as ONNX (bad argument, path, or translation)."""


class OnnxImportError(GraphoptError):
    """An ONNX model could not be read or imported (missing, corrupt, invalid, or failing)."""


class UnsupportedOpError(OnnxImportError):
    """The ONNX model uses op types graphopt does not import; ``ops`` maps each to node names."""

    def __init__(self, ops: dict[str, list[str]], where: str) -> None:
        self.ops = {k: list(v) for k, v in ops.items()}
        parts = []
        for op, nodes in sorted(self.ops.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            shown = ", ".join(nodes[:3]) + (", ..." if len(nodes) > 3 else "")
            parts.append(f"{op} x{len(nodes)} ({shown})")
        super().__init__(
            f"{where}: {len(self.ops)} unsupported ONNX op type(s): {'; '.join(parts)}. "
            "Re-export the model with standard ops at opset 13-21, rewrite those nodes with "
            "onnx-graphsurgeon, or add a converter: graphopt.frontends.onnx_ops.OPS['OpType'] = fn"
        )


class PassError(GraphoptError):
    """A pass crashed (raised an exception) while rewriting the graph."""


class MutationError(GraphoptError):
    """A graph wrote into a tensor it must not change (a weight, or an input it does not own);
    ``node``, ``op`` and ``target`` say which node wrote into what."""

    def __init__(self, message: str, *, node: str, op: str, target: str) -> None:
        super().__init__(message)
        self.node = node
        self.op = op
        self.target = target


class EquivalenceError(GraphoptError):
    """A pass broke its numerical contract; carries the evidence.

    Attributes: ``pass_name``, ``node`` (the first diverging node of the rewritten graph),
    ``op`` (its target), ``origin`` (the original node it stands for), ``kind`` ("local" when the
    node itself computes a wrong value from correct inputs, "inherited" when its inputs were
    already wrong), and ``metrics`` (the contract's numbers).
    """

    def __init__(
        self,
        message: str,
        *,
        pass_name: str,
        node: str | None = None,
        op: str | None = None,
        origin: str | None = None,
        kind: str | None = None,
        metrics: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.node = node
        self.op = op
        self.origin = origin
        self.kind = kind
        self.metrics = dict(metrics or {})
