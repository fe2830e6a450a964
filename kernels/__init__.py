"""Triton kernels and their host wrappers (see DESIGN.md, "Lowering and kernels").

Kernels land with the fusion work (issue 4); on ``target="cpu"`` graphopt needs none.
"""
