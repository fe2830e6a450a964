"""The op registry (``graphopt.ops.registry``): every graphopt:: op is registered by ``define``
with the schema saved models and ONNX export depend on, lands in the tables compiled models and
passes read, and one call registers a new op with its schema, fake and CUDA form."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

import graphopt.ops  # noqa: F401  (registers torch.ops.graphopt)
from graphopt.ops import registry
from graphopt.ops.registry import (
    DIRECT,
    GRAPHOPT_OPS,
    IMPLS,
    REFERENCE_ONLY_ON_CPU,
    define,
    executable,
)

G = torch.ops.graphopt

# every graphopt op, in registration order, with its schema: these are what saved models and
# exported programs name, so a change here breaks files written by earlier versions
SCHEMAS = {
    "fused": "(Tensor[] xs, str program) -> Tensor[]",
    "linear": "(Tensor x, Tensor w, Tensor? b, Tensor? r, str act, float alpha) -> Tensor",
    "conv": "(Tensor x, Tensor w, Tensor? b, Tensor? r, SymInt[] stride, SymInt[] padding, "
    "SymInt[] dilation, SymInt groups, str act) -> Tensor",
    "norm": "(Tensor x, Tensor? w, Tensor? b, float eps, str kind) -> Tensor",
    "add_norm": "(Tensor x, Tensor r, Tensor? w, Tensor? b, float eps, str kind) -> "
    "(Tensor, Tensor)",
    "softmax": "(Tensor x, float scale, Tensor? mask) -> Tensor",
    "attention": "(Tensor q, Tensor k, Tensor v, Tensor? mask, float? scale, bool causal) -> Tensor",
    "quantize_per_tensor": "(Tensor x, float scale) -> Tensor",
    "dequantize_per_tensor": "(Tensor q, float scale, ScalarType dtype) -> Tensor",
    "dequantize_per_channel": "(Tensor q, Tensor scales, SymInt axis, ScalarType dtype) -> Tensor",
    "int8_linear": "(Tensor xq, float x_scale, Tensor wq, Tensor w_scale, Tensor? b, Tensor? r, "
    "str act, ScalarType dtype) -> Tensor",
    "int8_linear_requant": "(Tensor xq, float x_scale, Tensor wq, Tensor w_scale, Tensor? b, "
    "Tensor? r, str act, float out_scale) -> Tensor",
    "norm_quant": "(Tensor x, Tensor? w, Tensor? b, float eps, str kind, float scale) -> Tensor",
    "int8_conv1x1": "(Tensor xq, float x_scale, Tensor wq, Tensor w_scale, Tensor? b, Tensor? r, "
    "str act, ScalarType dtype) -> Tensor",
    "int8_linear_dynamic": "(Tensor x, Tensor wq, Tensor w_scale, Tensor? b, Tensor? r, str act) "
    "-> Tensor",
    "w8a16_linear": "(Tensor x, Tensor wq, Tensor w_scale, Tensor? b, Tensor? r, str act) -> Tensor",
    "sparse24_linear": "(Tensor x, Tensor w, Tensor? b) -> Tensor",
}


def _registered_graphopt_ops() -> set[str]:
    """The graphopt:: ops torch knows, less those the tests below define."""
    names = torch._C._dispatch_get_all_op_names()
    ops = {n.split("::")[1] for n in names if n.startswith("graphopt::")}
    return {n for n in ops if not n.startswith("test_")}


def test_every_op_keeps_its_name_and_schema() -> None:
    assert list(GRAPHOPT_OPS) == list(SCHEMAS) == list(IMPLS)
    for name, schema in SCHEMAS.items():
        assert str(GRAPHOPT_OPS[name]._schema) == f"graphopt::{name}{schema}"
        assert GRAPHOPT_OPS[name] is getattr(G, name).default


def test_every_graphopt_op_is_registered_through_define() -> None:
    assert _registered_graphopt_ops() == set(GRAPHOPT_OPS)
    assert set(DIRECT) == set(GRAPHOPT_OPS.values())


def test_reference_only_on_cpu() -> None:
    names = {name for name, op in GRAPHOPT_OPS.items() if op in REFERENCE_ONLY_ON_CPU}
    assert names == {"fused", "norm", "add_norm", "softmax", "attention"}


def test_cuda_forms() -> None:
    # a Triton kernel: the measured choice; an implementation of its own: that; none: the reference
    assert IMPLS["linear"].cuda() not in (IMPLS["linear"].reference, IMPLS["linear"].kernel)
    assert IMPLS["sparse24_linear"].cuda() is IMPLS["sparse24_linear"].own_cuda is not None
    assert IMPLS["conv"].cuda() is IMPLS["conv"].reference
    assert IMPLS["conv"].kernel is None and IMPLS["conv"].why_not() is not None
    assert IMPLS["norm"].why_not(None, None, None, 1e-5, "rms") is None


def test_executable_calls_the_ops_directly_with_the_same_results() -> None:
    class M(torch.nn.Module):
        def forward(self, x: Tensor, w: Tensor, b: Tensor) -> Tensor:
            y = G.linear.default(x, w, b, None, "gelu", 0.5)
            return G.sparse24_linear.default(y, w, None)

    gm = torch.fx.symbolic_trace(M())
    x, w, b = torch.randn(3, 4), torch.randn(4, 4), torch.randn(4)
    run = executable(gm)
    targets = [n.target for n in run.graph.nodes if n.op == "call_function"]
    assert (
        targets[0] is DIRECT[G.linear.default] and targets[-1] is DIRECT[G.sparse24_linear.default]
    )
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"][0] == G.linear.default
    assert torch.equal(run(x, w, b), gm(x, w, b))
    plain = torch.fx.symbolic_trace(lambda x: F.relu(x))
    assert executable(plain) is plain  # nothing to rewrite: the graph itself


@pytest.fixture
def fresh_tables(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Empty registry tables for ops a test defines (torch keeps the op registered)."""
    tables = {"IMPLS": {}, "GRAPHOPT_OPS": {}, "DIRECT": {}, "REFERENCE_ONLY_ON_CPU": set()}
    for name, table in tables.items():
        monkeypatch.setattr(registry, name, table)
    return tables


def _scale_ref(x: Tensor, s: float, w: Tensor | None) -> Tensor:
    """``x * s`` (times ``w`` when given)."""
    return x * s if w is None else x * s * w


def _scale_fake(x: Tensor, s: float, w: Tensor | None) -> Tensor:
    return torch.empty_like(x)


def test_define_registers_an_op_in_one_call(fresh_tables: dict[str, Any]) -> None:
    name = f"test_scale_{uuid.uuid4().hex[:8]}"
    op = define(name, _scale_ref, fake=_scale_fake, reference_only_on_cpu=True)
    overload = getattr(G, name).default
    assert str(overload._schema) == f"graphopt::{name}(Tensor x, float s, Tensor? w) -> Tensor"
    x = torch.randn(3, 5)
    assert torch.equal(op(x, 2.0, None), x * 2.0) and torch.equal(overload(x, 2.0, x), x * 2.0 * x)
    with FakeTensorMode() as mode:
        fake = overload(mode.from_tensor(x), 2.0, None)
    assert fake.shape == x.shape and fake.dtype == x.dtype
    impl = fresh_tables["IMPLS"][name]
    assert impl.reference is _scale_ref and impl.kernel is None
    assert fresh_tables["GRAPHOPT_OPS"][name] is overload
    assert torch.equal(fresh_tables["DIRECT"][overload](x, 3.0, None), x * 3.0)
    assert fresh_tables["REFERENCE_ONLY_ON_CPU"] == {overload}
    with pytest.raises(ValueError, match="defined twice"):
        define(name, _scale_ref, fake=_scale_fake)


def test_define_takes_a_kernel_or_an_own_cuda_form_not_both(fresh_tables: dict[str, Any]) -> None:
    name = f"test_both_{uuid.uuid4().hex[:8]}"
    with pytest.raises(ValueError, match="a Triton kernel or a CUDA implementation"):
        define(name, _scale_ref, fake=_scale_fake, kernel=_scale_ref, cuda=_scale_ref)
    assert name not in fresh_tables["IMPLS"]


@pytest.mark.parametrize(
    ("refusal", "enabled", "runs"),
    [(None, "1", "kernel"), ("odd shapes", "1", "reference"), (None, "0", "reference")],
)
def test_the_cuda_form_runs_the_kernel_only_where_it_takes_the_call_and_is_enabled(
    fresh_tables: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    refusal: str | None,
    enabled: str,
    runs: str,
) -> None:
    # as if the kernel had measured faster (no GPU here to measure on)
    monkeypatch.setattr(registry, "_kernel_is_faster", lambda key, ref, kernel, x: True)
    monkeypatch.setenv("GRAPHOPT_KERNELS", enabled)
    calls: list[tuple[Any, ...]] = []

    def kernel(x: Tensor, s: float, w: Tensor | None) -> Tensor:
        calls.append((x, s, w))
        return x * s

    def why_not(x: Tensor, s: float, w: Tensor | None) -> str | None:
        return refusal

    name = f"test_kernel_{uuid.uuid4().hex[:8]}"
    define(name, _scale_ref, fake=_scale_fake, kernel=kernel, why_not=why_not)
    x = torch.randn(4)
    assert torch.equal(fresh_tables["IMPLS"][name].cuda()(x, 2.0, None), x * 2.0)
    assert ("kernel" if calls else "reference") == runs
