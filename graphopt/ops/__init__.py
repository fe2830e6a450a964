"""The op registry: graphopt:: custom ops (fused groups, norms, attention, GEMM epilogues, int8,
sparse), each with a fake and an ATen reference and, on CUDA, Triton kernels chosen by measurement.

May import: graphopt.kernels, graphopt.ir, graphopt.errors.
"""

from graphopt.ops import fused, int8, sparse  # noqa: E402  (registers every graphopt:: op)

__all__ = ["fused", "int8", "sparse"]
