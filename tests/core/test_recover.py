"""recover: distillation narrows the gap a pruned graph opened to its teacher, keeps pruned zeros
at zero, leaves the input module untouched, and rejects bad arguments."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import graphopt
from graphopt import zoo
from graphopt.runtime.compiled import CompiledModule

DIM, CLASSES = 128, 10


def _train_on_synthetic_task(model: nn.Module, steps: int = 150) -> None:
    """Adam on labelled synthetic data (labels: argmax of a fixed projection), so the teacher
    has real margins; random-init logits are near ties and any student would agree."""
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(DIM, CLASSES, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn(64, DIM, generator=g)
        loss = F.cross_entropy(model(x), (x @ proj).argmax(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _batches(n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(64, DIM, generator=g) for _ in range(n)]


def _weights(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return dict(gm.named_parameters()) | dict(gm.named_buffers())


def _pruned(model: nn.Module, inputs: tuple, amount: float = 0.6) -> CompiledModule:
    """The prune pass: the smallest ``amount`` of every linear weight zeroed (a loose budget,
    so the damaged model is kept for recovery to repair)."""
    pipeline = f"-O1,prune{{kind=unstructured,amount={amount},min_cosine=0.0}}"
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    assert compiled.report.records[-1].status == "ok"
    return compiled


def _gap(teacher: nn.Module, student: nn.Module) -> tuple[float, float]:
    """Mean KL(teacher || student) and top-1 disagreement on a held-out synthetic set."""
    kl = disagree = 0.0
    held_out = _batches(8, seed=7)
    with torch.no_grad():
        for x in held_out:
            t, s = teacher(x), student(x)
            kl += float(
                F.kl_div(
                    F.log_softmax(s, -1),
                    F.log_softmax(t, -1),
                    reduction="batchmean",
                    log_target=True,
                )
            )
            disagree += float((t.argmax(-1) != s.argmax(-1)).float().mean())
    return kl / len(held_out), disagree / len(held_out)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, CompiledModule, CompiledModule]:
    torch.manual_seed(0)
    model, inputs = zoo.get("mlp", batch=64)
    _train_on_synthetic_task(model)
    compiled = graphopt.compile(model, inputs, pipeline="-O1")
    return model, compiled, _pruned(model, inputs)


def test_recover_narrows_the_gap_and_keeps_pruned_zeros(setup) -> None:  # type: ignore[no-untyped-def]
    model, _, pruned = setup
    before = {k: v.detach().clone() for k, v in _weights(pruned.gm).items()}
    buffers = {k for k, _ in pruned.gm.named_buffers()}
    kl_before, disagree_before = _gap(model, pruned)
    assert kl_before > 0.05 and disagree_before > 0.05  # the pruning did real damage

    torch.manual_seed(0)
    recovered = graphopt.recover(pruned, model, _batches(16, seed=11), steps=150, progress=False)

    kl_after, disagree_after = _gap(model, recovered)
    assert kl_after <= 0.6 * kl_before  # measured: about 0.29x
    assert disagree_after < disagree_before  # measured: 0.16 -> 0.11
    after = _weights(recovered.gm)
    for name, w in before.items():
        if w.dim() == 2:  # the pruned weights: every zero is still zero, and training moved them
            assert bool((after[name][w == 0] == 0).all()), name
            assert float((w == 0).float().mean()) >= 0.59
            assert not torch.equal(after[name], w), name
    # the input is untouched and the result keeps its layout and metadata
    assert all(torch.equal(v, before[k]) for k, v in _weights(pruned.gm).items())
    assert {k for k, _ in recovered.gm.named_buffers()} == buffers
    assert recovered is not pruned and recovered.gm is not pruned.gm
    assert recovered.signature is pruned.signature and recovered.pipeline == pruned.pipeline
    assert recovered.report.records[-1].name == "recover"
    assert pruned.report.records[-1].name != "recover"
    x = _batches(1, seed=5)[0]
    assert torch.allclose(recovered(x), recovered.gm(x))  # the rebuilt executable is the new gm


def test_recover_cycles_a_one_shot_iterator_and_runs_the_task_loss(setup) -> None:  # type: ignore[no-untyped-def]
    model, _, pruned = setup
    calls: list[int] = []

    def task_loss(out: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return F.cross_entropy(out, model(batch).argmax(-1))

    def once() -> Iterator[torch.Tensor]:
        yield from _batches(2, seed=11)

    graphopt.recover(pruned, model, once(), steps=5, alpha=0.5, task_loss=task_loss)
    assert len(calls) == 5


def test_logits_are_the_first_floating_leaf() -> None:
    from graphopt.runtime.recover import _first_float

    @dataclass
    class Out:
        ids: torch.Tensor
        logits: torch.Tensor

    ids, logits = torch.zeros(2, dtype=torch.long), torch.randn(2, 3)
    assert _first_float(Out(ids, logits)) is logits
    assert _first_float({"ids": ids, "x": (ids, logits)}) is logits
    assert _first_float((ids,)) is None


def test_recover_errors(setup) -> None:  # type: ignore[no-untyped-def]
    model, _, pruned = setup
    data = _batches(1, seed=11)
    with pytest.raises(graphopt.GraphoptError, match="teacher must be a torch.nn.Module"):
        graphopt.recover(pruned, lambda x: x, data, progress=False)  # type: ignore[arg-type]
    with pytest.raises(graphopt.GraphoptError, match="`data` is empty"):
        graphopt.recover(pruned, model, [], progress=False)
    with pytest.raises(graphopt.GraphoptError, match="steps must be an int >= 1"):
        graphopt.recover(pruned, model, data, steps=0, progress=False)

    class IdsOnly(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.argmax(-1)

    ids_only = IdsOnly()
    compiled = graphopt.compile(ids_only, (data[0],), pipeline="-O1")
    with pytest.raises(graphopt.GraphoptError, match="no floating-point"):
        graphopt.recover(compiled, ids_only, data, steps=1, progress=False)
