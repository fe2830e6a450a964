"""``graphopt::sparse24_linear``: a linear layer whose weight has the 2:4 sparsity pattern.

``sparse24_linear(x, w, b) == F.linear(x, w, b)`` where ``w`` is the *dense* weight that already
holds the 2:4 pattern (at most 2 nonzeros in every 4 consecutive weights along the input dim).
On CUDA the weight is compressed once (``torch.sparse.to_sparse_semi_structured``, cached per
weight version) and the GEMM runs on the sparse tensor cores; everywhere else, and whenever the
compression or the sparse GEMM is not supported (dtype, shape, GPU), it is the dense ``F.linear``.
The graph therefore stays exportable: it holds an ordinary dense weight with exact zeros.
Registered by :func:`graphopt.ops.registry.define` with that CUDA implementation of its own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from graphopt.ops.registry import define

# dtypes the semi-structured kernels take; anything else stays dense without trying
SPARSE_DTYPES = (torch.float16, torch.bfloat16)

# (data_ptr, version, shape, dtype, device) -> compressed weight, or None when it cannot be
_COMPRESSED: dict[tuple[Any, ...], Any] = {}


def _key(w: Tensor) -> tuple[Any, ...]:
    # ``_version`` changes on every in-place write, so an edited weight is compressed again
    return (w.data_ptr(), w._version, tuple(w.shape), w.dtype, str(w.device))


def why_not_sparse(w: Tensor) -> str | None:
    """Why ``w`` cannot be compressed to the semi-structured format, or None (best effort: the
    conversion itself is the final judge)."""
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUTLASS

    if w.device.type != "cuda":
        return f"weights on {w.device.type}: the 2:4 sparse GEMM is CUDA-only"
    if w.dtype not in SPARSE_DTYPES:
        return f"{w.dtype} weights: the 2:4 sparse GEMM takes float16 or bfloat16"
    if w.dim() != 2:
        return "the weight is not 2-D"
    cls: Any = SparseSemiStructuredTensorCUTLASS
    if not SparseSemiStructuredTensor._FORCE_CUTLASS:
        from torch.sparse import SparseSemiStructuredTensorCUSPARSELT

        cls = SparseSemiStructuredTensorCUSPARSELT
    limits = cls._DTYPE_SHAPE_CONSTRAINTS.get(w.dtype)
    if limits is None:
        return f"{w.dtype} is not supported by {cls.__name__}"
    rows, cols = w.shape
    if rows % limits.sparse_min_rows or cols % limits.sparse_min_cols:
        return (
            f"weight {rows}x{cols} is not a multiple of "
            f"{limits.sparse_min_rows}x{limits.sparse_min_cols}"
        )
    return None


def compressed(w: Tensor) -> Any:
    """The semi-structured form of ``w`` (cached per weight version), or None when unsupported."""
    key = _key(w)
    if key not in _COMPRESSED:
        try:
            sparse = torch.sparse.to_sparse_semi_structured(w.detach())
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            sparse = None  # unsupported shape, dtype or GPU: the dense GEMM serves
        _COMPRESSED[key] = sparse
    return _COMPRESSED[key]


def _sparse24_linear_ref(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``F.linear(x, w, b)`` with ``w`` in the 2:4 pattern (the reference: dense)."""
    return F.linear(x, w, b)


def _sparse24_linear_fake(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _sparse24_linear_cuda(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    sparse = compressed(w) if w.dtype in SPARSE_DTYPES and x.dtype == w.dtype else None
    if sparse is not None:
        try:
            return F.linear(x, sparse, b)
        except (RuntimeError, ValueError, TypeError, NotImplementedError):
            _COMPRESSED[_key(w)] = None  # this GPU/shape cannot run it: dense from now on
    return F.linear(x, w, b)


# on CUDA the sparse GEMM whenever the weight compresses (the prune pass measured it faster
# before it lowered the layer), not a measured Triton kernel
sparse24_linear = define(
    "sparse24_linear", _sparse24_linear_ref, fake=_sparse24_linear_fake, cuda=_sparse24_linear_cuda
)
