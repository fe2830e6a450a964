"""Pipeline text: the default pipelines (-O0..-O3, the one place they are written down) and the
parser that turns ``cleanup,fold-bn,int8{calib=mse}`` into pass objects. The text is read whole:
whatever the parser does not consume is a ``PipelineError`` naming it and its column."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from graphopt.errors import PipelineError
from graphopt.pipeline.passes import FixedPoint, Pass, PipelineItem, groups, make_pass

# -- default pipelines ----------------------------------------------------------------------------

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
    if isinstance(pipeline, str):
        text = OPT_LEVELS.get(pipeline.strip(), pipeline)
        items = _Parser(text).parse_list(end=None)
    elif not isinstance(pipeline, Sequence):
        raise PipelineError(
            f"pipeline={pipeline!r} ({type(pipeline).__name__}); give a pipeline string "
            "('-O1', 'cleanup,fold-bn'), or a list of passes and pipeline strings ('' or []: "
            "no passes)"
        )
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
    items = place(schedule(items))
    check_order(items)
    return items


def place(items: Sequence[PipelineItem]) -> list[PipelineItem]:
    """Move each pass written after a pass it must run before (``runs_before``) to just before
    the first of those, where its own ``runs_after`` still holds. ``-O2,precision{dtype=bf16}``
    becomes ``cleanup,fold-bn,patterns,cleanup,precision{dtype=bf16},fuse-epilogue,...``: half
    precision after batch norms are folded and patterns recognized, before fusion (what
    ``half_pipeline`` writes out). A pass that cannot be placed so stays where it is, and
    ``check_order`` says why."""
    out = list(items)
    for p in [item for item in items if isinstance(item, Pass) and item.runs_before]:
        at = next(k for k, item in enumerate(out) if item is p)
        first = next(
            (k for k, item in enumerate(out[:at]) if _names(item) & set(p.runs_before)), None
        )
        if first is None:
            continue
        passed_over = set().union(*(_names(item) for item in out[first:at]))
        if passed_over & set(p.runs_after):
            continue
        out.insert(first, out.pop(at))
    return out


def _names(item: PipelineItem) -> set[str]:
    return {q.name for q in flatten([item])}


def schedule(items: Sequence[PipelineItem]) -> list[PipelineItem]:
    """Insert after each pass what it declares it must be followed by (``Pass.followed_by``),
    unless the pipeline already has exactly that there (``int8,lower-int8``, as a compiled
    model's pipeline text spells it, stays as written)."""
    out: list[PipelineItem] = []
    for i, item in enumerate(items):
        if isinstance(item, FixedPoint):
            out.append(dataclasses.replace(item, passes=tuple(schedule(item.passes))))  # type: ignore[arg-type]
            continue
        out.append(item)
        chain = _followers(item)
        if list(items[i + 1 : i + 1 + len(chain)]) != chain:
            out += chain
    return out


def _followers(p: Pass) -> list[Pass]:
    chain: list[Pass] = []
    for follower in p.followed_by():
        chain += [follower, *_followers(follower)]
    return chain


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
        if name in groups():
            group = FixedPoint(tuple(flatten(_Parser(groups()[name]).parse_list(None))), name=name)
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
