"""Micro-benchmarks of graphopt's hand-written kernels against their torch baselines on a GPU.

Every measured output is first checked against a float64 reference computed from the same
inputs (``max_rel_err`` = max |out - ref| / max |ref|). Times are ``triton.testing.do_bench``
medians in milliseconds (it warms up, then flushes L2 before each repetition).

    (a) device-to-device copy at 64M fp16 and fp32 elements: the bandwidth ceiling;
    (b) layer_norm and rms_norm with a residual at 8192 x 8192 fp16, as achieved bandwidth and
        percent of the fp16 copy, against torch (``x + residual`` then ``F.layer_norm``/
        ``F.rms_norm``);
    (c) gemm.linear with fused epilogues against cuBLAS ``F.linear`` followed by the separate
        activation / residual add, on BERT-base and GPT-2-small FFN shapes in fp16;
    (d) attention against ``F.scaled_dot_product_attention`` with the flash backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from graphopt.errors import GraphoptError

_COPY_ELEMENTS = 64 * 1024 * 1024
_NORM_SHAPE = (8192, 8192)  # 64M elements
_EPS = 1e-5


def _ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = (out.double() - ref).abs().max()
    return float(err / ref.abs().max().clamp_min(1e-300))


def _row(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    ms: float,
    baseline_ms: float,
    max_rel_err: float,
    baseline: str,
    **metrics: float,
) -> dict[str, Any]:
    return {
        "name": name,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "ms": ms,
        "baseline_ms": baseline_ms,
        "speedup": baseline_ms / ms,
        "max_rel_err": max_rel_err,
        "baseline": baseline,
        **metrics,
    }


def _copy_rows(device: str) -> tuple[list[dict[str, Any]], dict[torch.dtype, float]]:
    rows, gbps_by_dtype = [], {}
    for dtype in (torch.float16, torch.float32):
        src = torch.randn(_COPY_ELEMENTS, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        dst.copy_(src)
        err = _rel_err(dst, src.double())  # 0 for a correct copy
        ms = _ms(lambda dst=dst, src=src: dst.copy_(src))
        gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9  # read + write
        gbps_by_dtype[dtype] = gbps
        rows.append(
            _row(
                "copy", tuple(src.shape), dtype, ms, ms, err, "itself", gbps=gbps, pct_of_copy=100.0
            )
        )
    return rows, gbps_by_dtype


def _norm_rows(device: str, copy_gbps: float) -> list[dict[str, Any]]:
    from graphopt.kernels import norms

    dtype = torch.float16
    x = torch.randn(_NORM_SHAPE, device=device, dtype=dtype)
    res = torch.randn_like(x)
    n = x.shape[-1]
    w = torch.randn(n, device=device, dtype=dtype)
    b = torch.randn(n, device=device, dtype=dtype)
    s64 = x.double() + res.double()
    cases = [
        (
            "layer_norm+residual",
            lambda: norms.layer_norm(x, w, b, _EPS, res),
            lambda: F.layer_norm(x + res, (n,), w, b, _EPS),
            lambda: F.layer_norm(s64, (n,), w.double(), b.double(), _EPS),
        ),
        (
            "rms_norm+residual",
            lambda: norms.rms_norm(x, w, _EPS, res),
            lambda: F.rms_norm(x + res, (n,), w, _EPS),
            lambda: F.rms_norm(s64, (n,), w.double(), _EPS),
        ),
    ]
    rows = []
    for name, ours, baseline, reference in cases:
        y, s = ours()
        assert s is not None
        err = max(_rel_err(y, reference()), _rel_err(s, s64))
        ms, base_ms = _ms(ours), _ms(baseline)
        moved = 4 * x.numel() * x.element_size()  # x and residual in; y and s out
        gbps = moved / (ms * 1e-3) / 1e9
        rows.append(
            _row(
                name, tuple(x.shape), dtype, ms, base_ms, err, "torch: x + residual, then the norm",
                gbps=gbps, pct_of_copy=100.0 * gbps / copy_gbps,
                baseline_gbps=moved / (base_ms * 1e-3) / 1e9,
            )
        )  # fmt: skip
    return rows


def _gemm_rows(device: str) -> list[dict[str, Any]]:
    from graphopt.kernels import gemm

    dtype = torch.float16
    cases = [
        # name, M, K, N, activation, residual
        ("bert-base ffn-up bias+gelu", 32 * 128, 768, 3072, "gelu", False),
        ("bert-base ffn-down bias+residual", 32 * 128, 3072, 768, "none", True),
        ("gpt2-small ffn-up bias+gelu_tanh", 8 * 512, 768, 3072, "gelu_tanh", False),
        ("gpt2-small ffn-down bias+residual", 8 * 512, 3072, 768, "none", True),
    ]
    torch_act: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "none": lambda t: t,
        "gelu": F.gelu,
        "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    }
    rows = []
    for name, m, k, n, act, with_res in cases:
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / math.sqrt(k)
        b = torch.randn(n, device=device, dtype=dtype)
        r = torch.randn(m, n, device=device, dtype=dtype) if with_res else None
        f = torch_act[act]

        def ours(x=x, w=w, b=b, r=r, act=act) -> torch.Tensor:
            return gemm.linear(x, w, b, act, r)

        def baseline(x=x, w=w, b=b, r=r, f=f) -> torch.Tensor:
            y = f(F.linear(x, w, b))
            return y + r if r is not None else y

        ref = f(x.double() @ w.double().T + b.double())
        if r is not None:
            ref = ref + r.double()
        err = _rel_err(ours(), ref)  # the first call also autotunes
        ms, base_ms = _ms(ours), _ms(baseline)
        flops = 2.0 * m * n * k
        rows.append(
            _row(
                name, (m, k, n), dtype, ms, base_ms, err, "cuBLAS F.linear + separate epilogue ops",
                tflops=flops / (ms * 1e-3) / 1e12, baseline_tflops=flops / (base_ms * 1e-3) / 1e12,
            )
        )  # fmt: skip
    return rows


def _attention_rows(device: str) -> list[dict[str, Any]]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from graphopt.kernels import attention

    dtype = torch.float16
    cases = [
        # name, B, H, T, D, causal
        ("bert-base attention", 32, 12, 128, 64, False),
        ("gpt2-small causal attention", 8, 12, 512, 64, True),
    ]
    rows = []
    for name, b, h, t, d, causal in cases:
        q, k, v = (torch.randn(b, h, t, d, device=device, dtype=dtype) for _ in range(3))

        def ours(q=q, k=k, v=v, causal=causal) -> torch.Tensor:
            return attention.attention(q, k, v, causal=causal)

        def baseline(q=q, k=k, v=v, causal=causal) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
        err = _rel_err(ours(), ref)  # the first call also autotunes
        ms = _ms(ours)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            base_ms = _ms(baseline)
        # Two matmuls of B*H*T*T*D multiply-adds; causal attention needs about half of them.
        flops = 4.0 * b * h * t * t * d * (0.5 if causal else 1.0)
        rows.append(
            _row(
                name, (b, h, t, d), dtype, ms, base_ms, err, "F.scaled_dot_product_attention (flash)",
                tflops=flops / (ms * 1e-3) / 1e12, baseline_tflops=flops / (base_ms * 1e-3) / 1e12,
            )
        )  # fmt: skip
    return rows


def kernel_benchmarks(device: str = "cuda") -> list[dict[str, Any]]:
    """Runs benchmarks (a)-(d) of the module docstring and returns one dict per measurement.

    Each dict has ``name, shape, dtype, ms, baseline_ms, speedup, max_rel_err, baseline`` and
    ``gbps`` and ``pct_of_copy`` (copy, norms; norms also ``baseline_gbps``, on the same
    logical bytes) or ``tflops`` and ``baseline_tflops`` (GEMM, attention). Raises ``GraphoptError`` without a CUDA GPU.
    """
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise GraphoptError("kernel benchmarks need a CUDA GPU")
    torch.manual_seed(0)
    rows, copy_gbps = _copy_rows(device)
    rows += _norm_rows(device, copy_gbps[torch.float16])
    rows += _gemm_rows(device)
    rows += _attention_rows(device)
    return rows
