"""The zoo is the one model registry: the benchmark's full-size models (torchvision, Hugging Face
transformers) are zoo entries, built from their configs as the benchmark built them, seeded, and
reported unavailable where their package is missing."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest
import torch
import transformers as tf

from graphopt import zoo
from graphopt.errors import GraphoptError

BUILT_IN = ["resnet", "mobilenet", "bert", "gpt", "mlp"]
EXTERNAL = ["resnet50", "mobilenet_v3", "bert-base", "gpt2", "vit-base"]


def test_one_registry_holds_the_built_in_and_the_external_models() -> None:
    assert list(zoo.ZOO) == BUILT_IN  # what the CLI, the demo and the tests iterate over
    assert list(zoo.EXTERNAL) == EXTERNAL
    assert list(zoo.MODELS) == BUILT_IN + EXTERNAL
    with pytest.raises(
        GraphoptError, match="unknown zoo model 'vgg'; the zoo has resnet.*vit-base"
    ):
        zoo.get("vgg")


@pytest.mark.parametrize(
    "name, package",
    [("resnet50", "torchvision"), ("mobilenet_v3", "torchvision"), ("gpt2", "transformers")],
)
def test_a_missing_package_makes_the_model_unavailable(
    monkeypatch: pytest.MonkeyPatch, name: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, f"{package}.models", None)
    with pytest.raises(
        zoo.ModelUnavailable, match=f"^{package} unavailable \\(ModuleNotFoundError"
    ):
        zoo.get(name, batch=1)
    assert issubclass(zoo.ModelUnavailable, GraphoptError)


# what the benchmark built before the zoo held these models: torch.manual_seed(0), then the model
AS_BUILT_BEFORE: dict[str, Callable[[], torch.nn.Module]] = {
    "bert-base": lambda: tf.BertModel(tf.BertConfig()),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(use_cache=False)),
    "vit-base": lambda: tf.ViTModel(tf.ViTConfig()),
}


@pytest.mark.parametrize(
    "name, kwargs, input_shape",
    [
        ("bert-base", {"seq": 16}, (2, 16)),
        ("gpt2", {"seq": 16}, (2, 16)),
        ("vit-base", {}, (2, 3, 224, 224)),
    ],
)
def test_transformers_models_are_seeded_and_the_same_as_before(
    name: str, kwargs: dict[str, int], input_shape: tuple[int, ...]
) -> None:
    rng = torch.random.get_rng_state()
    model, inputs = zoo.get(name, batch=2, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), rng)  # seeded without touching the global RNG
    with torch.random.fork_rng():
        torch.manual_seed(0)
        before = AS_BUILT_BEFORE[name]()
    got, want = model.state_dict(), before.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not model.training
    (x,) = inputs
    assert tuple(x.shape) == input_shape
    if x.dtype == torch.long:  # token ids from the zoo's seeded generator
        assert 0 <= int(x.min()) and int(x.max()) < 1000
    else:
        assert x.dtype == torch.float32 and x.std() > 0.5
