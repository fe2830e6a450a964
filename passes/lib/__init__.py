"""Libraries shared by passes (not passes: nothing here registers one): fusion analysis, pattern
matching helpers, int8 calibration observers and the int8 plan, the channel-pruning dependency
analysis.

May import: the core stages (graphopt.ir, graphopt.ops, graphopt.verification, graphopt.pipeline).
"""
