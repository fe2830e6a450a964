"""The kernel benchmarks (``graphopt.kernels.bench``) refuse to run without a CUDA GPU."""

from __future__ import annotations

import pytest
import torch

from graphopt.errors import GraphoptError
from graphopt.kernels import bench


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without a GPU")
def test_kernel_benchmarks_need_a_cuda_gpu() -> None:
    with pytest.raises(GraphoptError, match="kernel benchmarks need a CUDA GPU"):
        bench.kernel_benchmarks()


def test_kernel_benchmarks_refuse_a_cpu_device() -> None:
    with pytest.raises(GraphoptError, match="kernel benchmarks need a CUDA GPU"):
        bench.kernel_benchmarks(device="cpu")


@pytest.mark.gpu
def test_kernel_benchmarks_on_gpu_report_every_measurement() -> None:
    rows = bench.kernel_benchmarks()
    names = [row["name"] for row in rows]
    # copy 2, norms 2, GEMM 4, attention 2, int8 matmul 1, int8 linear 2, w8a16 3
    assert names.count("copy") == 2 and len(rows) == 2 + 2 + 4 + 2 + 1 + 2 + 3
    for row in rows:
        assert {"name", "shape", "dtype", "ms", "baseline_ms", "speedup", "max_rel_err"} <= set(row)
        assert sum(k in row for k in ("gbps", "tflops", "tops")) == 1
        assert row["ms"] > 0 and row["max_rel_err"] < 2e-2, row
