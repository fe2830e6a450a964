"""graphopt's built-in rewrite passes, one pass (or family) per file.

Importing this package registers every pass by name; ``passes/README.md`` states the invariants
each pass may assume and must keep.
"""

from graphopt.passes import cse, dce, fold_bn, fold_constants, remove_noops
from graphopt.passes_base import register_group

# The cleanup group runs to a fixed point: each pass can expose work for another
# (remove-noops exposes duplicates to cse, cse and folding leave dead nodes for dce).
register_group("cleanup", "remove-noops,fold-constants,cse,dce")

__all__ = ["cse", "dce", "fold_bn", "fold_constants", "remove_noops"]
