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


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_o2_on_cuda_fuses_and_matches_eager(name: str) -> None:
    """-O2 on the GPU: fusions measured on the device, kernels chosen per shape, outputs equal."""
    model, inputs = zoo.get(name, batch=4)
    model = model.cuda()
    inputs = tuple(x.cuda() for x in inputs)
    compiled = graphopt.compile(model, inputs, pipeline="-O2", on_fail="raise")
    for got, want in zip(pytree.tree_leaves(compiled(*inputs)), pytree.tree_leaves(model(*inputs))):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet", "bert", "gpt"])
def test_o2_fp16_on_cuda_stays_close(name: str) -> None:
    from graphopt.pipeline.parse import half_pipeline

    model, inputs = zoo.get(name, batch=4)
    model = model.cuda()
    inputs = tuple(x.cuda() for x in inputs)
    pipeline = half_pipeline("-O2", "fp16", 0.999)
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    for got, want in zip(pytree.tree_leaves(compiled(*inputs)), pytree.tree_leaves(model(*inputs))):
        cos = torch.nn.functional.cosine_similarity(
            got.double().flatten(), want.double().flatten(), 0
        )
        assert cos >= 0.999
