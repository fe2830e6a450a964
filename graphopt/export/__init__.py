"""Export: the optimized graph written as ONNX.

May import: graphopt.frontends, graphopt.runtime, graphopt.ir, graphopt.ops, graphopt.errors.
"""
