"""The repro minimizer of ``graphopt debug bisect --repro DIR``.

From the graph that the breaking pass received, it cuts the smallest subgraph on which that one
pass still fails *the same way*, and writes ``DIR/repro.py`` (a standalone script that rebuilds
the subgraph node by node and runs the pass through ``graphopt.PassManager``) and
``DIR/tensors.pt`` (the subgraph's weights and the recorded values of its inputs). A pass that
calibrates (``int8``) gets, in every candidate and in the script, the calibration data the
subgraph would have seen: the values its inputs take on each calibration batch of the full run,
recorded once and saved with the rest.

The failure's signature is held fixed while shrinking: the pass, the error type, the failing
node's op, the node of the received graph it stands for (names are kept), the contract's metric
and the rule of the culprit rewrite. A candidate subgraph that fails differently, or not at all,
is rejected, so the minimizer can neither drift to another failure nor shrink to nothing.

1. Grow: nodes within distance r (producers and users) of the failing node and the nodes the
   culprit rewrite replaced, r = 0, 1, 2, ... until the signature reproduces.
2. Shrink: delta debugging, removing chunks of halving size, then single nodes, while the
   signature still reproduces (never the failing node itself). A removed producer becomes an
   input of the subgraph, fed the value it had in the full run.
3. Budget: the smallest ``max_rewrites`` that still reproduces on the final subgraph.

The script imports the failing pass's class by ``module:qualname`` (adding the module's import
root to ``sys.path`` when it is not part of graphopt), so a user pass defined in any importable
module works; a class defined inside a function cannot be imported and is refused.
"""

from __future__ import annotations

import dataclasses
import keyword
import operator
import runpy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule, Node

from graphopt.errors import EquivalenceError, GraphoptError
from graphopt.ir.graph import attr_path, propagate_meta
from graphopt.pipeline.manager import PassManager
from graphopt.pipeline.passes import Pass
from graphopt.verification.interpreter import native_run

if TYPE_CHECKING:
    from graphopt.tools.verdict import Trial, Verdict

MAX_ATTEMPTS = 400  # candidate subgraphs tried before settling for the smallest found so far


@dataclass(frozen=True)
class Signature:
    """What makes two failures the same failure (None: not part of this failure)."""

    pass_name: str
    error: str
    op: str | None
    node: str | None  # the node of the received graph the failing node stands for
    metric: str | None
    rule: str | None


@dataclass
class Written:
    script: Path
    tensors: Path
    nodes: int  # compute nodes in the subgraph
    max_rewrites: int
    signature: Signature


# -- subgraphs ------------------------------------------------------------------------------------


@dataclass
class Subgraph:
    gm: GraphModule
    inputs: list[Any]
    weights: dict[str, torch.Tensor]
    sources: list[str]  # the node of the full graph each input stands for

    def batches(self, recorded: Sequence[dict[str, Any]]) -> list[list[Any]]:
        """This subgraph's calibration batches: its inputs' values on each recorded batch."""
        return [[values[name] for name in self.sources] for values in recorded]


def _closed(gm: GraphModule, keep: set[str], values: dict[str, Any]) -> set[str]:
    """``keep`` plus the producers whose values cannot be a subgraph input (tuples, sizes)."""
    keep = set(keep)
    changed = True
    while changed:
        changed = False
        for node in gm.graph.nodes:
            if node.name not in keep:
                continue
            for inp in node.all_input_nodes:
                if inp.op == "call_function" and inp.name not in keep:
                    if not isinstance(values.get(inp.name), torch.Tensor):
                        keep.add(inp.name)
                        changed = True
    return keep


def extract(gm: GraphModule, keep: set[str], values: dict[str, Any]) -> Subgraph:
    """The subgraph of ``gm`` made of the call nodes named in ``keep``, names unchanged. Its
    inputs are the values it reads from outside (recorded in ``values``), its weights the
    tensors it reads, its outputs every kept node that something outside the subgraph uses."""
    keep = _closed(gm, keep, values)
    kept = [n for n in gm.graph.nodes if n.op == "call_function" and n.name in keep]
    g = Graph()
    env: dict[Node, Node] = {}
    inputs: list[Any] = []
    sources: list[str] = []
    weights: dict[str, torch.Tensor] = {}
    boundary = [i for n in kept for i in n.all_input_nodes if i.name not in keep]
    for inp in dict.fromkeys(boundary):  # placeholders first, then weights, in graph order
        if inp.op != "get_attr":
            env[inp] = g.placeholder(inp.name)
            inputs.append(values[inp.name])
            sources.append(inp.name)
    for inp in dict.fromkeys(boundary):
        if inp.op == "get_attr":
            name = _identifier(inp.name)
            weights[name] = attr_path(gm, str(inp.target)).detach()
            env[inp] = g.get_attr(name)
    for node in kept:
        env[node] = g.node_copy(node, lambda n: env[n])
        env[node].meta = {k: v for k, v in node.meta.items() if k == "stack_trace"}
    outs = [env[n] for n in kept if any(u.name not in keep for u in n.users)] or [env[kept[-1]]]
    g.output(outs)
    root = torch.nn.Module()
    for name, value in weights.items():
        root.register_buffer(name, value)
    sub = GraphModule(root, g)
    _set_meta(sub, inputs)
    return Subgraph(sub, inputs, weights, sources)


def _set_meta(gm: GraphModule, inputs: Sequence[Any]) -> None:
    """Static-shape metadata from the recorded input values (the subgraph has one batch)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(holders, inputs):
        node.meta["val"] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    propagate_meta(gm)


def _identifier(name: str) -> str:
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"n_{name}"


# -- does a subgraph reproduce? -------------------------------------------------------------------


def attempt(
    p: Pass,
    gm: GraphModule,
    inputs: Sequence[Any],
    limit: int | None,
    calibration: list[list[Any]] | None = None,
) -> tuple[GraphoptError | None, int, set[str]]:
    """Run the one pass on ``gm`` (verified, raising; calibrated on ``calibration``): (error,
    rewrites attempted, rules that applied in the failing run)."""
    manager = PassManager([p], on_fail="raise", max_rewrites=limit, calibration=calibration)
    try:
        manager.run(gm, inputs)
    except GraphoptError as exc:
        rules = {r for rw in manager.ctx.rewriters for r, log in rw.rules.items() if log.applied}
        return exc, manager.ctx.budget.used, rules
    return None, manager.ctx.budget.used, set()


def signature_of(p: Pass, error: GraphoptError, rules: set[str], rule: str | None) -> Signature:
    node = getattr(error, "origin", None)
    return Signature(
        getattr(error, "pass_name", p.name),
        type(error).__name__,
        getattr(error, "op", None),
        node,
        p.contract_for().judged_by if node is not None else None,
        rule if rule in rules else None,
    )


class Minimizer:
    """Finds the smallest subgraph of ``step_gm`` that reproduces ``signature``. ``values``: the
    value of every node on the example inputs; ``calibration`` (for a calibrating pass): the
    same on each calibration batch."""

    def __init__(
        self,
        step_gm: GraphModule,
        values: dict[str, Any],
        p: Pass,
        signature: Signature,
        calibration: list[dict[str, Any]] | None = None,
    ) -> None:
        self.gm = step_gm
        self.values = values
        self.p = p
        self.signature = signature
        self.calibration = calibration
        self.attempts = 0
        self.seen: dict[frozenset[str], int | None] = {}
        self.calls = [n.name for n in step_gm.graph.nodes if n.op == "call_function"]

    def reproduces(self, keep: set[str]) -> int | None:
        """The smallest ``max_rewrites`` at which the pass fails on the subgraph ``keep``, if
        that first failure has the signature (else None). The first failing rewrite is the one
        judged: with more rewrites allowed, later rewrites could change which node is blamed."""
        key = frozenset(keep)
        if key not in self.seen:
            self.seen[key] = self._reproduces(keep)
        return self.seen[key]

    def _reproduces(self, keep: set[str]) -> int | None:
        try:
            sub = extract(self.gm, keep, self.values)
        except Exception:  # a cut whose metadata cannot be rebuilt is not a candidate
            return None
        self.attempts += 1
        batches = None if self.calibration is None else sub.batches(self.calibration)
        error, used, rules = attempt(self.p, sub.gm, sub.inputs, None, batches)
        if error is None:
            return None
        # max_rewrites=0 runs nothing; `used` rewrites fail (a crash: one more, the uncounted
        # rewrite it was attempting)
        lo, hi = 0, used + (0 if isinstance(error, EquivalenceError) else 1)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            self.attempts += 1
            found, _, found_rules = attempt(self.p, sub.gm, sub.inputs, mid, batches)
            if found is not None:
                hi, error, rules = mid, found, found_rules
            else:
                lo = mid
        same = signature_of(self.p, error, rules, self.signature.rule) == self.signature
        return max(hi, 1) if same else None

    def grow(self, centre: set[str]) -> set[str]:
        """The smallest neighbourhood of ``centre`` (by distance) that reproduces."""
        by_name = {n.name: n for n in self.gm.graph.nodes}
        keep = {c for c in centre if c in by_name} or set(self.calls)
        while True:
            if self.reproduces(keep) is not None:
                return keep
            ring = {
                other.name
                for name in keep
                for other in (*by_name[name].all_input_nodes, *by_name[name].users)
                if other.op == "call_function"
            }
            if ring <= keep:
                raise GraphoptError(
                    f"the failure of pass {self.p.spec()!r} did not reproduce on any subgraph "
                    "of the graph it received, not even the whole graph run alone (it may need "
                    "the captured graph's float64 reference); use the verdict's --max-rewrites "
                    "rerun instead of a repro"
                )
            keep |= ring

    def shrink(self, keep: set[str], protect: set[str]) -> set[str]:
        """Delta debugging: drop chunks of halving size, then single nodes, while it reproduces."""
        order = [n for n in self.calls if n in keep and n not in protect]
        chunk = max(len(order) // 2, 1)
        while order:
            i, removed = 0, False
            while i < len(order):
                trial = set(order[:i] + order[i + chunk :]) | (keep & protect)
                if self.attempts >= MAX_ATTEMPTS:  # settle for the smallest found so far
                    return set(order) | (keep & protect)
                if self.reproduces(trial) is not None:
                    order = order[:i] + order[i + chunk :]
                    removed = True
                else:
                    i += chunk
            if chunk == 1 and not removed:
                break
            chunk = max(chunk // 2, 1)
        return set(order) | (keep & protect)

    def budget(self, keep: set[str]) -> int:
        """The smallest ``max_rewrites`` that reproduces on the subgraph ``keep``."""
        limit = self.reproduces(keep)
        if limit is None:
            raise GraphoptError(
                f"the minimized subgraph stopped reproducing the failure of {self.p.spec()!r}; "
                "report this as a graphopt bug"
            )
        return limit


def write_repro(
    folder: Path,
    evidence: Trial,
    verdict: Verdict,
    inputs: Sequence[Any],
    calibration: Iterable[Sequence[Any]] | None = None,
) -> Written:
    """Minimize the failure of ``evidence`` and write ``folder/repro.py`` and
    ``folder/tensors.pt``; the script is run here once to check it reproduces.
    ``calibration``: the trial's calibration batches (flat like ``inputs``), read once here;
    every node's value on each is kept while minimizing, and the subgraph's inputs' saved."""
    step = evidence.step
    assert step is not None and evidence.error is not None
    p = step.p
    _check_importable(p)
    signature = Signature(
        p.name,
        type(evidence.error).__name__,
        verdict.op,
        verdict.replaced,
        verdict.metric if verdict.replaced is not None else None,
        verdict.rule,
    )
    _, values = native_run(step.before, list(inputs), record=True)
    recorded = None
    if calibration is not None:
        recorded = [native_run(step.before, list(batch), record=True)[1] for batch in calibration]
    minimizer = Minimizer(step.before, values, p, signature, recorded)
    centre = _centre(step, verdict)
    keep = minimizer.grow(centre)
    keep = minimizer.shrink(keep, protect={verdict.replaced} if verdict.replaced else set())
    limit = minimizer.budget(keep)
    sub = extract(step.before, keep, values)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = folder / "tensors.pt"
    names = [n.name for n in sub.gm.graph.nodes if n.op == "placeholder"]
    saved: dict[str, Any] = {"inputs": dict(zip(names, sub.inputs)), "weights": sub.weights}
    if recorded is not None:
        saved["calibration"] = [dict(zip(names, batch)) for batch in sub.batches(recorded)]
    torch.save(saved, tensors)
    script = folder / "repro.py"
    script.write_text(script_text(sub.gm, p, limit, signature, verdict))
    _check_script(script, signature)
    nodes = sum(1 for n in sub.gm.graph.nodes if n.op == "call_function")
    return Written(script, tensors, nodes, limit, signature)


def _centre(step: Any, verdict: Verdict) -> set[str]:
    """The failing node and the nodes the culprit rewrite replaced, in the received graph."""
    centre = {verdict.replaced} if verdict.replaced else set()
    if verdict.rewrite_did:
        names = {n.name for n in step.before.graph.nodes}
        for word in verdict.rewrite_did.split(" -> ")[0].split():
            if word.startswith("%") and word[1:] in names:
                centre.add(word[1:])
    return centre


def _check_importable(p: Pass) -> None:
    cls = type(p)
    if "<locals>" in cls.__qualname__ or cls.__module__ == "__main__":
        raise GraphoptError(
            f"pass {p.name!r} is defined in {cls.__module__}.{cls.__qualname__}, which a repro "
            "script cannot import; define the pass class at the top level of an importable "
            "module"
        )


def _check_script(script: Path, signature: Signature) -> None:
    namespace = runpy.run_path(str(script), run_name="graphopt_repro")
    error = namespace["reproduce"]()
    got = namespace["signature"](error) if error is not None else None
    if got != namespace["EXPECTED"]:
        raise GraphoptError(
            f"the repro written to {script} does not reproduce the failure (got {got}, "
            f"expected {namespace['EXPECTED']}); report this as a graphopt bug"
        )


# -- the script -----------------------------------------------------------------------------------

# names build() uses after the node lines, and the script's globals
_RESERVED = {"torch", "operator", "sys", "graphopt", "g", "gm", "t", "root", "inputs", "mode",
             "Graph", "GraphModule", "FakeTensorMode", "HERE", "PASS", "Path"}  # fmt: skip


def script_text(
    gm: GraphModule, p: Pass, limit: int, signature: Signature, verdict: Verdict
) -> str:
    """The source of ``repro.py`` for subgraph ``gm``."""
    cls = type(p)
    module = cls.__module__
    imports = {"operator"}
    names: dict[Node, str] = {}
    body: list[str] = []
    for node in gm.graph.nodes:
        var = _identifier(node.name)
        var = var + "_" if var in _RESERVED else var
        names[node] = var
        if node.op == "placeholder":
            body.append(f"    {var} = g.placeholder({node.name!r})")
        elif node.op == "get_attr":
            body.append(f"    {var} = g.get_attr({node.target!r})")
        elif node.op == "call_function":
            target, module_name = _target_text(node.target)
            if module_name:
                imports.add(module_name)
            args = _py(node.args, names)
            kwargs = _py(node.kwargs, names)
            body.append(
                f"    {var} = g.create_node('call_function', {target}, {args}, {kwargs}, "
                f"name={node.name!r})"
            )
        elif node.op == "output":
            body.append(f"    g.output({_py(list(node.args[0]), names)})")
    fields = ", ".join(
        f"{f.name}={getattr(p, f.name)!r}"
        for f in dataclasses.fields(p)
        if getattr(p, f.name) != f.default
    )
    path_line = ""
    if module.split(".")[0] != "graphopt":
        root = _import_root(module)
        path_line = (
            f"if {root!r} not in sys.path:  # where {module} lives\n"
            f"    sys.path.insert(0, {root!r})\n"
        )
    expected = {
        "pass": signature.pass_name,
        "error": signature.error,
        "op": signature.op,
        "origin": signature.node,
    }
    head = (
        f"pass {verdict.pass_spec}, rewrite {verdict.rewrite_in_pass} of the pass "
        f"(global rewrite {verdict.rewrite}) in pipeline {verdict.pipeline}"
    )
    node = f"%{verdict.node} ({verdict.op}) standing for %{verdict.replaced}"
    return _TEMPLATE.format(
        head=head,
        node=node,
        metric=f"{verdict.metric} {verdict.value} vs threshold {verdict.threshold}",
        imports="\n".join(f"import {m}" for m in sorted(imports)),
        path_line=path_line,
        module=module,
        top=cls.__qualname__.split(".")[0],
        cls=cls.__qualname__,
        fields=fields,
        limit=limit,
        expected=repr(expected),
        body="\n".join(body),
    )


def _import_root(module: str) -> str:
    """The sys.path entry from which ``module`` imports."""
    file = Path(str(getattr(sys.modules[module], "__file__", ""))).resolve()
    depth = len(module.split("."))
    root = file.parents[depth] if file.name == "__init__.py" else file.parents[depth - 1]
    return str(root)


def _target_text(target: Any) -> tuple[str, str | None]:
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
        return f"torch.ops.{target.namespace}.{name}.{target._overloadname}", None
    if target is operator.getitem:
        return "operator.getitem", None
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if module and qualname and "<" not in qualname:
        return f"{module}.{qualname}", module
    raise GraphoptError(f"the repro cannot write the call target {target!r}; report this")


def _py(value: Any, names: dict[Node, str]) -> str:
    """Python source for a node argument."""
    if isinstance(value, Node):
        return names[value]
    if isinstance(value, float):
        return (
            repr(value)
            if value == value and abs(value) != float("inf")
            else f"float({str(value)!r})"
        )
    if isinstance(value, (bool, int, str)) or value is None:
        return repr(value)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return str(value)
    if isinstance(value, torch.device):
        return f"torch.device({str(value)!r})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_py(v, names) for v in value)
        if isinstance(value, tuple):
            return f"({inner}{',' if len(value) == 1 else ''})"
        return f"[{inner}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_py(v, names)}" for k, v in value.items()) + "}"
    raise GraphoptError(f"the repro cannot write the argument {value!r}; report this")


_TEMPLATE = '''\
"""Repro written by `graphopt debug bisect --repro`.

Failure: {head}.
First diverging node: {node}; {metric}.

Rebuilds the smallest subgraph of the graph that pass received on which it still fails the same
way, runs that one pass on it through graphopt's PassManager (verified, on_fail="raise",
max_rewrites={limit}) and raises AssertionError while the bug is there; exits 0 once it is fixed.
Run: python repro.py   (tensors.pt, next to it, holds the weights and the recorded inputs, and
for a calibrating pass the recorded calibration batches)
"""

{imports}
import sys
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx import Graph, GraphModule

import graphopt
from graphopt.pipeline.manager import PassManager

{path_line}from {module} import {top}  # noqa: E402  (the failing pass, imported by module:qualname)

HERE = Path(__file__).resolve().parent
PASS = {cls}({fields})
MAX_REWRITES = {limit}
EXPECTED = {expected}


def build() -> tuple[GraphModule, list[torch.Tensor], list[list[torch.Tensor]] | None]:
    """The subgraph, node names as in the graph the pass received, its recorded inputs and
    its calibration batches (None when the pass was given none)."""
    t = torch.load(HERE / "tensors.pt")
    g = Graph()
{body}
    root = torch.nn.Module()
    for name, value in t["weights"].items():
        root.register_buffer(name, value)
    gm = GraphModule(root, g)
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = [t["inputs"][n.name] for n in holders]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node, value in zip(holders, inputs):
        node.meta["val"] = mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
    graphopt.propagate_meta(gm)
    calibration = None
    if "calibration" in t:
        calibration = [[batch[n.name] for n in holders] for batch in t["calibration"]]
    return gm, inputs, calibration


def reproduce() -> graphopt.GraphoptError | None:
    """Run the pass on the subgraph; the error it raises, or None when it keeps its contract."""
    gm, inputs, calibration = build()
    manager = PassManager(
        [PASS], on_fail="raise", max_rewrites=MAX_REWRITES, calibration=calibration
    )
    try:
        manager.run(gm, inputs)
    except graphopt.GraphoptError as error:
        return error
    return None


def signature(error: Exception) -> dict[str, object]:
    return {{
        "pass": getattr(error, "pass_name", PASS.name),
        "error": type(error).__name__,
        "op": getattr(error, "op", None),
        "origin": getattr(error, "origin", None),
    }}


if __name__ == "__main__":
    error = reproduce()
    if error is None:
        print(f"not reproduced: {{PASS.spec()}} keeps its {{PASS.contract_for()}} contract here")
        sys.exit(0)
    got = signature(error)
    if got == EXPECTED:
        print(f"reproduced: {{got['pass']}} makes %{{got['origin']}} ({{got['op']}}) diverge")
    else:
        print(f"a different failure: {{got}}, expected {{EXPECTED}}")
    metrics = getattr(error, "metrics", {{}})
    raise AssertionError(f"{{error}} (output metrics: {{metrics}})")
'''
