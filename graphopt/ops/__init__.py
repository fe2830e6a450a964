"""The op registry: graphopt:: custom ops (fused groups, norms, attention, GEMM epilogues, int8,
sparse), each registered by ``registry.define`` with a fake and an ATen reference and, on CUDA,
Triton kernels chosen by measurement (``autotune``). Importing the package registers every op.

May import: graphopt.kernels, graphopt.ir, graphopt.errors.
"""

from graphopt.ops import fused, int8, registry, sparse  # registers every graphopt:: op

__all__ = ["fused", "int8", "registry", "sparse"]
