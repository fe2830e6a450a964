"""The record of one benchmark run (``BenchReport``) and its two forms: results.json and the
markdown page results.md."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from graphopt.tools.bench.measure import Result
from graphopt.tools.bench.tables import compile_table, kernel_table, markdown_table


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
        """Environment, the tables measured, and the ``plots`` (paths relative to the page)."""
        env = self.env
        parts = [
            f"Measured {env['date']} on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"onnxruntime {env['onnxruntime']}, python {env['python']}. Method: {env['method']}.\n",
            "Error columns compare each mode's outputs with eager fp32 on the same input.\n",
            markdown_table(self.results),
        ]
        if self.batch_scaling:
            parts += ["\n### Latency against batch size\n", markdown_table(self.batch_scaling)]
        if self.compile_scaling:
            parts += [
                "\n### Compile time against model depth\n",
                compile_table(self.compile_scaling, self.compile_exponent),
            ]
        parts += [
            "\n### Kernels\n",
            kernel_table(self.kernels) if self.kernels else self.kernels_note,
        ]
        parts += [f"\n![{Path(p).stem}]({p})\n" for p in plots]
        return "\n".join(parts)
