"""prune-channels: golden dependency groups and pruned IR, zoo models stay runnable and shrink,
pruning zero channels / heads keeps the function, each importance criterion runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.ir.graph import attr_path, format_graph
from graphopt.ir.rewriter import Rewriter
from graphopt.passes.lib.prune_channels import dependency_groups, format_groups, prune_channels

GOLDEN = Path(__file__).parent / "golden"


def _prune(gm: GraphModule, amount: float, **options: Any) -> list[dict[str, Any]]:
    rw = Rewriter(gm, "prune-channels")
    rows = prune_channels(gm, rw, amount=amount, **options)
    rw.finish()
    return rows


def _params(gm: GraphModule) -> int:
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return sum(attr_path(gm, t).numel() for t in targets)


def _check_golden(name: str, text: str) -> None:
    import os

    path = GOLDEN / f"prune_channels_{name}.txt"
    if os.environ.get("GRAPHOPT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
        return
    assert text == path.read_text(), f"differs from {path}:\n{text}"


# -- small graphs, one structure each -----------------------------------------------------------


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.down = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(torch.relu(y + self.down(x)))


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.head = nn.Conv2d(10, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(torch.cat([self.a(x), self.b(x)], 1)))


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.dw, self.bn = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)
        self.project = nn.Conv2d(8, 4, 1)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(nn.functional.relu6(self.bn(self.dw(torch.relu(self.expand(x))))))
        return self.grouped(y)


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


class AttentionOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = zoo.Attention(16, 4, causal=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def _image(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(0)),)


def _tokens(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 8, 16, generator=torch.Generator().manual_seed(0)),)


SMALL = {
    "residual": (Residual, _image),
    "concat": (Concat, _image),
    "depthwise": (Depthwise, _image),
    "flatten": (FlattenLinear, _image),
    "attention": (AttentionOnly, _tokens),
}


def _build(name: str) -> tuple[nn.Module, Any]:
    build, inputs = SMALL[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval(), inputs


@pytest.mark.parametrize("name", list(SMALL))
def test_groups_and_pruned_ir_golden(name: str) -> None:
    model, inputs = _build(name)
    gm = graphopt.capture(model, inputs())
    expected = model(*inputs())
    text = format_groups(dependency_groups(gm))
    rows = _prune(gm, 0.5)
    text += "--- pruned, amount=0.5, l1\n" + format_graph(gm)
    text += "".join(f"{r['layer']} {r['status']} {r['channels']} {r['why']}\n" for r in rows)
    _check_golden(name, text)
    for batch in (2, 3):  # runs at the captured and at another batch size, same output shape
        assert _leaves(gm(*inputs(batch)))[0].shape == model(*inputs(batch)).shape
    assert _leaves(gm(*inputs()))[0].shape == expected.shape


def test_expected_couplings() -> None:
    """Spot checks of the golden text's meaning: what is coupled and why things are not."""
    texts = {n: format_groups(dependency_groups(graphopt.capture(*_pair(n)))) for n in SMALL}
    residual = texts["residual"].split("channel group")
    # the residual add joins conv2, the downsample conv and the head's input into one group
    joined = next(g for g in residual if "conv2d_1.args[1] dim=0" in g)
    assert "out conv2d_2.args[1] dim=0" in joined and "in conv2d_3.args[1] dim=1" in joined
    assert "offsets=[4]" in texts["concat"]  # b's channels follow a's 4 in the cat
    assert "rep=25" in texts["flatten"]  # each channel is 5*5 features of fc
    assert "shape conv2d_1.args[6]" in texts["depthwise"]  # depthwise groups shrink too
    assert "grouped conv conv2d_3 (groups=2) not handled" in texts["depthwise"]  # groups=2
    assert "head group C=4 prunable" in texts["attention"]


def _pair(name: str) -> tuple[nn.Module, Any]:
    model, inputs = _build(name)
    return model, inputs()


# -- numerics: removing dead channels or heads keeps the function ---------------------------------


def test_dead_channels_pruned_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[0].weight[[1, 3, 4, 6]] = 0
    x = _image(2)
    gm = graphopt.capture(model, x)
    rows = _prune(gm, 0.5)
    assert [r["channels"] for r in rows] == ["8->4", "4->4"]
    torch.testing.assert_close(_leaves(gm(*x))[0], model(*x))
    conv = next(n for n in gm.graph.nodes if n.op == "call_function")
    assert conv.meta["val"].shape[1] == 4


def test_dead_head_pruned_exactly() -> None:
    model, inputs = _build("attention")
    attn = model.attn
    with torch.no_grad():  # head 2 of q, k and v: zero rows, zero bias
        for part in range(3):
            rows = slice(part * 16 + 2 * 4, part * 16 + 3 * 4)
            attn.qkv.weight[rows] = 0
            attn.qkv.bias[rows] = 0
    gm = graphopt.capture(model, inputs())
    rows = _prune(gm, 0.25)
    head = next(r for r in rows if r["kind"] == "head")
    assert head["channels"] == "4->3" and head["status"] == "pruned"
    assert head["params_after"] < head["params_before"]
    for batch in (2, 5):
        torch.testing.assert_close(_leaves(gm(*inputs(batch)))[0], model(*inputs(batch)))


# -- the zoo ----------------------------------------------------------------------------------------


def _leaves(out: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "bert", "gpt", "mlp"])
def test_zoo_stays_runnable_and_shrinks(name: str) -> None:
    kwargs: dict[str, Any] = {"layers": 1} if name in ("bert", "gpt") else {}
    model, inputs = zoo.get(name, **kwargs)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    gm = graphopt.capture(model, inputs)
    before = _params(gm)
    rows = _prune(gm, 0.3)
    assert any(r["status"] == "pruned" for r in rows)
    assert all(r["params_after"] <= r["params_before"] for r in rows)
    assert _params(gm) < before
    for batch in (zoo.get(name, **kwargs)[1], zoo.get(name, batch=3, **kwargs)[1]):
        got, want = _leaves(gm(*batch)), _leaves(model(*batch))
        assert [t.shape for t in got] == [t.shape for t in want]
    for node in gm.graph.nodes:  # metadata agrees with the new shapes
        if node.op == "get_attr":
            assert node.meta["val"].shape == attr_path(gm, str(node.target)).shape
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("importance", ["l1", "bn_gamma", "taylor"])
def test_importance_criteria(importance: str) -> None:
    model, inputs = zoo.get("mlp")
    gm = graphopt.capture(model, inputs)
    rows = _prune(gm, 0.3, importance=importance, inputs=inputs)
    # 256 - floor(0.3 * 256) = 180 kept, rounded up to a multiple of ALIGN (8): 184
    assert [r["channels"] for r in rows] == ["256->184", "256->184", "10->10"]
    assert _leaves(gm(*inputs))[0].shape == (16, 10)
    bn = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.batch_norm.default)
    gamma = attr_path(gm, str(bn.args[1].target))
    if importance == "bn_gamma":  # the 184 largest |gamma| survive
        kept = model.net[1].weight.detach().abs().sort(descending=True).values[:184]
        assert torch.equal(gamma.abs().sort(descending=True).values, kept)


def test_unknown_importance() -> None:
    model, inputs = zoo.get("mlp")
    gm = graphopt.capture(model, inputs)
    with pytest.raises(ValueError, match="unknown importance"):
        _prune(gm, 0.3, importance="random")
