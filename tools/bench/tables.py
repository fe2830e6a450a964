"""Markdown tables of a benchmark run: the models, per-mode results, the backends ``auto`` tried,
compile scaling and kernels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from graphopt.tools.bench.measure import Result

_RESULT_HEAD = (
    "| model | batch | mode | backend | median ms | p10-p90 ms | speedup vs eager | compile s "
    "| mem MB | max abs err | cosine | status |"
)


def models_table(results: Sequence[Result]) -> str:
    """One row per model measured: its example inputs (shapes, dtypes) and parameter count."""
    lines = ["| model | inputs | parameters |", "|---|---|---:|"]
    seen: set[tuple[str, str]] = set()
    for r in results:
        if r.inputs and (r.model, r.inputs) not in seen:
            seen.add((r.model, r.inputs))
            lines.append(f"| {r.model} | {r.inputs} | {_fmt(r.params_m, '.1f')}M |")
    return "\n".join(lines) + "\n"


def markdown_table(results: Sequence[Result]) -> str:
    """One row per result; a model that no mode could run, for one reason, gets one row."""
    lines = [_RESULT_HEAD, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shown: set[tuple[str, int]] = set()
    for r in results:
        same = [o for o in results if (o.model, o.batch) == (r.model, r.batch)]
        if all(o.status == "unavailable" and o.reason == r.reason for o in same):
            if (r.model, r.batch) not in shown:
                shown.add((r.model, r.batch))
                lines.append(
                    f"| {r.model} | {r.batch} | all modes | - | - | - | - | - | - | - | - "
                    f"| unavailable: {r.reason} |"
                )
            continue
        lines.append(_result_row(r))
    return "\n".join(lines) + "\n"


def _result_row(r: Result) -> str:
    spread = "-" if r.p10_ms is None else f"{r.p10_ms:.3g}-{r.p90_ms:.3g}"
    status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
    return (
        f"| {r.model} | {r.batch} | {r.mode} | {r.backend or '-'} | {_fmt(r.latency_ms, '.3f')} "
        f"| {spread} | "
        f"{_fmt(r.speedup, '.2f')} | {_fmt(r.compile_s, '.2f')} | {_fmt(r.peak_mem_mb, '.0f')} | "
        f"{_fmt(r.max_abs, '.1e')} | {_fmt(r.cosine, '.6f')} | {status.replace('|', '/')} |"
    )


def backend_table(results: Sequence[Result]) -> str:
    """One row per graphopt mode that tried backends (``auto``, or one named): the engine kept,
    the int8 layers, and per backend its median on the example inputs (timed in turns at
    compile time), its error against float64, and its status with the reason."""
    tried = [r for r in results if r.backends]
    names = list(dict.fromkeys(row["backend"] for r in tried for row in r.backends))
    head = "| model | mode | kept | int8 layers | " + " | ".join(names) + " |"
    lines = [head, "|---" * (4 + len(names)) + "|"]
    for r in tried:
        rows = {row["backend"]: row for row in r.backends}
        cells = [_backend_cell(rows[n]) if n in rows else "-" for n in names]
        lines.append(
            f"| {r.model} | {r.mode} | {r.backend} | {r.int8_layers or '-'} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def _backend_cell(row: dict[str, Any]) -> str:
    """``kept: 1.234 ms, err 1.1e-06``; ``rejected: why (err 3.0e-02)``; ``unavailable: why``."""
    measured = []
    if row.get("time_ms") is not None:
        measured.append(f"{row['time_ms']:.3f} ms")
    if row.get("error") is not None:
        measured.append(f"err {row['error']:.1e}")
    text = f"{row['status']}: {', '.join(measured)}" if measured else row["status"]
    if row.get("why"):
        text += f" ({row['why']})" if measured else f": {row['why']}"
    return text.replace("|", "/")


def compile_table(rows: Sequence[dict[str, Any]], exponent: float | None) -> str:
    """graphopt -O1 compile time against gpt depth, and the growth exponent when there is one."""
    lines = [
        "| gpt layers | graph nodes | graphopt -O1 compile s | of which passes + checks s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layers']} | {row['nodes']} | {row['compile_s']:.2f} | {row['passes_s']:.2f} |"
        )
    if exponent is not None:
        lines.append(
            "\nGrowth exponent of compile time against graph size (log-log slope; 1.0 is linear): "
            f"**{exponent:.2f}**"
        )
    return "\n".join(lines) + "\n"


# the throughput a kernel row carries, and its unit
_RATES = (("gbps", " GB/s"), ("tflops", " TFLOPS"), ("tops", " TOPS"))


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per kernel measurement from ``graphopt.tools.bench.kernels.kernel_benchmarks``."""
    head = "| kernel | shape | dtype | ms | baseline ms | speedup | rate | max rel err |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r.get("gbps") or r.get("tflops") or r.get("tops")
        unit = next((u for k, u in _RATES if r.get(k)), "")
        lines.append(
            f"| {r.get('name')} | {r.get('shape')} | {r.get('dtype')} | {_fmt(r.get('ms'), '.4f')} "
            f"| {_fmt(r.get('baseline_ms'), '.4f')} | {_fmt(r.get('speedup'), '.2f')} "
            f"| {_fmt(rate, '.1f')}{unit if rate else ''} | {_fmt(r.get('max_rel_err'), '.1e')} |"
        )
    return "\n".join(lines)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)
