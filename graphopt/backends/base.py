"""What a backend is: an engine that runs a verified graph, and how backends are registered.

A backend takes the optimized graph (a :class:`Handoff`: the graph, its flat example inputs and
which of their dims may vary) and builds an :class:`Engine`: a callable that takes the graph's
flat inputs (the user's input leaves in capture order, then the state inputs of a stateful
graph) and returns its flat outputs, plus what ``graphopt.save`` stores to rebuild the engine
without recompiling. ``unavailable`` says why the backend cannot run here at all (a package not
installed, a target it does not serve); ``unsupported`` why it cannot take this graph. Neither
raises: ``auto`` reports the reason in its table and moves on.

    @register_backend
    class MyEngine(Backend):
        name = "my-engine"
        def build(self, handoff, target): ...   # -> Engine
        def load(self, handoff, payload, target): ...
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.fx import GraphModule
from torch.fx.graph import CodeGen

from graphopt.errors import GraphoptError
from graphopt.frontends.signature import InputSignature
from graphopt.ir.graph import attr_path, snapshot
from graphopt.ir.state import STATE, state_placeholders


class BackendError(GraphoptError):
    """A backend asked for by name cannot run here, cannot take the graph, or failed to build."""


@dataclass
class Handoff:
    """What a backend receives: the verified graph and how it is called.

    ``gm`` is the optimized graph as the pipeline left it; ``flat()`` a copy that takes the flat
    inputs positionally and returns a flat tuple. ``example`` are flat example inputs (user
    leaves, then fresh copies of the state); ``dynamic[i]`` the dims of input ``i`` that may
    vary from call to call (the batch dim with a dynamic batch; every symbolic dim of an ONNX
    import); ``n_user`` how many of the inputs are the user's.
    """

    gm: GraphModule
    example: list[Any]
    dynamic: list[tuple[int, ...]]
    n_user: int
    signature: InputSignature | None = None
    _flat: GraphModule | None = field(default=None, repr=False)

    @staticmethod
    def of(gm: GraphModule, user_inputs: Sequence[Any], signature: InputSignature) -> Handoff:
        states = [attr_path(gm, n.meta[STATE]).detach().clone() for n in state_placeholders(gm)]
        example = [*user_inputs, *states]
        dynamic: list[tuple[int, ...]] = []
        for spec in signature.leaves:
            dynamic.append(tuple(i for i, d in enumerate(spec.shape) if d is None) if spec else ())
        dynamic += [()] * len(states)
        return Handoff(gm, example, dynamic, len(user_inputs), signature)

    def flat(self) -> GraphModule:
        """``gm`` with flat inputs and a flat tuple of outputs (weights shared, graph copied)."""
        if self._flat is None:
            flat = snapshot(self.gm)
            flat.graph.set_codegen(CodeGen())
            for name in ("_in_spec", "_out_spec"):
                if name in vars(flat):
                    delattr(flat, name)
            flat.recompile()
            self._flat = flat
        return self._flat


@dataclass
class Engine:
    """A built backend: ``run(*flat_inputs) -> flat outputs``. ``payload()`` returns the files
    ``graphopt.save`` stores so that ``Backend.load`` rebuilds it without recompiling (None:
    the backend rebuilds from the graph alone, as ``aten`` does)."""

    backend: str
    run: Callable[..., Sequence[Any]]
    payload: Callable[[], dict[str, bytes]] | None = None
    detail: str = ""  # what the report shows next to the backend's name (e.g. its providers)


# judge(value, aten value, float64 value) -> (ok, why not): one intermediate value held to the
# pipeline's budget (graphopt.backends.select builds it)
ValueJudge = Callable[[Any, Any, Any], tuple[bool, str]]


class Backend:
    """Base class of every backend (see the module docstring). Subclasses set ``name``."""

    name: ClassVar[str] = ""
    # Python packages the backend needs, checked by ``unavailable`` (import names)
    requires: ClassVar[tuple[str, ...]] = ()

    def unavailable(self, target: str) -> str | None:
        """Why this backend cannot run on ``target`` here at all, or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        if missing:
            return f"{', '.join(missing)} not installed (pip install {' '.join(missing)})"
        return None

    def unsupported(self, handoff: Handoff, target: str) -> str | None:
        """Why this graph cannot run on this backend, or None."""
        return None

    def build(self, handoff: Handoff, target: str) -> Engine:
        raise NotImplementedError

    def load(self, handoff: Handoff, payload: dict[str, bytes], target: str) -> Engine:
        """Rebuild a saved engine from ``payload`` (what ``Engine.payload`` returned)."""
        return self.build(handoff, target)

    def diagnose(self, engine: Engine, handoff: Handoff, judge: ValueJudge) -> str | None:
        """When the engine's outputs broke the budget: where, in the engine's own terms (e.g.
        the first diverging ONNX node), or None. ``judge(value, aten, ref) -> (ok, why)`` holds
        one intermediate value to the pipeline's budget: ``aten`` is the aten backend's value of
        the same FX node of ``handoff.flat()``, ``ref`` its float64 value (``Runner``'s
        reference run of that graph on ``handoff.example``)."""
        return None


_REGISTRY: dict[str, type[Backend]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
AUTO = "auto"


def register_backend(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend usable by name (``compile(..., backend=name)``, the CLI's
    ``--backend``, ``auto``). Re-registering a name replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"register_backend expects a subclass of graphopt.Backend, got {cls!r}")
    if not _NAME.match(cls.name or "") or cls.name == AUTO:
        raise BackendError(
            f"backend class {cls.__name__} has name {cls.name!r}; use a kebab-case name other "
            "than 'auto', such as 'my-engine'"
        )
    _REGISTRY[cls.name] = cls
    return cls


def registered_backends() -> dict[str, type[Backend]]:
    return dict(_REGISTRY)


def backend_named(name: str) -> Backend:
    if name not in _REGISTRY:
        valid = ", ".join([AUTO, *_REGISTRY])
        raise BackendError(f"unknown backend {name!r}; use one of {valid}")
    return _REGISTRY[name]()


def outputs_of(result: Any) -> list[Any]:
    """A flat list of outputs, whatever sequence an engine returned."""
    if isinstance(result, torch.Tensor):
        return [result]
    return list(result)
