"""Triton kernels and their host wrappers: the GEMMs with fused epilogues (gemm, int8_gemm), norms,
softmax, attention, the fused-group code generator (codegen, codegen_ops), the activation table
(activations, with its Triton side in epilogue) and graphopt's disk cache folder (cache).

May import: graphopt.errors, graphopt.ir.
"""
