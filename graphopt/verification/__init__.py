"""Verification: the interpreter, numerical contracts and metrics, and the verifier that judges
a graph against the float64 reference and localizes the node that broke it.

May import: graphopt.ir, graphopt.ops, graphopt.errors.
"""
