"""The kernel microbenchmarks (``graphopt.tools.bench.kernels``): they refuse to run without a
CUDA GPU, ``--kernels`` chooses whether they run, and on a GPU every measurement is reported."""

from __future__ import annotations

import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.tools.bench import kernels


def test_the_harness_lives_in_tools_not_in_kernels() -> None:
    with pytest.raises(ModuleNotFoundError):
        __import__("graphopt.kernels.bench")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_kernel_benchmarks_need_a_cuda_gpu() -> None:
    with pytest.raises(GraphoptError, match="kernel benchmarks need a CUDA GPU"):
        kernels.kernel_benchmarks()


def test_kernel_benchmarks_refuse_a_cpu_device() -> None:
    with pytest.raises(GraphoptError, match="kernel benchmarks need a CUDA GPU"):
        kernels.kernel_benchmarks(device="cpu")


def test_kernels_option_auto_leaves_them_unmeasured_on_the_cpu_and_says_so() -> None:
    for wanted in ("auto", "no"):
        rows, note = kernels.kernel_results(wanted, "cpu")
        assert rows == [] and note.startswith("Unmeasured in this run") and "--device cuda" in note
    assert kernels.kernel_results("no", "cuda") == ([], kernels.UNMEASURED_NOTE)
    with pytest.raises(GraphoptError, match="need a CUDA GPU"):  # yes: asked for, so not skipped
        kernels.kernel_results("yes", "cpu")


@pytest.mark.gpu
def test_kernel_benchmarks_on_gpu_report_every_measurement() -> None:
    rows = kernels.kernel_benchmarks()
    names = [row["name"] for row in rows]
    # copy 2, norms 2, GEMM 4, attention 2, int8 matmul 1, int8 linear 2, w8a16 3
    assert names.count("copy") == 2 and len(rows) == 2 + 2 + 4 + 2 + 1 + 2 + 3
    for row in rows:
        assert {"name", "shape", "dtype", "ms", "baseline_ms", "speedup", "max_rel_err"} <= set(row)
        assert sum(k in row for k in ("gbps", "tflops", "tops")) == 1
        assert row["ms"] > 0 and row["max_rel_err"] < 2e-2, row
