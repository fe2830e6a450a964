"""Shared test set-up: GPU tests are skipped, with the reason shown, on machines without one.

Without a GPU, Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU
tensors. Triton reads the variable when a kernel is decorated, so it is set here, before any test
module imports ``graphopt.kernels``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernel files and measured choices go to a fresh folder per test session, never to ~/.cache.
os.environ.setdefault("GRAPHOPT_CACHE_DIR", tempfile.mkdtemp(prefix="graphopt-test-cache-"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
