"""Third-party architectures a new user compiles first (issue 16), built tiny with random weights:
Hugging Face Llama and the Whisper encoder, an EfficientViT-style block (its attention runs under
``torch.autocast(enabled=False)``), and a torchvision-style ResNet (in-place ReLU, ``out +=
identity``) that channel pruning must shrink. The T5 encoder is in test_soundness.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import graphopt
from graphopt.errors import CaptureError

LEVELS = ["-O1", "-O2", "-O3"]


def _outputs(out: Any) -> Any:
    """The tensors of a Hugging Face output (a ModelOutput is a dict), or ``out`` itself."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def _matches_at_every_level(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    with torch.no_grad():
        want = _outputs(model(*inputs))
    for level in LEVELS:
        compiled = graphopt.compile(model, inputs, pipeline=level)
        rolled = [r.name for r in compiled.report.records if r.status == "rolled back"]
        assert not rolled, f"{level}: rolled back {rolled}"
        got = _outputs(compiled(*inputs))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m, lv=level: f"{lv}: {m}")  # fmt: skip


def test_llama_at_every_level() -> None:
    import transformers  # the bench extra installs it; a missing one fails here, not skips

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaModel(config).eval()
    model.config.use_cache = False
    _matches_at_every_level(model, (torch.randint(0, 64, (2, 10)),))


def test_whisper_encoder_at_every_level() -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        num_mel_bins=16,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_layers=1,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        max_source_positions=20,
    )
    encoder = transformers.WhisperModel(config).get_encoder().eval()
    # Whisper's encoder takes exactly 2 * max_source_positions frames
    _matches_at_every_level(encoder, (torch.randn(2, 16, 40),))


class LiteMLA(nn.Module):
    """EfficientViT's lightweight attention: ReLU-kernel linear attention over the spatial
    positions, computed with autocast off as timm writes it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(x).reshape(b, 3, c, h * w)
        q, k, v = torch.relu(qkv[:, 0]), torch.relu(qkv[:, 1]), qkv[:, 2]
        with torch.autocast(device_type=x.device.type, enabled=False):
            q, k, v = q.float(), k.float(), v.float()
            v = nn.functional.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)
            out = torch.matmul(torch.matmul(v, k.transpose(-1, -2)), q)
            out = out[:, :-1] / (out[:, -1:] + 1e-15)
        return self.proj(out.reshape(b, c, h, w)) + x


def efficientvit_style() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.Hardswish(),
        LiteMLA(16),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()


def test_efficientvit_style_autocast_off_region_at_every_level() -> None:
    model = efficientvit_style()
    x = torch.randn(2, 3, 8, 8)
    # even with no pass: the float64 reference run once failed inside the wrapped region
    compiled = graphopt.compile(model, (x,), pipeline="")
    torch.testing.assert_close(compiled(x), model(x))
    assert not any("wrap_with" in str(n.target) for n in compiled.gm.graph.nodes)
    _matches_at_every_level(model, (x,))


def test_an_autocast_on_region_is_refused_not_compiled_differently() -> None:
    class Half(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                y = self.fc(x)
            return y.float() + 1

    with pytest.raises(CaptureError, match=r"autocast\(enabled=True\).*'precision' pass"):
        graphopt.compile(Half().eval(), (torch.randn(2, 8),))


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: in-place ReLU and an in-place residual add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def torchvision_style_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.SiLU(inplace=True),  # EfficientNet's in-place activation
        BasicBlock(64),
        BasicBlock(64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    for m in model.modules():  # trained-looking batch norms
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.1, 1.0)
            m.running_var.data.uniform_(0.5, 1.5)
    return model.eval()


def test_channel_pruning_shrinks_a_torchvision_style_resnet() -> None:
    """In-place consumers (relu_, silu_, add_) once made every group 'unsupported'; captured
    functional, they prune like their out-of-place forms."""
    model = torchvision_style_resnet()
    x = torch.randn(2, 3, 16, 16)
    pipeline = "-O1,prune{kind=channel,amount=0.3,min_cosine=0.5,measure=false}"
    compiled = graphopt.compile(model, (x,), pipeline=pipeline)
    (prune,) = [r for r in compiled.report.records if r.name == "prune"]
    assert prune.status == "ok", prune.message
    rows = prune.stats["layers"]
    pruned = [r for r in rows if r["status"] == "pruned"]
    # the stem + residual group and each block's inner conv: 64 -> 48 channels
    assert len(pruned) == 3 and all(r["channels"] == "64->48" for r in pruned), rows
    assert not any("unsupported consumer" in r.get("why", "") for r in rows)
    assert compiled(x).shape == (2, 10)
