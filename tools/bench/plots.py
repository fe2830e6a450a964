"""PNG plots of a benchmark run (matplotlib, headless): speedup per model and mode, latency
against batch size, compile time against depth. Each has a title that says what it shows and a
subtitle with the device, thread count, batch size and date of the run it comes from."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subtitle(env: Mapping[str, Any], batch: str | None = None) -> str:
    """The run's device, threads, batch (when one applies to the whole plot) and date."""
    parts = [str(env.get("device", "?"))]
    if env.get("device_kind", "cpu") == "cpu":
        parts.append(f"{env.get('threads', '?')} thread(s)")
    if batch:
        parts.append(batch)
    parts.append(str(env.get("date", "?"))[:10])
    return ", ".join(parts)


def _title(ax: Any, title: str, env: Mapping[str, Any], batch: str | None = None) -> None:
    ax.set_title(f"{title}\n{subtitle(env, batch)}", fontsize=9)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _batches(results: Sequence[Any]) -> str:
    """``batch 8`` when every result has that batch, else ``batch: see the table``."""
    batches = {r.batch for r in results}
    return f"batch {batches.pop()}" if len(batches) == 1 else "batch: see the table"


def speedup_plot(results: Sequence[Any], path: Path, env: Mapping[str, Any]) -> Path:
    """Grouped bars: speedup over eager fp32 per model and mode."""
    plt = _pyplot()
    measured = [r for r in results if r.speedup]
    models = list(dict.fromkeys(r.model for r in measured))
    modes = [m for m in dict.fromkeys(r.mode for r in results) if m != "eager"]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.6 * len(models)), 4.4))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for j, model in enumerate(models):
            r = next((r for r in results if r.model == model and r.mode == mode), None)
            if r is not None and r.speedup:
                xs.append(j + i * width)
                ys.append(r.speedup)
        ax.bar(xs, ys, width, label=mode)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + width * (len(modes) - 1) / 2 for j in range(len(models))], models)
    ax.set_ylabel("speedup over eager fp32 (median latency)")
    _title(ax, "Speedup over eager PyTorch", env, _batches(measured))
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def batch_plot(results: Sequence[Any], path: Path, env: Mapping[str, Any]) -> Path:
    """Latency against batch size, one line per (model, mode), log-log, every batch measured
    and enough latencies labelled to read a point off the plot."""
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, ScalarFormatter

    plt = _pyplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        if r.latency_ms:
            lines[(r.model, r.mode)].append((r.batch, r.latency_ms))
    fig, ax = plt.subplots(figsize=(7, 4.6))
    for (model, mode), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({b for pts in lines.values() for b, _ in pts})
    if batches:
        ax.xaxis.set_major_locator(FixedLocator(batches))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
    # 1-2-5 steps per decade, labelled plainly (0.5, 1, 2, 5, 10, ...), not only powers of ten
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", linewidth=0.4, alpha=0.6)
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms)")
    _title(ax, "Latency against batch size", env)
    ax.legend(fontsize=6)
    return _save(plt, fig, path)


def compile_plot(rows: Sequence[dict[str, Any]], path: Path, env: Mapping[str, Any]) -> Path:
    """graphopt compile time against transformer depth, split into the passes (with their
    verification) and the rest (capture with torch.export, and building the runnable)."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.4))
    layers = [r["layers"] for r in rows]
    total = [r["compile_s"] for r in rows]
    passes = [r["passes_s"] for r in rows]
    ax.plot(layers, total, marker="o", label="graphopt -O1 compile, total")
    ax.plot(layers, passes, marker="s", label="passes + verification")
    ax.plot(
        layers,
        [t - p for t, p in zip(total, passes)],
        marker="^",
        label="the rest: capture (torch.export) + building the runnable",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("zoo gpt layers")
    ax.set_ylabel("seconds")
    ax.set_ylim(bottom=0)
    _title(ax, "graphopt compile time against model depth", env, "batch 2")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)
