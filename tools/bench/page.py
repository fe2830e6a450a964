"""The documentation page a run writes with ``--docs`` (docs/benchmarks.md): how to reproduce the
run, the method, the latest results, and the GPU figures a CPU run leaves unmeasured."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphopt.tools.bench.report import BenchReport

METHOD = (
    "Method: every mode of a model runs in one process on the same inputs; warm-up, then the "
    "median of timed calls over rotating random inputs (CPU: a fixed thread count and "
    "`time.perf_counter` per call; GPU: `triton.testing.do_bench`). Compile time is the wall time "
    "to build the mode (for torch.compile, its first call). Memory: GPU, peak allocated by torch; "
    "CPU, growth of the process's resident set while the mode is built and run (a rough figure). "
    "Errors compare each mode's outputs with eager fp32 on the same input. Compile times are "
    "cold: torch.compile's is measured after `torch._dynamo.reset()`, and Inductor's caches are "
    "off for the whole run (`torch._inductor.config.force_disable_caches`), so neither "
    "torch.compile nor graphopt's Inductor backend reuses code generated earlier. ONNX Runtime's "
    "baseline runs torch.onnx's TorchScript export of the model, or its dynamo export where "
    "TorchScript cannot trace the model (transformers 5). Models from torchvision and Hugging Face "
    "are built from their configs with random weights when those packages are installed, and "
    "reported unavailable otherwise; they run at the zoo's batch and sequence length (see the "
    "models table) with the modes the targets compare. `graphopt-O2-<backend>` compiles with "
    "`graphopt.compile(..., pipeline='-O2', backend=<backend>)`; `auto` builds every backend "
    "available, verifies each against the float64 reference and keeps the fastest, and its "
    "compile time includes all of that. `graphopt-O2-int8-<backend>` is `-O2,int8` calibrated on "
    "8 random batches; on the CPU, under a backend other than aten, with `int8{measure=false}` "
    "(the int8 pass's own speed check times graphopt's reference int8 ops, not the engine's)."
)

GPU_TARGETS = (
    "generated pointwise and norm kernels at 64M elements against device-to-device copy "
    "bandwidth (target: at least 90%; `graphopt bench --device cuda --kernels yes`)",
    "GEMM with fused epilogue against cuBLAS GEMM plus a separate epilogue on BERT-base and "
    "GPT-2 shapes (target: faster; the same run)",
    "graphopt -O2 fp16 with `backend=auto` (`graphopt-O2-fp16-auto`) and `-O2,int8` with "
    "`auto` end to end against `torch.compile-fp16` on the zoo and on HF BERT-base and GPT-2 "
    "small, every backend in auto's table (target: no slower; `tools/gpu_check.sh` measures "
    "them with the GPU-marked tests and writes docs/bench/gpu/)",
    "compile time of graphopt -O2 with `auto` against torch.compile on the same models "
    "(target: within 2x; the same script)",
)


def write_docs(page: Path, report: BenchReport, plots: Sequence[Path], args: Any) -> None:
    """Write ``page``: the command that reproduces this run (from ``args``), the method, the
    results with ``plots`` linked relative to the page, and what is left unmeasured."""
    rel = [os.path.relpath(p, page.parent) for p in plots]
    page.write_text(
        "# Benchmarks\n\n"
        "Written by `graphopt bench` (tools/bench/); every figure below was measured in the run it "
        "describes. GPU figures appear only after a run with `--device cuda` on a GPU machine "
        "(`tools/gpu_check.sh` writes them into [bench/gpu/](bench/gpu/results.md)); until then "
        "they are unmeasured.\n\n"
        f"Reproduce:\n\n```bash\n{reproduce_command(args)} --docs {page}\n```\n\n"
        f"{METHOD}\n\n"
        "## Latest run\n\n" + report.to_markdown(rel) + unmeasured_note(report)
    )


def reproduce_command(args: Any) -> str:
    """``graphopt bench`` with every option of ``args`` but ``--docs``, sorted, quoted where
    empty or spaced."""
    options = []
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command", "docs") or value is None or value is False:
            continue
        flag = f"--{key.replace('_', '-')}"
        if value is True:
            options.append(flag)
            continue
        options.append(
            f"{flag} {value!r}" if " " in str(value) or value == "" else f"{flag} {value}"
        )
    return "graphopt bench " + " ".join(options)


def unmeasured_note(report: BenchReport) -> str:
    """The GPU figures a CPU run leaves unmeasured, named so nobody mistakes them for measured."""
    if report.env.get("device_kind") != "cuda":
        items = "\n".join(f"- {t}" for t in GPU_TARGETS)
        return (
            "\n\n## Unmeasured in this run\n\nThis run had no GPU, so these GPU figures are "
            f"unmeasured (they come from `graphopt bench --device cuda`):\n\n{items}\n"
        )
    return ""
