"""fuse-gelu, fuse-layernorm, fuse-softmax, fuse-attention: golden IR, rewrite counts, error
against float64 within the rounding contract, near misses, and the zoo's attention blocks."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from graphopt import zoo
from graphopt.frontends.capture import capture
from graphopt.pipeline.manager import PassManager
from graphopt.testing import PassRun, assert_golden, assert_rounding, run_pipeline

GOLDEN = Path(__file__).parent / "golden"
SQRT2 = math.sqrt(2.0)
K_TANH = math.sqrt(2.0 / math.pi)


def _calls(run: PassRun) -> list[Any]:
    return [n for n in run.after.graph.nodes if n.op == "call_function"]


def _targets(run: PassRun) -> list[str]:
    return [str(n.target) for n in _calls(run)]


def _misses(run: PassRun, rule: str) -> list[str]:
    return [why for r in run.report.records if rule in r.rules for _, why in r.rules[rule].misses]


class Fn(nn.Module):
    """A module whose forward is ``fn(self, *inputs)``, with the given tensors as buffers."""

    def __init__(self, fn: Callable[..., Any], **tensors: torch.Tensor) -> None:
        super().__init__()
        self.fn = fn
        for name, value in tensors.items():
            self.register_buffer(name, value)

    def forward(self, x: torch.Tensor, y: Any = None, z: Any = None) -> Any:
        return self.fn(self, *(a for a in (x, y, z) if a is not None))


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- fuse-gelu ------------------------------------------------------------------------------------

ONNX = {  # an imported ONNX graph's constants: fp32 one-element weights
    "sqrt2": torch.tensor(SQRT2),
    "one": torch.tensor(1.0),
    "h": torch.tensor(0.5),
    "three": torch.tensor(3.0),
    "k": torch.tensor(K_TANH),
    "c": torch.tensor(0.044715),
}
ERF_CONSTANTS = {name: ONNX[name] for name in ("sqrt2", "one", "h")}
TANH_CONSTANTS = {name: ONNX[name] for name in ("three", "k", "c", "one", "h")}

GELU_ERF = {
    "x_half_div": lambda m, x: x * 0.5 * (1.0 + torch.erf(x / SQRT2)),
    "half_x_mul": lambda m, x: 0.5 * x * (1 + torch.erf(x * 0.7071067811865476)),
    "commuted": lambda m, x: (1 + torch.erf(0.7071067811865476 * x)) * x * 0.5,
    "div_by_2": lambda m, x: x * (torch.erf(x / SQRT2) + 1) / 2,
    "onnx": lambda m, x: (x * (torch.erf(x / m.sqrt2) + m.one)) * m.h,
}

GELU_TANH = {
    "pow": lambda m, x: 0.5 * x * (1 + torch.tanh(K_TANH * (x + 0.044715 * torch.pow(x, 3)))),
    "cube": lambda m, x: x * 0.5 * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x * x * x))),
    "factored": lambda m, x: 0.5 * x * (1 + torch.tanh(x * K_TANH * (1 + 0.044715 * x * x))),
    "onnx": lambda m, x: x * (torch.tanh((x + torch.pow(x, m.three) * m.c) * m.k) + m.one) * m.h,
}


@pytest.mark.parametrize("form", list(GELU_ERF))
def test_gelu_erf_forms(form: str) -> None:
    constants = ERF_CONSTANTS if form == "onnx" else {}
    run = run_pipeline(Fn(GELU_ERF[form], **constants), (_x(3, 5, 16),), "fuse-gelu")
    if form == "x_half_div":
        assert_golden(GOLDEN / "patterns_gelu_erf.txt", run.after)
    assert run.rewrites == 1
    assert _targets(run) == ["aten.gelu.default"] and _calls(run)[0].kwargs == {}
    assert not [n for n in run.after.graph.nodes if n.op == "get_attr"]  # constants went too
    assert_rounding(run)


@pytest.mark.parametrize("form", list(GELU_TANH))
def test_gelu_tanh_forms(form: str) -> None:
    constants = TANH_CONSTANTS if form == "onnx" else {}
    run = run_pipeline(Fn(GELU_TANH[form], **constants), (_x(3, 5, 16),), "fuse-gelu")
    if form == "pow":
        assert_golden(GOLDEN / "patterns_gelu_tanh.txt", run.after)
    assert run.rewrites == 1
    assert _targets(run) == ["aten.gelu.default"]
    assert _calls(run)[0].kwargs == {"approximate": "tanh"}
    assert not [n for n in run.after.graph.nodes if n.op == "get_attr"]
    assert_rounding(run)


def test_gelu_count_geglu_keeps_the_gate() -> None:
    def geglu(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=-1)
        gated = 0.5 * a * (1 + torch.erf(a / SQRT2)) * b  # gelu(a) * b: the * b stays
        return GELU_TANH["pow"](m, gated) * 3.0

    run = run_pipeline(Fn(geglu), (_x(3, 5, 16),), "fuse-gelu")
    assert run.rewrites == 2
    assert _targets(run).count("aten.gelu.default") == 2
    assert "aten.erf.default" not in _targets(run) and "aten.tanh.default" not in _targets(run)
    assert_rounding(run)


def test_gelu_near_misses() -> None:
    def wrong_constant(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 * (1.0 + torch.erf(x * 0.7071))  # not 1/sqrt(2) to fp32 precision

    def erf_escapes(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.erf(x / SQRT2)
        return x * 0.5 * (1.0 + e), e

    run = run_pipeline(Fn(wrong_constant), (_x(3, 16),), "fuse-gelu")
    assert run.rewrites == 0
    assert _misses(run, "gelu") == ["the erf argument is not x / sqrt(2) with x = %x"]
    run = run_pipeline(Fn(erf_escapes), (_x(3, 16),), "fuse-gelu")
    assert run.rewrites == 0
    assert _misses(run, "gelu") == ["intermediate %erf has other users"]
    run = run_pipeline(Fn(lambda m, x: x * torch.sigmoid(1.702 * x) * 2), (_x(3, 16),), "fuse-gelu")
    assert run.rewrites == 0 and not run.report.records[0].rules  # no erf: not even a near miss


# -- fuse-layernorm -------------------------------------------------------------------------------


def _centered(x: torch.Tensor) -> torch.Tensor:
    return x - x.mean(-1, keepdim=True)


def _ln_rsqrt_pow(m: Any, x: torch.Tensor) -> torch.Tensor:  # x - mean(x) written twice
    return _centered(x) * torch.rsqrt(_centered(x).pow(2).mean(-1, keepdim=True) + 1e-5) * m.w + m.b


def _ln_div_sqrt(m: Any, x: torch.Tensor) -> torch.Tensor:
    d = _centered(x)
    return d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5) * m.w + m.b


def _ln_var_commuted(m: Any, x: torch.Tensor) -> torch.Tensor:
    var = x.var(-1, keepdim=True, unbiased=False)
    return m.b + m.w * (_centered(x) * torch.rsqrt(1e-5 + var))


def _ln_dim_2_weight_only(m: Any, x: torch.Tensor) -> torch.Tensor:
    d = x - x.mean(2, keepdim=True)
    return d / ((d**2).mean(dim=[2], keepdim=True) + 1e-6) ** 0.5 * m.w


def _ln_no_affine(m: Any, x: torch.Tensor) -> torch.Tensor:
    d = _centered(x)
    return d / torch.sqrt((d * d).mean(-1, keepdim=True) + 1e-5)


def _ln_bias_only(m: Any, x: torch.Tensor) -> torch.Tensor:
    d = _centered(x)
    return d * torch.rsqrt((d * d).mean(-1, keepdim=True) + 1e-5) + m.b


def _ln_onnx(m: Any, x: torch.Tensor) -> torch.Tensor:
    """ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add; constants as weights."""
    d = _centered(x)
    return d / torch.sqrt(torch.pow(d, m.two).mean(-1, keepdim=True) + m.eps) * m.w + m.b


LAYERNORMS = {  # form -> (forward, has weight, has bias)
    "rsqrt_pow": (_ln_rsqrt_pow, True, True),
    "div_sqrt": (_ln_div_sqrt, True, True),
    "var_commuted": (_ln_var_commuted, True, True),
    "dim_2_weight_only": (_ln_dim_2_weight_only, True, False),
    "no_affine": (_ln_no_affine, False, False),
    "bias_only": (_ln_bias_only, False, True),
    "onnx": (_ln_onnx, True, True),
}

WB = {"w": _x(16, seed=1), "b": _x(16, seed=2)}
ONNX_NORM = {"two": torch.tensor(2.0), "eps": torch.tensor(1e-5)}


@pytest.mark.parametrize("form", list(LAYERNORMS))
def test_layernorm_forms(form: str) -> None:
    fn, weight, bias = LAYERNORMS[form]
    constants = ONNX_NORM if form == "onnx" else {}
    run = run_pipeline(Fn(fn, **WB, **constants), (_x(3, 5, 16) * 2 + 1,), "fuse-layernorm")
    (ln,) = _calls(run)
    if form == "rsqrt_pow":  # x - mean(x) written twice: no cse needed
        assert_golden(GOLDEN / "patterns_layernorm.txt", run.after)
        assert ln.meta["graphopt"] == {
            "pass": "fuse-layernorm",
            "from": ["mean", "sub", "mean_1", "sub_1", "pow_1", "mean_2", "add", "rsqrt"]
            + ["mul", "mul_1", "add_1"],
            "replaces": "add_1",
        }
    assert run.rewrites == 1
    assert ln.target == torch.ops.aten.layer_norm.default and ln.args[1] == [16]
    assert (ln.args[2] is not None, ln.args[3] is not None) == (weight, bias)
    assert_rounding(run)


RMSNORMS = {
    "llama": lambda m, x: m.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
    "no_weight_div": lambda m, x: x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6),
}


@pytest.mark.parametrize("form", list(RMSNORMS))
def test_rmsnorm_forms(form: str) -> None:
    run = run_pipeline(Fn(RMSNORMS[form], w=WB["w"]), (_x(3, 5, 16),), "fuse-layernorm")
    if form == "llama":
        assert_golden(GOLDEN / "patterns_rmsnorm.txt", run.after)
    assert run.rewrites == 1
    (rms,) = _calls(run)
    assert rms.target == torch.ops.aten.rms_norm.default and rms.args[3] == 1e-6
    assert (rms.args[2] is not None) == (form == "llama")
    assert_rounding(run)


def test_layernorm_count_keeps_residual_and_gate() -> None:
    def two_norms(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ln = LAYERNORMS["no_affine"][0](m, x) + x  # residual: a 3-D operand is no bias
        return RMSNORMS["no_weight_div"](m, ln) * y  # a gate is no weight

    run = run_pipeline(Fn(two_norms), (_x(3, 5, 16), _x(3, 5, 16, seed=1)), "fuse-layernorm")
    assert run.rewrites == 2
    targets = _targets(run)
    assert targets.count("aten.layer_norm.default") == targets.count("aten.rms_norm.default") == 1
    assert "aten.add.Tensor" in targets and "aten.mul.Tensor" in targets
    assert_rounding(run)


def test_layernorm_near_misses() -> None:
    def var_escapes(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = _centered(x)
        var = (d * d).mean(-1, keepdim=True)
        return d * torch.rsqrt(var + 1e-5) * m.w + m.b, var  # the variance is an output too

    def over_dim_1(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        d = x - x.mean(1, keepdim=True)
        return d * torch.rsqrt((d * d).mean(1, keepdim=True) + 1e-5)

    def unbiased(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _centered(x) * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)

    def eps_outside_sqrt(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return _centered(x) / (x.std(-1, keepdim=True) + 1e-5)

    run = run_pipeline(Fn(var_escapes, **WB), (_x(3, 16),), "fuse-layernorm")
    assert run.rewrites == 0
    assert run.report.records[0].rules["layernorm"].misses == [
        ("add_1", "intermediate %mean_1 has other users")
    ]
    _, why = (
        run_pipeline(Fn(over_dim_1), (_x(3, 4, 16),), "fuse-layernorm")
        .report.records[0]
        .rules["layernorm"]
        .misses[0]
    )
    assert why == "%mean reduces over dims [1], not the last dim only"
    run = run_pipeline(Fn(unbiased), (_x(3, 16),), "fuse-layernorm")
    assert _misses(run, "layernorm") == ["%var is not the biased variance of %x"]
    run = run_pipeline(Fn(eps_outside_sqrt), (_x(3, 16),), "fuse-layernorm")
    assert run.rewrites == 0 and not run.report.records[0].rules


# -- fuse-softmax ---------------------------------------------------------------------------------


def _exp_over_sum(e: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return e / e.sum(dim, keepdim=True)


SOFTMAXES = {  # form -> (forward, softmax dim)
    "amax": (lambda m, x: _exp_over_sum(torch.exp(x - x.amax(-1, keepdim=True))), -1),
    "max_values": (lambda m, x: _exp_over_sum(torch.exp(x - x.max(-1, keepdim=True).values)), -1),
    "unstabilized": (lambda m, x: _exp_over_sum(torch.exp(x)), -1),
    "dim_1": (lambda m, x: _exp_over_sum(torch.exp(x - x.amax(1, keepdim=True)), 1), 1),
}


@pytest.mark.parametrize("form", list(SOFTMAXES))
def test_softmax_forms(form: str) -> None:
    fn, dim = SOFTMAXES[form]
    run = run_pipeline(Fn(fn), (_x(3, 5, 16) * 4,), "fuse-softmax,dce")
    if form == "amax":
        assert_golden(GOLDEN / "patterns_softmax.txt", run.after)
    assert run.report.records[0].rewrites == 1
    assert [(n.target, n.args[1]) for n in _calls(run)] == [(torch.ops.aten.softmax.int, dim)]
    assert_rounding(run)


def test_softmax_near_miss_exp_escapes() -> None:
    def exp_escapes(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return _exp_over_sum(e), e

    run = run_pipeline(Fn(exp_escapes), (_x(3, 16),), "fuse-softmax")
    assert run.rewrites == 0
    assert _misses(run, "softmax") == ["intermediate %exp has other users"]


# -- fuse-attention -------------------------------------------------------------------------------


class Attention(nn.Module):
    """Hand-written attention in several forms; q, k, v are (batch, heads, tokens, dim)."""

    def __init__(self, form: str, tokens: int = 6) -> None:
        super().__init__()
        self.form, self.t = form, tokens
        self.drop = nn.Dropout(0.1)
        if form == "causal_buffer":  # nanoGPT's lower-triangular buffer, sliced to the length
            self.register_buffer("tril", torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any = None) -> Any:
        probs = self.drop(F.softmax(self.scores(q, k, mask), dim=-1))
        out = probs @ v
        return (out, probs) if self.form == "probs_escape" else out

    def scores(self, q: torch.Tensor, k: torch.Tensor, mask: Any) -> torch.Tensor:
        form, t = self.form, self.t
        if form == "q_scaled_permute":
            return (q * 0.25) @ k.permute(0, 1, 3, 2)
        if form == "mask_before_scale":
            return (q @ k.transpose(-2, -1) + mask) * 0.25
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if form == "additive":
            return scores + mask
        if form == "causal":
            return scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        if form == "causal_buffer":
            return scores.masked_fill(self.tril[:, :, :t, :t] == 0, float("-inf"))
        if form == "bool_keep":
            return scores.masked_fill(~mask, float("-inf"))
        if form == "causal_and_padding":
            causal = ~torch.ones(t, t, dtype=torch.bool).tril()
            return scores.masked_fill(causal, float("-inf")) + mask
        if form == "fill_minus_1e9":
            return scores.masked_fill(~mask, -1e9)
        return scores


def _qkv(mask: Any = None, b: int = 2, h: int = 3, t: int = 6, e: int = 16) -> tuple[Any, ...]:
    q, k, v = (_x(b, h, t, e, seed=i) for i in range(3))
    return (q, k, v) if mask is None else (q, k, v, mask)


KEEP = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(5)) > 0.4
KEEP[..., 0] = True  # no row is fully masked
PAD = torch.zeros(2, 1, 1, 6).masked_fill(torch.tensor([False] * 4 + [True] * 2), -1e4)

ATTENTIONS = {  # form -> (inputs, expected SDPA mask kwargs)
    "additive": (_qkv(PAD), {"attn_mask": "mask"}),
    "causal": (_qkv(), {"is_causal": True}),
    "causal_buffer": (_qkv(), {"is_causal": True}),
    "bool_keep": (_qkv(KEEP), {"attn_mask": "mask"}),
    "causal_and_padding": (_qkv(PAD), {"attn_mask": "where_scalar_self"}),
    "q_scaled_permute": (_qkv(), {}),
}


@pytest.mark.parametrize("form", list(ATTENTIONS))
def test_attention_forms(form: str) -> None:
    inputs, masks = ATTENTIONS[form]
    run = run_pipeline(Attention(form), inputs, "fuse-attention")
    if form in ("additive", "causal"):
        assert_golden(GOLDEN / f"patterns_attention_{form}.txt", run.after)
    assert run.rewrites == 1
    (sdpa,) = [n for n in _calls(run) if "scaled_dot_product" in str(n.target)]
    kwargs = {k: getattr(v, "name", v) for k, v in sdpa.kwargs.items()}
    assert kwargs == {**masks, "scale": 0.25}
    assert not {"aten.softmax.int", "aten.dropout.default"} & set(_targets(run))
    assert_rounding(run)


def test_attention_3d_bmm_after_fuse_softmax() -> None:
    def attend(m: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(q, k.transpose(1, 2)) * 0.125
        e = torch.exp(scores - scores.amax(-1, keepdim=True))
        return torch.bmm(_exp_over_sum(e), v)

    q, k, v = (_x(4, 5, 64, seed=i) for i in range(3))
    run = run_pipeline(Fn(attend), (q, k, v), "patterns")
    assert run.rewrites == 2  # the softmax, then the attention
    assert _targets(run) == ["aten.scaled_dot_product_attention.default"]
    assert_rounding(run)


@pytest.mark.parametrize(
    "form, inputs, why",
    [
        (
            "fill_minus_1e9",
            _qkv(KEEP),
            "%masked_fill masks the scores with -1000000000.0, not -inf",
        ),
        ("mask_before_scale", _qkv(PAD), "additive mask %add is applied before the scale"),
        ("probs_escape", _qkv(), "intermediate %dropout has other users"),
    ],
)
def test_attention_near_misses(form: str, inputs: tuple[Any, ...], why: str) -> None:
    run = run_pipeline(Attention(form), inputs, "fuse-attention")
    assert run.rewrites == 0
    assert _misses(run, "attention") == [why]


@cache
def _zoo_capture(name: str) -> tuple[Any, list[Any]]:
    model, inputs = zoo.get(name, batch=2, seq=16)
    return capture(model, inputs), list(inputs)


@pytest.mark.parametrize("name", ["bert", "gpt"])
@pytest.mark.parametrize("pipeline", ["fuse-attention", "remove-noops,fuse-attention"])
def test_zoo_attention_blocks_fused(name: str, pipeline: str) -> None:
    """Both attention blocks, with the eval-mode dropout still there or removed by cleanup."""
    gm, inputs = _zoo_capture(name)
    after, report = PassManager(pipeline, on_fail="raise").run(gm, inputs)
    run = PassRun(gm, after, report, inputs)
    record = report.records[-1]
    assert record.rewrites == 2 and record.status == "ok"  # verified within the contract
    sdpa = [n for n in _calls(run) if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2
    if name == "gpt":
        assert all(n.kwargs == {"is_causal": True, "scale": 0.25} for n in sdpa)
    else:  # bert: the padding mask, additive
        assert all(set(n.kwargs) == {"attn_mask", "scale"} for n in sdpa)
    assert "aten.softmax.int" not in _targets(run)  # nor the dropout after it
    if pipeline == "fuse-attention":
        assert_rounding(run)


# -- the patterns group ---------------------------------------------------------------------------


class DecomposedBlock(nn.Module):
    """A pre-norm transformer block with every pattern written out by hand."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.ln_w, self.ln_b = nn.Parameter(torch.rand(dim) + 0.5), nn.Parameter(torch.randn(dim))
        self.rms_w = nn.Parameter(torch.rand(dim) + 0.5)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = LAYERNORMS["rsqrt_pow"][0](SimpleNamespace(w=self.ln_w, b=self.ln_b), x)
        q, k, v = self.qkv(h).reshape(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
        s = s.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=x.device).tril(), -math.inf)
        p = SOFTMAXES["amax"][0](self, s)
        x = x + self.proj((p @ v).transpose(1, 2).reshape(b, t, d))
        h = RMSNORMS["llama"](SimpleNamespace(w=self.rms_w), x)
        return x + self.fc2(GELU_TANH["cube"](self, self.fc1(h)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patterns_group_on_a_decomposed_block(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = DecomposedBlock().to(dtype)
    run = run_pipeline(model, (_x(2, 8, 16).to(dtype),), "cleanup,patterns")
    fused = {r.name: r.rewrites for r in run.report.records if r.name.startswith("patterns:")}
    assert fused == {
        "patterns:fuse-gelu": 1,
        "patterns:fuse-layernorm": 2,  # the layer norm and the RMS norm
        "patterns:fuse-softmax": 1,
        "patterns:fuse-attention": 1,
    }
    ops = {"exp", "erf", "tanh", "rsqrt", "sqrt", "mean", "amax", "pow", "softmax"}
    assert not ops & {str(n.target).removeprefix("aten.").split(".")[0] for n in _calls(run)}
    assert run.report.records[-1].status == "ok"  # verified within the rounding contract
