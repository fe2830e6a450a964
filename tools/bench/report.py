"""The record of one benchmark run (``BenchReport``) and its two forms: results.json and the
markdown page results.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.tools.bench.measure import Result
from graphopt.tools.bench.tables import (
    backend_table,
    compile_table,
    kernel_table,
    markdown_table,
    models_table,
)
from graphopt.tools.bench.targets import targets_table


@dataclass
class BenchReport:
    env: dict[str, Any]
    results: list[Result]
    batch_scaling: list[Result] = field(default_factory=list)
    compile_scaling: list[dict[str, Any]] = field(default_factory=list)
    compile_exponent: float | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    kernels_note: str = ""  # why the kernels are unmeasured, when they are

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, default=str)

    def to_markdown(self, plots: Sequence[str] = ()) -> str:
        """Environment, the tables measured, and the ``plots`` (paths relative to the page), each
        plot under the section of the table it draws."""
        env = self.env
        by_stem = {Path(p).stem: p for p in plots}

        def plot(stem: str) -> list[str]:
            return [f"\n![{stem}]({by_stem.pop(stem)})\n"] if stem in by_stem else []

        parts = [
            f"Measured {env['date']} on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"onnxruntime {env['onnxruntime']}, python {env['python']}. Method: {env['method']}.\n",
            "Models (random weights; the full-size ones at the zoo's batch and sequence length):\n",
            models_table(self.results),
            "Error columns compare each mode's outputs with eager fp32 on the same input; "
            "`backend` is the engine a graphopt mode runs on.\n",
            markdown_table(self.results),
            *plot("speedup"),
        ]
        targets = targets_table(self.results, env.get("device_kind", "cpu"))
        if targets:
            parts += ["\n### Targets (issue 15)\n", targets]
        if any(r.backends for r in self.results):
            parts += [
                "\n### Backends tried by graphopt\n",
                "Each candidate engine of a graphopt mode, as its compile report has it: median "
                "on the example inputs (the candidates timed in turns at compile time), error "
                "against float64, kept / passed / rejected / unavailable and why.\n",
                backend_table(self.results),
            ]
        if self.batch_scaling:
            parts += [
                "\n### Latency against batch size\n",
                markdown_table(self.batch_scaling),
                *plot("latency_vs_batch"),
            ]
        if self.compile_scaling:
            parts += [
                "\n### Compile time against model depth\n",
                compile_table(self.compile_scaling, self.compile_exponent),
                *plot("compile_vs_depth"),
            ]
        parts += [
            "\n### Kernels\n",
            kernel_table(self.kernels) if self.kernels else self.kernels_note,
        ]
        parts += [f"\n![{stem}]({p})\n" for stem, p in by_stem.items()]
        return "\n".join(parts)
