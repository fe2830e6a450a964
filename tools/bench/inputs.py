"""Benchmark inputs: fresh random batches shaped like a model's example inputs (never zeros)."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree


def random_like(x: Any, generator: torch.Generator) -> Any:
    """A fresh input like ``x``: normal floats; ints drawn from x's own range (ids stay valid,
    0/1 masks stay masks)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if x.dtype == torch.bool or x.numel() == 0:
        return x.clone()
    lo, hi = int(x.min()), int(x.max())
    if hi - lo <= 1:
        return x.clone()
    return torch.randint(lo, hi + 1, x.shape, generator=generator, dtype=x.dtype).to(x.device)


def input_sets(inputs: tuple[Any, ...], n: int, seed: int = 0) -> list[tuple[Any, ...]]:
    """``n`` input tuples like ``inputs``, reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [pytree.tree_map(lambda x: random_like(x, g), inputs) for _ in range(n)]


def to_device(x: Any, device: str) -> Any:
    """``x`` with every tensor leaf moved to ``device``."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)
