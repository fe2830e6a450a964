"""The same compile on a CUDA device (skipped without one, with the reason shown)."""

from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet", "bert"])
def test_compile_on_cuda_matches_eager(name: str) -> None:
    model, inputs = zoo.get(name, batch=4)
    model = model.cuda()
    inputs = tuple(x.cuda() for x in inputs)
    compiled = graphopt.compile(model, inputs)
    assert compiled.target == "cuda"
    for got, want in zip(pytree.tree_leaves(compiled(*inputs)), pytree.tree_leaves(model(*inputs))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
