"""What a pass is and how passes are registered by name.

A pass is a frozen dataclass with a kebab-case ``name``; its fields are its options, so the same
text names it in Python, on the command line and in a bug report::

    cleanup,fold-bn{eps=1e-5},fixpoint(cse,dce)

The built-in passes (``graphopt.passes``) register themselves when ``graphopt`` is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch.fx import GraphModule

from graphopt.errors import PipelineError
from graphopt.ir.rewriter import RewriteBudget, Rewriter
from graphopt.ir.rules import Judge, Rule
from graphopt.verification.contracts import Contract


@dataclass
class PassContext:
    """What a running pass may know: its name, the target, the engine, and its rewriter."""

    target: str = "cpu"
    # the backend the optimized graph will run on ("aten": graphopt's own executor, which a
    # pass may time; another engine compiles the graph its own way, and is timed whole)
    engine: str = "aten"
    budget: RewriteBudget = field(default_factory=RewriteBudget)
    pass_name: str = ""
    rewriters: list[Rewriter] = field(default_factory=list)
    inputs: list[Any] = field(default_factory=list)  # the example inputs, flat
    # the calibration batches, each flat like ``inputs``: a stream, read once and batch by batch
    # (the pass manager refuses a second read); None: the example inputs are the only batch
    calibration: Iterable[list[Any]] | None = None

    def rewriter(self, gm: GraphModule) -> Rewriter:
        rw = Rewriter(gm, self.pass_name, self.budget)
        self.rewriters.append(rw)
        return rw


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


def option(
    default: Any,
    *,
    choices: Sequence[Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> Any:
    """A pass option with the values it allows, checked whenever the pass is made (from pipeline
    text or in Python): ``calib: str = option("percentile", choices=OBSERVERS)``,
    ``amount: float = option(0.5, low=0.0, high=1.0, high_open=True)``."""
    rules = {"choices": tuple(choices) if choices is not None else None, "range": (low, high)}
    rules["high_open"] = high_open
    return field(default=default, metadata={"graphopt_option": rules})


@dataclass(frozen=True)
class Pass:
    """Base class of every rewrite pass.

    Subclasses are frozen dataclasses that set ``name`` (kebab-case) and ``contract`` and
    implement ``run(gm, ctx)``. Ordering constraints are class-level: ``runs_before`` names passes
    that must come later in a pipeline, ``runs_after`` passes that must come earlier. Options
    declared with :func:`option` are checked when the pass is made; ``check()`` adds rules that
    involve several options. ``followed_by()`` names passes the pipeline runs right after this
    one (``int8`` is followed by ``lower-int8``).
    """

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.exact()
    runs_before: ClassVar[tuple[str, ...]] = ()
    runs_after: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            rules = f.metadata.get("graphopt_option")
            if rules is not None:
                _check_option(self, f.name, getattr(self, f.name), rules)
        self.check()

    def check(self) -> None:
        """Raise ``PipelineError`` for option values that are wrong together (or that
        :func:`option` cannot express); called when the pass is made."""

    def followed_by(self) -> tuple[Pass, ...]:
        """Passes that must run right after this one; the pipeline schedules them."""
        return ()

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def contract_for(self) -> Contract:
        """The contract of this configured pass (lossy passes take their budget from options)."""
        return self.contract

    def spec(self) -> str:
        """The pipeline text that rebuilds this pass, options included."""
        opts = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return self.name + (f"{{{','.join(opts)}}}" if opts else "")


@dataclass(frozen=True)
class FixedPoint:
    """Run ``passes`` in order, again and again, until none changes the graph (or ``max_iters``)."""

    passes: tuple[Pass, ...]
    max_iters: int = 8
    name: str = "fixpoint"

    def spec(self) -> str:
        if self.name != "fixpoint":
            return self.name
        return "fixpoint(" + ",".join(p.spec() for p in self.passes) + ")"


@dataclass(frozen=True)
class RulePass(Pass):
    """A pass that is a table of rules: the rewriter drives ``rules`` over the graph once
    (``Rewriter.apply``), and ``stat`` names the number of matches applied in the pass's
    statistics. ``judge()`` may veto matches (the fusion passes keep only what measures faster);
    ``logged = False`` keeps a pass's rules out of the report's "why (not) fused" table.

    A subclass is data: its name, contract, options and rule table; it writes no ``run``.
    """

    rules: ClassVar[Sequence[Rule]] = ()
    stat: ClassVar[str] = "rewrites"
    logged: ClassVar[bool] = True

    def judge(self) -> Judge | None:
        """Who decides whether a match is applied (None: every match is)."""
        return None

    def run(self, gm: GraphModule, ctx: PassContext) -> PassResult:
        rw = ctx.rewriter(gm)
        applied = rw.apply(self.rules, keep=self.judge(), log=self.logged)
        return PassResult(rw.rewrites > 0, {self.stat: applied})


PipelineItem = Pass | FixedPoint

_REGISTRY: dict[str, type[Pass]] = {}
_GROUPS: dict[str, str] = {}
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def _check_option(p: Pass, key: str, value: Any, rules: dict[str, Any]) -> None:
    where = f"{p.name}{{{key}={value}}}"
    choices = rules["choices"]
    if choices is not None and value not in choices:
        raise PipelineError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    low, high = rules["range"]
    too_low = low is not None and value < low
    too_high = high is not None and (value >= high if rules["high_open"] else value > high)
    if too_low or too_high:
        if low is not None and high is not None:
            bound = f"in [{low:g}, {high:g}{')' if rules['high_open'] else ']'}"
        else:
            bound = (
                f">= {low:g}"
                if low is not None
                else f"{'<' if rules['high_open'] else '<='} {high:g}"
            )
        raise PipelineError(f"{where}: {key} must be {bound}")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass usable by name in pipelines. Re-registering replaces."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"register_pass expects a subclass of graphopt.Pass, got {cls!r}")
    if isinstance(cls.contract, str):  # contract = "exact": the name stands for the contract
        cls.contract = Contract.parse(cls.contract, where=f"pass {cls.name!r}")
    elif not isinstance(cls.contract, Contract):
        raise PipelineError(
            f"pass {cls.name!r} has contract {cls.contract!r}; use a graphopt.Contract "
            "(Contract.exact(), Contract.rounding(), Contract.lossy('cosine', 0.99)) or its "
            "name ('exact', 'rounding', 'lossy(cosine=0.99)')"
        )
    if not _KEBAB.match(cls.name or ""):
        raise PipelineError(
            f"pass class {cls.__name__} has name {cls.name!r}; a pass name must be kebab-case "
            "such as 'fold-bn'"
        )
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise PipelineError(
            f"pass {cls.name!r} must be a frozen dataclass (@dataclass(frozen=True))"
        )
    _REGISTRY[cls.name] = cls
    return cls


def register_group(name: str, pipeline: str) -> None:
    """Name a sub-pipeline (e.g. ``cleanup``) so it can be used like a pass."""
    _GROUPS[name] = pipeline


def registered_passes() -> dict[str, type[Pass]]:
    return dict(_REGISTRY)


def groups() -> dict[str, str]:
    """Named sub-pipelines (``cleanup``, ``patterns``): name -> pipeline text."""
    return dict(_GROUPS)


def _unknown(kind: str, name: str, valid: Sequence[str]) -> PipelineError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return PipelineError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(sorted(valid))}")


def make_pass(name: str, options: dict[str, str]) -> Pass:
    if name not in _REGISTRY:
        raise _unknown("pass", name, list(_REGISTRY) + list(_GROUPS) + ["fixpoint"])
    cls = _REGISTRY[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        if key not in fields:
            valid = list(fields) or ["(this pass takes no options)"]
            raise PipelineError(
                f"pass {name!r} has no option {key!r}. Valid options: {', '.join(valid)}"
            )
        kwargs[key] = _convert(name, key, raw, fields[key])
    return cls(**kwargs)


def _convert(pass_name: str, key: str, raw: str, f: dataclasses.Field[Any]) -> Any:
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if "bool" in typ:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if "int" in typ and "float" not in typ:
            return int(raw)
        if "float" in typ:
            return float(raw)
    except ValueError:
        raise PipelineError(
            f"{pass_name}{{{key}={raw}}}: {raw!r} is not a valid {typ} (option {key} of pass "
            f"{pass_name!r})"
        ) from None
    return raw
