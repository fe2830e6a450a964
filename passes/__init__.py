"""graphopt's built-in rewrite passes: one file per registered pass, named after it.

Importing this package registers every pass by name; ``passes/README.md`` states the invariants
each pass may assume and must keep. Libraries the passes share live in ``passes/lib``.

May import: the core stages (graphopt.ir, graphopt.ops, graphopt.verification,
graphopt.pipeline), never graphopt.tools.
"""

from graphopt.passes import (
    cse,
    dce,
    fold_bn,
    fold_constants,
    fuse_attention,
    fuse_epilogue,
    fuse_gelu,
    fuse_kernels,
    fuse_layernorm,
    fuse_pointwise,
    fuse_softmax,
    int8,
    lower_int8,
    precision,
    prune,
    remove_noops,
)
from graphopt.pipeline.passes import register_group

# The cleanup group runs to a fixed point: each pass can expose work for another
# (remove-noops exposes duplicates to cse, cse and folding leave dead nodes for dce).
register_group("cleanup", "remove-noops,fold-constants,cse,dce")

# Decomposed gelu, layer/RMS norm, softmax and attention back to single ATen ops; softmax
# before attention, which matches the fused softmax.
register_group("patterns", "fuse-gelu,fuse-layernorm,fuse-softmax,fuse-attention")

__all__ = [
    "cse",
    "dce",
    "fold_bn",
    "fold_constants",
    "fuse_attention",
    "fuse_epilogue",
    "fuse_gelu",
    "fuse_kernels",
    "fuse_layernorm",
    "fuse_pointwise",
    "fuse_softmax",
    "int8",
    "lower_int8",
    "precision",
    "prune",
    "remove_noops",
]
