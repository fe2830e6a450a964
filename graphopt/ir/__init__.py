"""The IR: an FX GraphModule of ATen and graphopt:: ops, its helpers, the rewriter every
pass edits through and the rule tables it applies (rules), model state threaded as data, and
the fused-program format.

May import: graphopt.errors only.
"""
