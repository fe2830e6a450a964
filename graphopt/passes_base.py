"""What a pass is, how passes are registered by name, and how a pipeline string is parsed.

A pass is a frozen dataclass with a kebab-case ``name``; its fields are its options, so the same
text names it in Python, on the command line and in a bug report::

    cleanup,fold-bn{eps=1e-5},fixpoint(cse,dce)
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from graphopt.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from torch.fx import GraphModule

    from graphopt.pass_manager import PassContext


# -- numerical contracts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Contract:
    """What a pass promises about the function the graph computes (see docs/contracts.md).

    * ``exact``: outputs bitwise equal to the outputs before the pass.
    * ``rounding``: error against the float64 reference at most
      ``max(2 x error before the pass, floor(dtype))``. ``dtype`` (optional) names the dtype
      the graph computes in when it differs from the outputs' (fp16 inside, fp32 returned):
      the floor is then the larger of the two dtypes' floors.
    * ``lossy``: the user's budget on one metric (``cosine`` >= t, ``sqnr`` >= t dB,
      ``rel_error`` <= t, ``top1`` >= t), judged against the float64 reference.
    """

    kind: str
    metric: str | None = None
    threshold: float | None = None
    dtype: str | None = None  # rounding: the compute dtype, e.g. "float16" (a string: hashable)

    @staticmethod
    def exact() -> Contract:
        return Contract("exact")

    @staticmethod
    def rounding(dtype: torch.dtype | str | None = None) -> Contract:
        """``dtype``: a floating ``torch.dtype`` (or its name) the graph computes in."""
        if dtype is None:
            return Contract("rounding")
        name = str(dtype).removeprefix("torch.")
        if name not in ROUNDING_DTYPES:
            raise PipelineError(
                f"Contract.rounding(dtype={dtype!r}): use one of {', '.join(ROUNDING_DTYPES)}"
            )
        return Contract("rounding", dtype=name)

    @staticmethod
    def lossy(metric: str, threshold: float) -> Contract:
        if metric not in LOSSY_METRICS:
            raise PipelineError(
                f"unknown lossy metric {metric!r}; use one of {', '.join(sorted(LOSSY_METRICS))}"
            )
        return Contract("lossy", metric, float(threshold))

    def __str__(self) -> str:
        if self.kind == "lossy":
            return f"lossy({self.metric}={self.threshold:g})"
        return f"{self.kind}({self.dtype})" if self.dtype else self.kind


# metric -> True when larger is better
LOSSY_METRICS = {"cosine": True, "sqnr": True, "top1": True, "rel_error": False}
# compute dtypes a rounding contract may name (the floors are graphopt.metrics.ROUNDING_FLOOR)
ROUNDING_DTYPES = ("float16", "bfloat16", "float32", "float64")


# -- passes -------------------------------------------------------------------------------------


@dataclass
class PassResult:
    changed: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Pass:
    """Base class of every rewrite pass.

    Subclasses are frozen dataclasses that set ``name`` (kebab-case) and ``contract`` and
    implement ``run(gm, ctx)``. Ordering constraints are class-level: ``runs_before`` names passes
    that must come later in a pipeline, ``runs_after`` passes that must come earlier.
    """

    name: ClassVar[str] = ""
    contract: ClassVar[Contract] = Contract.exact()
    runs_before: ClassVar[tuple[str, ...]] = ()
    runs_after: ClassVar[tuple[str, ...]] = ()

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


PipelineItem = Pass | FixedPoint

_REGISTRY: dict[str, type[Pass]] = {}
_GROUPS: dict[str, str] = {}
_KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass usable by name in pipelines. Re-registering replaces."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)):
        raise PipelineError(f"register_pass expects a subclass of graphopt.Pass, got {cls!r}")
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
    _load_builtin_passes()
    return dict(_REGISTRY)


def _load_builtin_passes() -> None:
    import graphopt.passes  # noqa: F401  (registers the built-in passes)


# -- default pipelines: the one place they are written down --------------------------------------

_FUSE = "fuse-epilogue,fuse-kernels,fuse-pointwise{max_ops=%d},cleanup"
_PREPARE = "cleanup,fold-bn,patterns,cleanup"

OPT_LEVELS: dict[str, str] = {
    "-O0": "",
    "-O1": "cleanup,fold-bn,cleanup",
    # -O2: recognize decomposed patterns, then fuse (each fusion kept only where it measures
    # faster on the target), then clean up what fusion left behind.
    "-O2": f"{_PREPARE},{_FUSE % 32}",
    # -O3: as -O2 with larger generated kernels.
    "-O3": f"{_PREPARE},{_FUSE % 64}",
}


def half_pipeline(level: str, dtype: str, min_cosine: float | None = None) -> str:
    """``level`` with ``precision{dtype=...}`` placed where it must go: after batch norms are
    folded and patterns recognized in fp32, before fusion (fused programs are opaque to it).
    ``min_cosine`` judges the half model by cosine instead of the dtype's rounding floor (deep
    models such as 12-layer BERT exceed the fp16 floor; see docs/precision.md)."""
    if level not in ("-O2", "-O3"):
        raise PipelineError(f"half_pipeline takes -O2 or -O3, got {level!r}")
    fuse = _FUSE % (32 if level == "-O2" else 64)
    budget = f",min_cosine={min_cosine}" if min_cosine is not None else ""
    return f"{_PREPARE},precision{{dtype={dtype}{budget}}},{fuse}"


# -- parsing --------------------------------------------------------------------------------------


def parse_pipeline(pipeline: str | Sequence[PipelineItem | str]) -> list[PipelineItem]:
    """Turn a pipeline string, an -O level, or a list of passes/strings into pass objects."""
    _load_builtin_passes()
    if isinstance(pipeline, str):
        text = OPT_LEVELS.get(pipeline.strip(), pipeline)
        items = _Parser(text).parse_list(end=None)
    else:
        items = []
        for item in pipeline:
            if isinstance(item, (Pass, FixedPoint)):
                items.append(item)
            elif isinstance(item, str):
                items += parse_pipeline(item)
            else:
                raise PipelineError(
                    f"pipeline item {item!r} is neither a pass object nor a pipeline string"
                )
    check_order(items)
    return items


def flatten(items: Sequence[PipelineItem]) -> list[Pass]:
    out: list[Pass] = []
    for item in items:
        out += list(item.passes) if isinstance(item, FixedPoint) else [item]
    return out


def check_order(items: Sequence[PipelineItem]) -> None:
    passes = flatten(items)
    names = [p.name for p in passes]
    for i, p in enumerate(passes):
        for later in p.runs_before:
            if later in names[:i]:
                raise PipelineError(
                    f"pass {p.name!r} must run before {later!r}, but the pipeline "
                    f"'{','.join(names)}' has {later!r} first; move {p.name!r} earlier"
                )
        for earlier in p.runs_after:
            if earlier in names[i + 1 :]:
                raise PipelineError(
                    f"pass {p.name!r} must run after {earlier!r}, but the pipeline "
                    f"'{','.join(names)}' has {earlier!r} later; move {p.name!r} after it"
                )


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
            f"option {key}={raw!r} of pass {pass_name!r} is not a valid {typ}"
        ) from None
    return raw


class _Parser:
    """``item (',' item)*`` where item is ``name``, ``name{k=v,...}`` or ``fixpoint(items)``."""

    _TOKEN = re.compile(r"\s*([A-Za-z0-9_\-.+:]+|[{}(),=])")

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[str] = []
        self.columns: list[int] = []  # 1-based column of each token, for error messages
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = self._TOKEN.match(text, pos)
            if not m:
                column = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
                raise PipelineError(
                    f"pipeline {text!r}: cannot read {text[column - 1 : column + 9]!r} at "
                    f"column {column}; a pipeline is pass names separated by ',', options as "
                    "name{key=value,...}"
                )
            self.tokens.append(m.group(1))
            self.columns.append(m.start(1) + 1)
            pos = m.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def _where(self) -> str:
        if self.i >= len(self.tokens):
            return f"end of text at column {len(self.text.rstrip()) + 1}"
        return f"{self.tokens[self.i]!r} at column {self.columns[self.i]}"

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        punctuation = tok is not None and tok in "{}(),=" and expected is None
        if tok is None or punctuation or (expected is not None and tok != expected):
            want = f"{expected!r}" if expected else "a pass name"
            raise PipelineError(f"pipeline {self.text!r}: expected {want}, got {self._where()}")
        self.i += 1
        return tok

    def parse_list(self, end: str | None) -> list[PipelineItem]:
        """Items separated by ',' up to ``end`` (None: the end of the text). Anything else
        after an item is an error: nothing the user wrote is silently dropped."""
        items: list[PipelineItem] = []
        if self.peek() == end:
            return items
        while True:
            items += self.parse_item()
            if self.peek() == ",":
                self.take(",")
                continue
            if self.peek() != end:
                closing = "the end of the pipeline" if end is None else repr(end)
                raise PipelineError(
                    f"pipeline {self.text!r}: unexpected {self._where()}; separate passes "
                    f"with ',' (expected ',' or {closing})"
                )
            return items

    def parse_item(self) -> list[PipelineItem]:
        name = self.take()
        if name == "fixpoint":
            self.take("(")
            inner = self.parse_list(end=")")
            self.take(")")
            return [FixedPoint(tuple(flatten(inner)))]
        if name in OPT_LEVELS:  # "-O2,int8{...}": a level expands in place
            return _Parser(OPT_LEVELS[name]).parse_list(None) if OPT_LEVELS[name] else []
        if name in _GROUPS:
            group = FixedPoint(tuple(flatten(_Parser(_GROUPS[name]).parse_list(None))), name=name)
            return [group]
        options: dict[str, str] = {}
        if self.peek() == "{":
            self.take("{")
            while self.peek() != "}":
                key = self.take()
                self.take("=")
                options[key] = self.take()
                if self.peek() == ",":
                    self.take(",")
                elif self.peek() != "}":
                    raise PipelineError(
                        f"pipeline {self.text!r}: unexpected {self._where()} in the options of "
                        f"{name!r}; separate options with ',' and close them with '}}'"
                    )
            self.take("}")
        return [make_pass(name, options)]
