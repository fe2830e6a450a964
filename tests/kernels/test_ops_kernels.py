"""Each graphopt op's Triton kernel against the op's own ATen reference, through the same
``Impl`` table the CUDA implementation dispatches with (Triton's interpreter on the CPU here;
the GPU there). This checks the plumbing between the ops (graphopt/ops/fused.py, int8.py,
registered through graphopt/ops/registry.py) and kernels/."""

from __future__ import annotations

import pytest
import torch

from graphopt.ir.program import Call, Program, Ref
from graphopt.ops.fused import IMPLS, program_of

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _r(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_GEN).to(dtype).to(DEVICE)


_GEN = torch.Generator().manual_seed(0)


def _program() -> str:
    # y = sigmoid(x * 2 + b); layer-norm-like row reduction of y
    calls = (
        Call("aten.mul.Tensor", (Ref("in", 0), 2.0)),
        Call("aten.add.Tensor", (Ref("node", 0), Ref("in", 1))),
        Call("aten.sigmoid.default", (Ref("node", 1),)),
        Call("aten.mean.dim", (Ref("node", 2), (-1,), True)),
        Call("aten.sub.Tensor", (Ref("node", 2), Ref("node", 3))),
    )
    return Program(2, calls, (Ref("node", 2), Ref("node", 4))).to_json()


def _cases(dtype: torch.dtype) -> list[tuple[str, tuple]]:
    x, r = _r(5, 33, dtype=dtype), _r(5, 33, dtype=dtype)
    w, b = _r(33, dtype=dtype), _r(33, dtype=dtype)
    q, k, v = (_r(1, 2, 7, 16, dtype=dtype) for _ in range(3))
    mask = _r(1, 1, 7, 7, dtype=dtype)
    xq = torch.randint(-127, 128, (5, 33), generator=_GEN, dtype=torch.int8).to(DEVICE)
    wq = torch.randint(-127, 128, (19, 33), generator=_GEN, dtype=torch.int8).to(DEVICE)
    w_scale = (torch.rand(19, generator=_GEN) / 100 + 1e-3).to(DEVICE)
    xq4 = torch.randint(-127, 128, (2, 33, 3, 5), generator=_GEN, dtype=torch.int8).to(DEVICE)
    wq4 = wq.reshape(19, 33, 1, 1)
    return [
        ("fused", ([x, b], _program())),
        (
            "linear",
            (x, _r(19, 33, dtype=dtype), _r(19, dtype=dtype), _r(5, 19, dtype=dtype), "gelu", 0.5),
        ),
        ("norm", (x, w, b, 1e-5, "layer")),
        ("norm", (x, w, None, 1e-6, "rms")),
        ("add_norm", (x, r, w, b, 1e-5, "layer")),
        ("add_norm", (x, r, w, None, 1e-6, "rms")),
        ("softmax", (x, 0.25, _r(1, 33, dtype=dtype))),
        ("softmax", (x, 1.0, torch.rand(5, 33, generator=_GEN).to(DEVICE) > 0.2)),
        ("attention", (q, k, v, mask, None, False)),
        ("attention", (q, k, v, None, 0.3, True)),
        ("quantize_per_tensor", (x, 0.02)),
        ("int8_linear", (xq, 0.02, wq, w_scale, _r(19, dtype=dtype), None, "relu", dtype)),
        ("int8_linear_dynamic", (x, wq, w_scale, None, _r(5, 19, dtype=dtype), "gelu")),
        ("w8a16_linear", (x, wq, w_scale, _r(19, dtype=dtype), None, "silu")),
        ("int8_linear_requant", (xq, 0.02, wq, w_scale, _r(19, dtype=dtype), None, "none", 0.5)),
        ("int8_conv1x1", (xq4, 0.02, wq4, w_scale, _r(19, dtype=dtype), None, "relu", dtype)),
        ("norm_quant", (x, w, b, 1e-5, "layer", 0.03)),
        ("norm_quant", (x, w, None, 1e-6, "rms", 0.03)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kernel_matches_reference(dtype: torch.dtype) -> None:
    for name, args in _cases(dtype):
        impl = IMPLS[name]
        if impl.why_not(*args) is not None:  # fp32 GEMMs stay with cuBLAS by design
            assert name in ("linear", "w8a16_linear") and dtype == torch.float32
            continue
        want, got = impl.reference(*args), impl.kernel(*args)
        want = want if isinstance(want, (list, tuple)) else [want]
        got = got if isinstance(got, (list, tuple)) else [got]
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype, name
            if g.dtype == torch.int8:  # requantized codes: one step apart at most, at ties
                assert (g.int() - w.int()).abs().max() <= 1, name
                continue
            torch.testing.assert_close(g, w, rtol=TOL[dtype], atol=TOL[dtype], msg=name)


def test_every_op_has_a_case() -> None:
    covered = {name for name, _ in _cases(torch.float32)}
    no_kernel = {name for name, impl in IMPLS.items() if impl.kernel is None}
    # ATen everywhere, or (sparse24_linear) a CUDA implementation of the op's own
    assert no_kernel == {
        "conv",
        "dequantize_per_tensor",
        "dequantize_per_channel",
        "sparse24_linear",
    }
    assert covered == set(IMPLS) - no_kernel
    assert all(IMPLS[name].why_not() is not None for name in no_kernel)


def test_program_text_round_trips() -> None:
    text = _program()
    assert program_of(text).to_json() == text
