"""The model zoo: graphopt's one model registry, for the demo, the CLI, the tests and the benchmarks.

Every entry is a factory ``(batch: int, ...) -> (model, example_inputs)`` with deterministic random
weights and inputs; nothing is downloaded. ``ZOO`` holds graphopt's own small models (with
non-trivial batch-norm statistics, so folding them is a real rewrite); ``EXTERNAL`` holds full-size
models built from torchvision and Hugging Face transformers configs, which raise
``ModelUnavailable`` where their package is missing. ``get`` builds any of them by name.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from graphopt.errors import GraphoptError


def _randomize_norms(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


# -- CNNs ---------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetSmall(nn.Module):
    """ResNet-style CNN: stem, three stages of residual blocks with batch norm, pooled head."""

    def __init__(self, width: int = 16, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for i in range(blocks):
                layers.append(BasicBlock(cin, width * mult, 2 if (i == 0 and stage > 0) else 1))
                cin = width * mult
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, with ReLU6 and batch norm."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetSmall(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6()
        )
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, 1),
            InvertedResidual(width, width * 2, 2),
            InvertedResidual(width * 2, width * 2, 1),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(width * 2, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1).flatten(1)
        return self.head(y)


# -- transformers -------------------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        if self.causal:
            keep = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if mask is not None:
            scores = scores + (1.0 - mask[:, None, None, :].to(scores.dtype)) * -1e4
        attn = self.drop(scores.softmax(-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class TransformerLayer(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.attn = Attention(dim, heads, causal)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(0.1)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:  # GPT-2
            x = x + self.attn(self.ln1(x), mask)
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x, mask))  # BERT
        return self.ln2(x + self.mlp(x))


class BertEncoder(nn.Module):
    """BERT-style encoder: token + position + segment embeddings, post-norm layers, pooler."""

    def __init__(
        self, vocab: int = 1000, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32
    ) -> None:
        super().__init__()
        self.tok, self.pos, self.seg = (
            nn.Embedding(vocab, dim),
            nn.Embedding(seq, dim),
            nn.Embedding(2, dim),
        )
        self.ln = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, False, False) for _ in range(layers)
        )
        self.pool = nn.Linear(dim, dim)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.ln(self.tok(ids) + self.pos(pos) + self.seg(torch.zeros_like(ids)))
        for layer in self.layers:
            x = layer(x, attention_mask)
        return {"last_hidden_state": x, "pooler_output": torch.tanh(self.pool(x[:, 0]))}


class GptDecoder(nn.Module):
    """GPT-style decoder: causal pre-norm layers and a language-model head tied to the embedding."""

    def __init__(
        self, vocab: int = 1000, dim: int = 64, heads: int = 4, layers: int = 2, seq: int = 32
    ) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, True, True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x) @ self.tok.weight.t()


class Mlp(nn.Module):
    """MLP with batch norm after each hidden linear layer (BatchNorm1d) and dropout."""

    def __init__(self, dims: tuple[int, ...] = (128, 256, 256, 10)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-2], dims[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(), nn.Dropout(0.1)]
        layers.append(nn.Linear(dims[-2], dims[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# -- registry -----------------------------------------------------------------------------------

Factory = Callable[..., tuple[nn.Module, tuple[Any, ...]]]


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _randomize_norms(build(), seed=1)


def _images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))


def _tokens(batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(2))


def resnet(batch: int = 4, image: int = 32) -> tuple[nn.Module, tuple[Any, ...]]:
    return _seeded(ResNetSmall), (_images(batch, image),)


def mobilenet(batch: int = 4, image: int = 32) -> tuple[nn.Module, tuple[Any, ...]]:
    return _seeded(MobileNetSmall), (_images(batch, image),)


def bert(batch: int = 4, seq: int = 32, layers: int = 2) -> tuple[nn.Module, tuple[Any, ...]]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[:, seq * 3 // 4 :] = 0
    return _seeded(lambda: BertEncoder(layers=layers, seq=seq)), (_tokens(batch, seq), mask)


def gpt(batch: int = 4, seq: int = 32, layers: int = 2) -> tuple[nn.Module, tuple[Any, ...]]:
    return _seeded(lambda: GptDecoder(layers=layers, seq=seq)), (_tokens(batch, seq),)


def mlp(batch: int = 16) -> tuple[nn.Module, tuple[Any, ...]]:
    return _seeded(Mlp), (torch.randn(batch, 128, generator=torch.Generator().manual_seed(2)),)


ZOO: dict[str, Factory] = {
    "resnet": resnet,
    "mobilenet": mobilenet,
    "bert": bert,
    "gpt": gpt,
    "mlp": mlp,
}


# -- full-size models from torchvision and transformers, built from their configs ----------------


class ModelUnavailable(GraphoptError):
    """A zoo model needs a package (torchvision, transformers) that cannot be imported here."""


def _package(module: str) -> Any:
    """``module`` imported, or ``ModelUnavailable`` naming the package and why it failed."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # not installed, or built for another torch
        package = module.partition(".")[0]
        raise ModelUnavailable(f"{package} unavailable ({type(exc).__name__}: {exc})") from None


def _seeded_as_built(build: Callable[[], nn.Module]) -> nn.Module:
    """Seeded like the zoo's own models, but with the library's initialization left as it is: the
    benchmark measures these architectures as their libraries build them."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


def resnet50(batch: int = 4, image: int = 224) -> tuple[nn.Module, tuple[Any, ...]]:
    tvm = _package("torchvision.models")
    return _seeded_as_built(lambda: tvm.resnet50(weights=None)), (_images(batch, image),)


def mobilenet_v3(batch: int = 4, image: int = 224) -> tuple[nn.Module, tuple[Any, ...]]:
    tvm = _package("torchvision.models")
    return _seeded_as_built(lambda: tvm.mobilenet_v3_large(weights=None)), (_images(batch, image),)


def bert_base(batch: int = 4, seq: int = 128) -> tuple[nn.Module, tuple[Any, ...]]:
    tf = _package("transformers")
    return _seeded_as_built(lambda: tf.BertModel(tf.BertConfig())), (_tokens(batch, seq),)


def gpt2(batch: int = 4, seq: int = 128) -> tuple[nn.Module, tuple[Any, ...]]:
    tf = _package("transformers")
    model = _seeded_as_built(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(use_cache=False)))
    return model, (_tokens(batch, seq),)


def vit_base(batch: int = 4) -> tuple[nn.Module, tuple[Any, ...]]:
    tf = _package("transformers")
    config = tf.ViTConfig()  # 224 x 224 images in 16 x 16 patches
    return _seeded_as_built(lambda: tf.ViTModel(config)), (_images(batch, config.image_size),)


EXTERNAL: dict[str, Factory] = {
    "resnet50": resnet50,
    "mobilenet_v3": mobilenet_v3,
    "bert-base": bert_base,
    "gpt2": gpt2,
    "vit-base": vit_base,
}

MODELS: dict[str, Factory] = {**ZOO, **EXTERNAL}


def get(name: str, **kwargs: Any) -> tuple[nn.Module, tuple[Any, ...]]:
    """Build a zoo model and example inputs: ``model, inputs = zoo.get("resnet", batch=8)``.

    Raises ``GraphoptError`` for an unknown name and ``ModelUnavailable`` where an ``EXTERNAL``
    model's package is missing.
    """
    if name not in MODELS:
        raise GraphoptError(f"unknown zoo model {name!r}; the zoo has {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
