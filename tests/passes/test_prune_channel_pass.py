"""prune{kind=channel} through the pass manager: every zoo model stays runnable and smaller,
and the pruning is reverted when the smaller graph does not measure faster."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.ir.graph import attr_path

PIPE = "-O1,prune{kind=channel,amount=0.3,min_cosine=0.0,measure=false}"


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_channel_pruning_keeps_every_zoo_model_runnable(name: str) -> None:
    model, inputs = zoo.get(name, batch=8)[:2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = graphopt.compile(model, inputs, pipeline=PIPE, on_fail="raise")
    record = compiled.report.records[-1]
    assert record.name == "prune" and record.status == "ok"
    assert record.stats["params_after"] < record.stats["params_before"]
    assert any(row["status"] == "pruned" for row in record.stats["layers"])
    text = compiled.report.to_text()
    assert "prune: per layer" in text and "sparsity" in text and "flops_after" in text
    want, got = model(*inputs), compiled(*inputs)
    for w, g in zip(pytree.tree_leaves(want), pytree.tree_leaves(got)):
        assert w.shape == g.shape and torch.isfinite(g).all()


def test_channel_pruning_not_faster_is_reverted(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.ops import autotune

    def pruned_slower(fns, device, reps=15):  # type: ignore[no-untyped-def]
        return {"aten": 1e-3, "fused": 2e-3}  # the policy times the dense graph as "aten"

    monkeypatch.setattr(autotune, "measure_all", pruned_slower)
    model, inputs = zoo.get("mlp", batch=8)[:2]
    pipeline = "-O1,prune{kind=channel,amount=0.5,min_cosine=0.0}"
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, on_fail="raise")
    record = compiled.report.records[-1]
    assert record.status == "unchanged" and record.rewrites == 0
    rows = [row for row in record.stats["layers"] if row["status"] != "skipped"]
    assert rows and all(row["status"] == "reverted" for row in rows)
    assert "not faster" in rows[0]["why"] and "2.000 ms" in rows[0]["why"]
    weights = [n for n in compiled.gm.graph.nodes if n.op == "get_attr"]
    shapes = {tuple(attr_path(compiled.gm, str(n.target)).shape) for n in weights}
    assert (256, 128) in shapes  # the first linear keeps all 256 outputs
