"""Execution: the module graphopt.compile returns (input checks, state write-back), save/load,
and recovery fine-tuning. The graphopt/backends stage will sit beside it.

May import: graphopt.frontends, graphopt.ir, graphopt.ops, graphopt.pipeline, graphopt.errors.
"""
