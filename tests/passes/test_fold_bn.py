"""fold-bn: golden IR, rewrite count, error against float64 within the rounding contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from graphopt.testing import assert_golden, assert_rounding, run_pipeline

GOLDEN = Path(__file__).parent / "golden"


def _stats(bn: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    for m in bn.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))
                m.bias.data.copy_(torch.randn(n, generator=g))
    return bn.eval()


class ConvBn(nn.Module):
    def __init__(self, bias: bool, dims: int = 2) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv = conv(3, 6, 3, padding=1, bias=bias)
        self.bn = norm(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_conv2d_bn_golden(bias: bool) -> None:
    model = _stats(ConvBn(bias))
    run = run_pipeline(model, (torch.randn(2, 3, 7, 9),), "fold-bn")
    assert_golden(GOLDEN / f"fold_bn_conv2d_{'bias' if bias else 'no_bias'}.txt", run.after)
    assert run.rewrites == 1
    assert_rounding(run)
    # the model's own weights are untouched
    assert model.conv.weight.shape == (6, 3, 3, 3) and model.bn.running_var.min() > 0.09


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_conv3d_bn(dims: int) -> None:
    shape = {1: (2, 3, 11), 3: (2, 3, 4, 5, 3)}[dims]
    run = run_pipeline(_stats(ConvBn(True, dims)), (torch.randn(*shape),), "fold-bn")
    assert run.rewrites == 1
    assert not [n for n in run.after.graph.nodes if "batch_norm" in str(n.target)]
    assert_rounding(run)


class LinearBn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 4, bias=False)
        self.bn2 = nn.BatchNorm1d(4, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.fc2(self.bn(self.fc(x))))


def test_linear_bn_golden() -> None:
    run = run_pipeline(_stats(LinearBn()), (torch.randn(3, 5),), "fold-bn")
    assert_golden(GOLDEN / "fold_bn_linear.txt", run.after)
    assert run.rewrites == 2
    assert_rounding(run)
    info = [n.meta["graphopt"] for n in run.after.graph.nodes if n.op == "call_function"]
    assert info[0] == {
        "pass": "fold-bn",
        "from": ["linear", "batch_norm"],
        "replaces": "batch_norm",
    }


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return self.bn(y), y  # the conv's output is needed unnormalized too: no fold


def test_no_fold_when_conv_has_other_users() -> None:
    run = run_pipeline(_stats(SharedConv()), (torch.randn(2, 3, 4, 4),), "fold-bn")
    assert run.rewrites == 0


class NoTrainingBn(nn.Module):
    """The ONNX importer's form: aten._native_batch_norm_legit_no_training(...)[0]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        out = torch.ops.aten._native_batch_norm_legit_no_training.default(
            self.conv(x), bn.weight, bn.bias, bn.running_mean, bn.running_var, 0.1, 1e-5
        )
        return out[0]


def test_native_batch_norm_no_training_form() -> None:
    run = run_pipeline(_stats(NoTrainingBn()), (torch.randn(2, 3, 6, 6),), "fold-bn,dce")
    assert run.report.records[0].rewrites == 1
    assert not [n for n in run.after.graph.nodes if "batch_norm" in str(n.target)]
    assert_rounding(run)


def test_resnet_zoo_folds_every_bn() -> None:
    from graphopt import zoo

    model, inputs = zoo.get("resnet", batch=2)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    run = run_pipeline(model, inputs, "fold-bn")
    assert run.rewrites == n_bn
    assert_rounding(run)
