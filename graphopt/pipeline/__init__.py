"""The pass pipeline: what a pass is, the registry, the pipeline text, and the pass manager
that runs, times, checks and verifies every pass.

May import: graphopt.ir, graphopt.verification, graphopt.errors (never graphopt.passes).
"""
