"""graphopt.compile end to end: zoo models, structure of outputs, dynamic batch, save/load."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo


def _close(got: object, want: object, tol: float = 1e-5) -> None:
    g, w = pytree.tree_leaves(got), pytree.tree_leaves(want)
    assert len(g) == len(w)
    for a, b in zip(g, w):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_zoo_model_at_O1_matches_eager_and_takes_other_batches(name: str) -> None:
    model, inputs = zoo.get(name, batch=2)
    compiled = graphopt.compile(model, inputs, pipeline="-O1")
    assert compiled.report.capture["dynamic_batch"] is True
    assert [r.status for r in compiled.report.records if r.status == "rolled back"] == []
    _close(compiled(*inputs), model(*inputs))
    _, other = zoo.get(name, batch=5)
    _close(compiled(*other), model(*other))


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_batch_one_example_still_gives_a_dynamic_batch(name: str) -> None:
    model, inputs = zoo.get(name, batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.StaticShapeWarning)
        compiled = graphopt.compile(model, inputs)
    assert compiled.report.capture["dynamic_batch"] is True
    _close(compiled(*inputs), model(*inputs))
    _, other = zoo.get(name, batch=3)
    _close(compiled(*other), model(*other))


def test_fold_bn_shrinks_the_cnn() -> None:
    model, inputs = zoo.get("resnet", batch=2)
    compiled = graphopt.compile(model, inputs)
    records = {r.name: r for r in compiled.report.records}
    assert records["fold-bn"].rewrites == sum(
        isinstance(m, nn.BatchNorm2d) for m in model.modules()
    )
    assert not [n for n in compiled.graph.nodes if "batch_norm" in str(n.target)]


def test_O_levels_parse_to_plain_pass_lists() -> None:
    assert graphopt.parse_pipeline("-O0") == []
    assert [item.spec() for item in graphopt.parse_pipeline("-O1")] == [
        "cleanup",
        "fold-bn",
        "cleanup",
    ]
    fusion = ["fuse-epilogue", "fuse-kernels", "fuse-pointwise", "cleanup"]
    o2 = [item.spec() for item in graphopt.parse_pipeline("-O2")]
    assert o2 == ["cleanup", "fold-bn", "patterns", "cleanup", *fusion]
    o3 = [item.spec() for item in graphopt.parse_pipeline("-O3")]
    assert o3[-2] == "fuse-pointwise{max_ops=64}"
    # a level expands in place inside a longer pipeline
    specs = [item.spec() for item in graphopt.parse_pipeline("-O1,fuse-epilogue")]
    assert specs == ["cleanup", "fold-bn", "cleanup", "fuse-epilogue"]


def test_model_is_not_mutated() -> None:
    model, inputs = zoo.get("resnet", batch=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graphopt.compile(model, inputs)
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    extra: tuple[torch.Tensor, torch.Tensor]


class Structured(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
        h = self.fc(x)
        return {"out": Out(h, (h.relu(), y * 2)), "pair": (h.sum(-1), y)}


def test_tuple_dict_and_dataclass_outputs_keep_their_structure() -> None:
    model = Structured().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    compiled = graphopt.compile(model, (x, y))
    got, want = compiled(x, y), model(x, y)
    assert isinstance(got, dict) and set(got) == {"out", "pair"}
    assert isinstance(got["out"], Out) and isinstance(got["pair"], tuple)
    _close(got, want)


class Kw(nn.Module):
    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return x * scale


def test_keyword_inputs() -> None:
    x, s = torch.randn(2, 3), torch.randn(2, 3)
    compiled = graphopt.compile(Kw(), (x,), example_kwargs={"scale": s})
    _close(compiled(x, scale=s), x * s)


class FixedBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(4, -1).sum(0)  # hard-codes the batch size


def test_static_fallback_is_stated_and_enforced() -> None:
    with pytest.warns(graphopt.StaticShapeWarning, match="static shapes"):
        compiled = graphopt.compile(FixedBatch(), (torch.randn(4, 3),))
    assert compiled.report.capture["dynamic_batch"] is False
    assert compiled.report.capture["static_reason"]
    with pytest.raises(graphopt.InputMismatchError, match=r"expected float32\[4, 3\]"):
        compiled(torch.randn(5, 3))


def test_save_load_roundtrip_runs_without_recompiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, inputs = zoo.get("mobilenet", batch=2)
    compiled = graphopt.compile(model, inputs)
    path = tmp_path / "m.graphopt"
    graphopt.save(compiled, path)

    def no_compile(*args: object, **kwargs: object) -> None:
        raise AssertionError("load must not recompile")

    monkeypatch.setattr(graphopt.api, "compile", no_compile)
    monkeypatch.setattr(graphopt.pipeline.manager.PassManager, "run", no_compile)
    loaded = graphopt.load(path)
    _close(loaded(*inputs), compiled(*inputs), tol=0)
    _, other = zoo.get("mobilenet", batch=3)
    _close(loaded(*other), model(*other))
    with pytest.raises(graphopt.InputMismatchError):
        loaded(other[0].double())


def test_save_load_structured_outputs(tmp_path: Path) -> None:
    model = Structured().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 2)
    compiled = graphopt.compile(model, (x, y))
    graphopt.save(compiled, tmp_path / "s.graphopt")
    got = graphopt.load(tmp_path / "s.graphopt")(x, y)
    assert isinstance(got["out"], Out)
    _close(got, model(x, y))


def test_max_rewrites_limits_the_whole_pipeline() -> None:
    model, inputs = zoo.get("resnet", batch=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", graphopt.EquivalenceWarning)
        none = graphopt.compile(model, inputs, max_rewrites=0)
        three = graphopt.compile(model, inputs, max_rewrites=3)
        full = graphopt.compile(model, inputs)
    assert sum(r.rewrites for r in none.report.records) == 0
    assert sum(r.rewrites for r in three.report.records) == 3
    assert sum(r.rewrites for r in full.report.records) > 3
    assert {r.status for r in none.report.records} == {"skipped"}
    _close(three(*inputs), model(*inputs))


def test_provenance_names_pass_and_original_nodes() -> None:
    model, inputs = zoo.get("mlp", batch=4)
    compiled = graphopt.compile(model, inputs)
    tagged = [n for n in compiled.graph.nodes if n.op == "call_function" and "graphopt" in n.meta]
    assert tagged and all(n.meta["graphopt"]["pass"] == "fold-bn" for n in tagged)
    assert all(len(n.meta["graphopt"]["from"]) == 2 for n in tagged)
    assert all("val" in n.meta for n in compiled.graph.nodes if n.op != "output")


def test_a_model_left_in_train_mode_is_warned_about_once_where_it_matters() -> None:
    """graphopt captures eval-mode behaviour; a model in train() mode whose batch norm or
    dropout would behave otherwise gets one TrainModeWarning naming them; one whose train()
    changes nothing (or an eval() model) gets none."""
    x = torch.randn(4, 3, 8, 8)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.1), nn.ReLU())
    with pytest.warns(graphopt.TrainModeWarning, match=r"in train\(\) mode.* 1, 2 use running"):
        compiled = graphopt.compile(net, (x,))
    assert net.training  # the user's flag is left as it was
    torch.testing.assert_close(compiled(x), net.eval()(x))
    for quiet in (net.eval(), nn.Sequential(nn.Linear(3, 3), nn.ReLU()).train()):
        with warnings.catch_warnings():
            warnings.simplefilter("error", graphopt.TrainModeWarning)
            graphopt.compile(
                quiet, (torch.randn(4, 3, 8, 8) if quiet is net else torch.randn(2, 3),)
            )


@pytest.mark.parametrize("backend", ["aten", "onnxruntime"])
def test_forward_hooks_still_run_on_the_fast_call_path(backend: str) -> None:
    """The compiled model skips nn.Module's call machinery only while no hook is registered."""
    model, inputs = zoo.get("mlp", batch=2)
    compiled = graphopt.compile(model, inputs, pipeline="-O1", backend=backend)
    seen: list[str] = []
    pre = compiled.register_forward_pre_hook(lambda m, a: seen.append("pre"))
    post = compiled.register_forward_hook(lambda m, a, out: seen.append("post"))
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    assert seen == ["pre", "post"]
    pre.remove()
    post.remove()
    torch.testing.assert_close(compiled(*inputs), model(*inputs))
    assert seen == ["pre", "post"]
