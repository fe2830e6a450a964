"""Issue 15's targets, judged per model from one run's results: graphopt ``-O2`` with
``backend=auto`` against eager, torch.compile and ONNX Runtime, its compile time against
torch.compile's, and ``-O2,int8`` with ``auto`` against ONNX Runtime fp32 on BERT-base.

A target is data: the mode judged, the baselines it is judged against (the best of them counts),
the quantity and its bound. "Within 5% noise" is a bound of 0.95 on a speedup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from graphopt.tools.bench.measure import Result


@dataclass(frozen=True)
class Target:
    title: str  # the table's column
    mode: str  # the mode judged
    against: tuple[str, ...]  # baseline modes: the fastest (or quickest to compile) counts
    quantity: str  # speedup | compile | cosine
    bound: float | None  # speedup, cosine: at least; compile (a ratio): at most; None: shown only
    models: tuple[str, ...] = ()  # the models it is set for (every model when empty)


# "speedup": baseline latency / mode latency; "compile": mode compile s / baseline compile s;
# "cosine": the mode's cosine against eager fp32
CPU_TARGETS = (
    # -O2 auto never slower than eager (within 5% noise)
    Target("-O2 auto vs eager", "graphopt-O2-auto", ("eager",), "speedup", 0.95),
    # -O2 auto at least as fast as the faster of torch.compile and ONNX Runtime (within 5%)
    Target(
        "-O2 auto vs best of torch.compile, ORT",
        "graphopt-O2-auto",
        ("torch.compile", "onnxruntime"),
        "speedup",
        0.95,
    ),
    # compile time with auto within 2x of torch.compile's
    Target("compile auto / torch.compile", "graphopt-O2-auto", ("torch.compile",), "compile", 2.0),
    # -O2,int8 auto on BERT-base: 1.3x ONNX Runtime fp32, at cosine >= 0.99 against eager fp32
    Target(
        "-O2,int8 auto vs ORT fp32",
        "graphopt-O2-int8-auto",
        ("onnxruntime",),
        "speedup",
        1.3,
        ("bert-base",),
    ),
    Target("-O2,int8 auto cosine", "graphopt-O2-int8-auto", (), "cosine", 0.99, ("bert-base",)),
)
GPU_TARGETS = (
    # -O2 fp16 auto no slower than torch.compile fp16 (within 5% noise)
    Target(
        "-O2 fp16 auto vs torch.compile fp16",
        "graphopt-O2-fp16-auto",
        ("torch.compile-fp16",),
        "speedup",
        0.95,
    ),
    # compile time with auto within 2x of torch.compile's
    Target(
        "compile fp16 auto / torch.compile fp16",
        "graphopt-O2-fp16-auto",
        ("torch.compile-fp16",),
        "compile",
        2.0,
    ),
    # int8 on the GPU: no target set; shown against fp16 torch.compile, with its cosine
    Target(
        "-O2,int8 auto vs torch.compile fp16",
        "graphopt-O2-int8-auto",
        ("torch.compile-fp16",),
        "speedup",
        None,
    ),
    Target("-O2,int8 auto cosine", "graphopt-O2-int8-auto", (), "cosine", 0.99),
)


def targets_for(device: str) -> tuple[Target, ...]:
    return GPU_TARGETS if device == "cuda" else CPU_TARGETS


def value(target: Target, results: Sequence[Result]) -> float | None:
    """The quantity ``target`` judges, from one model's ``results`` (None: not measured)."""
    by_mode = {r.mode: r for r in results if r.status == "ok"}
    judged = by_mode.get(target.mode)
    if judged is None or judged.latency_ms is None:
        return None
    if target.quantity == "cosine":
        return judged.cosine
    base = [by_mode[m] for m in target.against if m in by_mode]
    if target.quantity == "speedup":
        times = [b.latency_ms for b in base if b.latency_ms]
        return min(times) / judged.latency_ms if times else None
    compiles = [b.compile_s for b in base if b.compile_s]
    if not compiles or judged.compile_s is None:
        return None
    return judged.compile_s / min(compiles)


def verdict(target: Target, model: str, x: float | None) -> str:
    """A table cell: the value, and ``met`` / ``MISSED`` where the target is set for ``model``."""
    if x is None:
        return "-"
    text = f"{x:.4f}" if target.quantity == "cosine" else f"{x:.2f}x"
    if target.bound is None or (target.models and model not in target.models):
        return text
    met = x <= target.bound if target.quantity == "compile" else x >= target.bound
    return f"{text} {'met' if met else 'MISSED'}"


def targets_table(results: Sequence[Result], device: str) -> str:
    """One row per model with a measured mode that some target judges; empty when none."""
    targets = targets_for(device)
    judged = {t.mode for t in targets}
    models = list(dict.fromkeys(r.model for r in results if r.mode in judged and r.latency_ms))
    if not models:
        return ""
    lines = [
        "| model | " + " | ".join(t.title for t in targets) + " |",
        "|---" * (1 + len(targets)) + "|",
    ]
    for model in models:
        mine = [r for r in results if r.model == model]
        cells = [verdict(t, model, value(t, mine)) for t in targets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    bounds = "; ".join(_bound_text(t) for t in targets if t.bound is not None)
    return "\n".join(lines) + f"\n\nTargets: {bounds}.\n"


def _bound_text(t: Target) -> str:
    sign = "<=" if t.quantity == "compile" else ">="
    scope = f" (on {', '.join(t.models)})" if t.models else ""
    return f"{t.title} {sign} {t.bound:g}{scope}"
