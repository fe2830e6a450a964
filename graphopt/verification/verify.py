"""Judging a pass against its numerical contract, and finding the node that broke it.

Everything is measured against one float64 CPU run of the *captured* graph on the sample inputs
(the reference). Nodes of a rewritten graph are matched with their counterparts through
provenance (``graphopt.ir.original_name``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from graphopt.errors import EquivalenceError
from graphopt.ir.graph import original_name, short_target, tensors_of
from graphopt.verification import metrics
from graphopt.verification.contracts import LOSSY_METRICS, Contract
from graphopt.verification.interpreter import Runner, native_run, reference_run


@dataclass
class Verdict:
    ok: bool
    error: float  # worst rel_max of the outputs against float64, after the pass
    detail: str = ""  # what failed, for the message
    metrics: dict[str, Any] = field(default_factory=dict)


def _is_float(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: Any, b: Any) -> bool:
    """Equal bit patterns (so -0.0 differs from 0.0); any NaN equals any NaN."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        if a.is_floating_point():
            as_int = _SAME_WIDTH_INT[a.element_size()]
            same_bits = a.contiguous().view(as_int) == b.contiguous().view(as_int)
            return bool((same_bits | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(bitwise_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)


def judge_value(
    contract: Contract, after: Any, before: Any, ref: Any
) -> tuple[bool, dict[str, float], str]:
    """Does one value keep the contract? Returns (ok, numbers, explanation)."""
    if contract.kind == "exact" or not (_is_float(after) and isinstance(ref, torch.Tensor)):
        ok = bitwise_equal(after, before)
        if ok:
            return True, {}, ""
        diff = ""
        if _is_float(after) and _is_float(before) and after.shape == before.shape:
            diff = f" (max abs difference {metrics.max_abs(after, before):.3g})"
        return False, {}, f"differs bitwise from its value before the pass{diff}"
    if after.shape != ref.shape:
        return False, {}, f"shape {tuple(after.shape)} instead of {tuple(ref.shape)}"
    err_after = metrics.rel_max(after, ref)
    if contract.kind == "rounding":
        err_before = metrics.rel_max(before, ref) if _is_float(before) else 0.0
        # a graph computing in fp16 but returning fp32 is held to fp16's floor (Contract.dtype)
        dtypes = [after.dtype] + ([getattr(torch, contract.dtype)] if contract.dtype else [])
        floor_dtype = max(dtypes, key=metrics.rounding_floor)
        floor = metrics.rounding_floor(floor_dtype)
        allowed = max(2 * err_before, floor)
        numbers = {"error": err_after, "error_before": err_before, "allowed": allowed}
        why = (
            f"has error {err_after:.3g} against float64, allowed {allowed:.3g} "
            f"= max(2 x {err_before:.3g} before the pass, floor {floor:g} for {floor_dtype})"
        )
        return err_after <= allowed, numbers, why
    metric = str(contract.metric)
    value = metrics.METRICS[metric](after, ref)
    threshold = float(contract.threshold or 0.0)
    ok = value >= threshold if LOSSY_METRICS[metric] else value <= threshold
    relation = ">=" if LOSSY_METRICS[metric] else "<="
    why = f"has {metric} {value:.6g} against float64, budget {relation} {threshold:g}"
    return ok, {metric: value, "error": err_after}, why


class Verifier:
    """Holds the reference run and judges graphs against it."""

    def __init__(self, captured: GraphModule, flat_inputs: Sequence[Any]) -> None:
        self.inputs = list(flat_inputs)
        self.ref_outputs, self.ref_values = reference_run(captured, self.inputs)

    def output_error(self, outputs: Sequence[Any]) -> float:
        errs = [
            metrics.rel_max(o, r)
            for o, r in zip(outputs, self.ref_outputs)
            if _is_float(o) and isinstance(r, torch.Tensor) and o.shape == r.shape
        ]
        return max(errs, default=0.0)

    def judge(self, contract: Contract, before: Sequence[Any], after: Sequence[Any]) -> Verdict:
        error = self.output_error(after)
        if len(before) != len(after):
            return Verdict(False, error, f"{len(after)} outputs instead of {len(before)}")
        spent: dict[str, Any] = {}
        for i, (a, b, r) in enumerate(zip(after, before, self.ref_outputs)):
            ok, numbers, why = judge_value(contract, a, b, r)
            for key, value in numbers.items():
                worse = min if LOSSY_METRICS.get(key, False) else max
                spent[key] = worse(spent[key], value) if key in spent else value
            if not ok:
                return Verdict(False, error, f"output {i}: {why}", spent)
        return Verdict(True, error, "", spent)

    # -- aliasing -------------------------------------------------------------------------------

    def alias_pairs(self, outputs: Sequence[Any], gm: GraphModule) -> set[tuple[str, int, int]]:
        """Which outputs share memory with an input (``("input", i, j)``), a weight
        (``("weight", -1, j)``) or an earlier output (``("output", i, j)``)."""

        def ptr(t: torch.Tensor) -> int:
            return t.untyped_storage().data_ptr()

        inputs = {
            ptr(t): i
            for i, t in enumerate(self.inputs)
            if isinstance(t, torch.Tensor) and t.numel()
        }
        weights = {ptr(t) for t in tensors_of(gm) if t.numel()}
        pairs: set[tuple[str, int, int]] = set()
        first: dict[int, int] = {}
        for j, out in enumerate(outputs):
            if not isinstance(out, torch.Tensor) or out.numel() == 0:
                continue
            p = ptr(out)
            if p in inputs:
                pairs.add(("input", inputs[p], j))
            if p in weights:
                pairs.add(("weight", -1, j))
            if p in first:
                pairs.add(("output", first[p], j))
            first.setdefault(p, j)
        return pairs

    def aliasing_error(
        self, pass_name: str, new: set[tuple[str, int, int]], after: GraphModule
    ) -> EquivalenceError:
        kind, i, j = sorted(new)[0]
        other = {"input": f"graph input {i}", "weight": "a stored weight", "output": f"output {i}"}[
            kind
        ]
        returned = after.graph.output_node().args[0]
        node = returned[j] if isinstance(returned, (list, tuple)) and j < len(returned) else None
        where = f" (%{node.name}, {short_target(node)})" if isinstance(node, Node) else ""
        return EquivalenceError(
            f"pass {pass_name!r} made output {j}{where} share memory with {other}, which it did "
            "not before: values are equal but writing to one would change the other (new "
            f"aliasing, passes/README.md invariant 5). Leave {pass_name!r} out of the pipeline; "
            "the pass must keep the copy",
            pass_name=pass_name,
            node=node.name if isinstance(node, Node) else None,
            op=short_target(node) if isinstance(node, Node) else None,
            kind="aliasing",
        )

    # -- localization ---------------------------------------------------------------------------

    def localize(
        self,
        pass_name: str,
        contract: Contract,
        verdict: Verdict,
        before_gm: GraphModule,
        after_gm: GraphModule,
    ) -> EquivalenceError:
        """Build the error that names the first node whose own computation breaks the contract."""
        _, before_raw = native_run(before_gm, self.inputs, record=True)
        _, after_vals = native_run(after_gm, self.inputs, record=True)
        before_vals = {
            original_name(n): before_raw[n.name]
            for n in before_gm.graph.nodes
            if n.name in before_raw
        }
        before_by_origin = {original_name(n): n.name for n in before_gm.graph.nodes}
        first_inherited: tuple[Node, str, str] | None = None
        runner = Runner(after_gm)
        for node in after_gm.graph.nodes:
            origin = original_name(node)
            if node.op in ("placeholder", "output", "get_attr") or origin not in self.ref_values:
                continue
            if origin not in before_vals:
                continue
            ref, before = self.ref_values[origin], before_vals[origin]
            ok, _, why = judge_value(contract, after_vals[node.name], before, ref)
            if ok:
                continue
            local_env = self.local_inputs(node, contract, after_vals, before_by_origin, before_raw)
            local = runner.run_one(node, local_env)
            local_ok, _, local_why = judge_value(contract, local, before, ref)
            if not local_ok:
                return self._error(pass_name, contract, verdict, node, origin, "local", local_why)
            if first_inherited is None:
                first_inherited = (node, origin, why)
        if first_inherited is not None:
            node, origin, why = first_inherited
            return self._error(pass_name, contract, verdict, node, origin, "inherited", why)
        return EquivalenceError(
            f"pass {pass_name!r} broke its {contract} contract: {verdict.detail}. No single node "
            "could be blamed (no rewritten node has a counterpart in the captured graph). "
            f"Leave {pass_name!r} out of the pipeline, or bisect its rewrites with max_rewrites=N.",
            pass_name=pass_name,
            metrics=verdict.metrics,
        )

    def local_inputs(
        self,
        node: Node,
        contract: Contract,
        after_vals: dict[str, Any],
        before_by_origin: dict[str | None, str],
        before_raw: dict[str, Any],
    ) -> dict[str, Any]:
        """Inputs for ``node`` as they should be: before-pass values (exact) or float64
        reference values rounded to the node's dtype (rounding, lossy)."""
        env: dict[str, Any] = {}
        for inp in node.all_input_nodes:
            origin = original_name(inp)
            value = after_vals[inp.name]
            if contract.kind == "exact" and origin in before_by_origin:
                value = before_raw.get(before_by_origin[origin], value)
            elif origin in self.ref_values and isinstance(value, torch.Tensor):
                ref = self.ref_values[origin]
                if isinstance(ref, torch.Tensor) and ref.shape == value.shape:
                    value = ref.to(value.device, value.dtype)
            env[inp.name] = value
        return env

    def _error(
        self,
        pass_name: str,
        contract: Contract,
        verdict: Verdict,
        node: Node,
        origin: str,
        kind: str,
        why: str,
    ) -> EquivalenceError:
        op = short_target(node)
        where = (
            "its own computation is wrong (fed correct inputs, its value still"
            if kind == "local"
            else "its inputs were already wrong and no node computes wrongly from correct ones (its value"
        )
        origin_note = (
            f", standing for %{origin} of the captured graph" if origin != node.name else ""
        )
        trace = node.meta.get("stack_trace", "").strip().splitlines()
        source = f" Source: {trace[-1].strip()}." if trace else ""
        message = (
            f"pass {pass_name!r} broke its {contract} contract: {verdict.detail}. "
            f"First diverging node: %{node.name} ({op}){origin_note}; {where} {why}).{source} "
            f"Leave {pass_name!r} out of the pipeline, or bisect its rewrites with max_rewrites=N."
        )
        return EquivalenceError(
            message,
            pass_name=pass_name,
            node=node.name,
            op=op,
            origin=origin,
            kind=kind,
            metrics=verdict.metrics,
        )
