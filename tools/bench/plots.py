"""PNG plots of a benchmark run (matplotlib, headless): speedup per model and mode, latency
against batch size, compile time against depth."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def speedup_plot(results: Sequence[Any], path: Path) -> Path:
    """Grouped bars: speedup over eager fp32 per model and mode."""
    plt = _pyplot()
    models = list(dict.fromkeys(r.model for r in results if r.speedup))  # measured ones only
    modes = [m for m in dict.fromkeys(r.mode for r in results) if m != "eager"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(models)), 4))
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
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def batch_plot(results: Sequence[Any], path: Path) -> Path:
    """Latency against batch size, one line per (model, mode), log-log."""
    plt = _pyplot()
    lines: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in results:
        if r.latency_ms:
            lines[(r.model, r.mode)].append((r.batch, r.latency_ms))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for (model, mode), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model} {mode}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("median latency (ms)")
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def compile_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """graphopt compile time against transformer depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    layers = [r["layers"] for r in rows]
    ax.plot(
        layers, [r["compile_s"] for r in rows], marker="o", label="graphopt -O1 compile (total)"
    )
    ax.plot(layers, [r["passes_s"] for r in rows], marker="s", label="passes + verification")
    ax.set_xlabel("zoo gpt layers")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=8)
    return _save(plt, fig, path)
