"""The IR: an FX GraphModule of ATen and graphopt:: ops, its helpers, the rewriter every
pass edits through, model state threaded as data, and the fused-program format.

May import: graphopt.errors only.
"""
