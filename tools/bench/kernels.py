"""Micro-benchmarks of graphopt's hand-written kernels (``graphopt.kernels``) against their torch
baselines on a GPU; ``graphopt bench --kernels`` runs them.

Every measured output is first checked against a float64 reference computed from the same
inputs (``max_rel_err`` = max |out - ref| / max |ref|). Times are ``triton.testing.do_bench``
medians in milliseconds (it warms up, then flushes L2 before each repetition).

    (a) device-to-device copy at 64M fp16 and fp32 elements: the bandwidth ceiling;
    (b) layer_norm and rms_norm with a residual at 8192 x 8192 fp16, as achieved bandwidth and
        percent of the fp16 copy, against torch (``x + residual`` then ``F.layer_norm``/
        ``F.rms_norm``);
    (c) gemm.linear with fused epilogues against cuBLAS ``F.linear`` followed by the separate
        activation / residual add, on BERT-base and GPT-2-small FFN shapes in fp16;
    (d) attention against ``F.scaled_dot_product_attention`` with the flash backend;
    (e) int8_gemm.int8_matmul_i32 at 8192^3 against ``torch._int_mm`` with its second operand
        column-major (``w.t()`` of a row-major ``[N, K]`` weight) and row-major, in TOPS and
        percent of the faster ``_int_mm`` layout;
    (f) int8_gemm.int8_linear (per-token x per-channel scales, bias, gelu, fp16 out) on BERT-base
        FFN shapes against fp16 ``F.linear`` + ``F.gelu``; ``ms_with_quantize`` adds the
        per-token quantization of x;
    (g) int8_gemm.w8a16_linear at GPT-2-small decode shapes (M = 1) against fp16 ``F.linear``,
        as achieved bandwidth on the bytes each one must read.
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


def _int8_matmul_rows(device: str) -> list[dict[str, Any]]:
    from graphopt.kernels import int8_gemm

    m = n = k = 8192
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=device)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=device)  # nn.Linear layout
    w_row_major = w.t().contiguous()  # [K, N]
    candidates = {
        "ours": lambda: int8_gemm.int8_matmul_i32(x, w),
        "ours_wq_col_major": lambda: int8_gemm.int8_matmul_i32(x, w_row_major.t()),
        "int_mm_col_major": lambda: torch._int_mm(x, w.t()),
        "int_mm_row_major": lambda: torch._int_mm(x, w_row_major),
    }
    ref = x.double() @ w.double().T  # exact: every partial sum is below 2**53
    errs = {name: _rel_err(fn(), ref) for name, fn in candidates.items()}  # ours autotunes here
    del ref
    ms = {name: _ms(fn) for name, fn in candidates.items()}
    best = min(("int_mm_col_major", "int_mm_row_major"), key=ms.__getitem__)
    ops = 2.0 * m * n * k
    return [
        _row(
            "int8_matmul_i32", (m, k, n), torch.int8, ms["ours"], ms[best], errs["ours"],
            f"torch._int_mm, faster layout ({best.removeprefix('int_mm_').replace('_', '-')} B)",
            tops=ops / (ms["ours"] * 1e-3) / 1e12, baseline_tops=ops / (ms[best] * 1e-3) / 1e12,
            pct_of_best_int_mm=100.0 * ms[best] / ms["ours"],
            ms_wq_col_major=ms["ours_wq_col_major"],
            int_mm_col_major_ms=ms["int_mm_col_major"], int_mm_row_major_ms=ms["int_mm_row_major"],
            baseline_max_rel_err=max(errs["int_mm_col_major"], errs["int_mm_row_major"]),
        )
    ]  # fmt: skip


def _int8_linear_rows(device: str) -> list[dict[str, Any]]:
    from graphopt.kernels import int8_gemm

    cases = [
        # name, M, K, N
        ("bert-base ffn-up int8 bias+gelu", 32 * 128, 768, 3072),
        ("bert-base ffn-down int8 bias+gelu", 32 * 128, 3072, 768),
    ]
    rows = []
    for name, m, k, n in cases:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        w = torch.randn(n, k, device=device, dtype=torch.float16) / math.sqrt(k)
        b = torch.randn(n, device=device, dtype=torch.float16)
        xq, xs = int8_gemm.quantize_per_token(x)
        wq, ws = int8_gemm.quantize_per_token(w)  # per output channel

        def ours(xq=xq, xs=xs, wq=wq, ws=ws, b=b) -> torch.Tensor:
            return int8_gemm.int8_linear(xq, wq, xs, ws, b, "gelu", torch.float16)

        def with_quantize(x=x, wq=wq, ws=ws, b=b) -> torch.Tensor:
            xq, xs = int8_gemm.quantize_per_token(x)
            return int8_gemm.int8_linear(xq, wq, xs, ws, b, "gelu", torch.float16)

        def baseline(x=x, w=w, b=b) -> torch.Tensor:
            return F.gelu(F.linear(x, w, b))

        acc = xq.double() @ wq.double().T
        ref = F.gelu(acc * xs.double()[:, None] * ws.double()[None, :] + b.double())
        err = max(_rel_err(ours(), ref), _rel_err(with_quantize(), ref))  # ours autotunes here
        # the quantization error itself, against the fp16 layer computed in float64
        quant_err = _rel_err(ours(), F.gelu(x.double() @ w.double().T + b.double()))
        ms, base_ms, quant_ms = _ms(ours), _ms(baseline), _ms(with_quantize)
        ops = 2.0 * m * n * k
        rows.append(
            _row(
                name, (m, k, n), torch.int8, ms, base_ms, err, "fp16 cuBLAS F.linear + F.gelu",
                tops=ops / (ms * 1e-3) / 1e12, baseline_tflops=ops / (base_ms * 1e-3) / 1e12,
                ms_with_quantize=quant_ms, speedup_with_quantize=base_ms / quant_ms,
                quantization_rel_err=quant_err,
            )
        )  # fmt: skip
    return rows


def _w8a16_rows(device: str) -> list[dict[str, Any]]:
    from graphopt.kernels import int8_gemm

    cases = [
        # name, M, K, N
        ("gpt2-small qkv decode w8a16", 1, 768, 2304),
        ("gpt2-small ffn-up decode w8a16", 1, 768, 3072),
        ("gpt2-small ffn-down decode w8a16", 1, 3072, 768),
    ]
    rows = []
    for name, m, k, n in cases:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        w = torch.randn(n, k, device=device, dtype=torch.float16) / math.sqrt(k)
        b = torch.randn(n, device=device, dtype=torch.float16)
        wq, ws = int8_gemm.quantize_per_token(w)  # per output channel

        def ours(x=x, wq=wq, ws=ws, b=b) -> torch.Tensor:
            return int8_gemm.w8a16_linear(x, wq, ws, b)

        def baseline(x=x, w=w, b=b) -> torch.Tensor:
            return F.linear(x, w, b)

        ref = x.double() @ (wq.double() * ws.double()[:, None]).T + b.double()
        err = _rel_err(ours(), ref)  # the first call also autotunes
        ms, base_ms = _ms(ours), _ms(baseline)
        io = 2 * (m * k + n + m * n)  # x, bias and y in fp16
        moved, base_moved = n * k + 4 * n + io, 2 * n * k + io  # + the int8 weight and scales
        rows.append(
            _row(
                name, (m, k, n), torch.float16, ms, base_ms, err, "fp16 cuBLAS F.linear",
                gbps=moved / (ms * 1e-3) / 1e9, baseline_gbps=base_moved / (base_ms * 1e-3) / 1e9,
                split_k=float(int8_gemm.choose_split_k(m, n, k, x.device)),
            )
        )  # fmt: skip
    return rows


def kernel_benchmarks(device: str = "cuda") -> list[dict[str, Any]]:
    """Runs benchmarks (a)-(g) of the module docstring and returns one dict per measurement.

    Each dict has ``name, shape, dtype, ms, baseline_ms, speedup, max_rel_err, baseline`` and
    one throughput: ``gbps`` (copy, norms with ``pct_of_copy`` and ``baseline_gbps`` on the same
    logical bytes; w8a16 with ``baseline_gbps`` on the bytes each side reads), ``tflops`` and
    ``baseline_tflops`` (fp16 GEMM, attention) or ``tops`` (int8: tera integer multiply-adds x 2;
    with ``baseline_tops`` or, against an fp16 baseline, ``baseline_tflops``).
    Raises ``GraphoptError`` without a CUDA GPU.
    """
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise GraphoptError("kernel benchmarks need a CUDA GPU")
    torch.manual_seed(0)
    rows, copy_gbps = _copy_rows(device)
    rows += _norm_rows(device, copy_gbps[torch.float16])
    rows += _gemm_rows(device)
    rows += _attention_rows(device)
    rows += _int8_matmul_rows(device)
    rows += _int8_linear_rows(device)
    rows += _w8a16_rows(device)
    return rows


UNMEASURED_NOTE = (
    "Unmeasured in this run: the kernel microbenchmarks (generated pointwise and norm "
    "kernels against copy bandwidth at 64M elements, GEMM with fused epilogue against "
    "cuBLAS plus a separate epilogue, attention against SDPA) run with `--device cuda`."
)


def kernel_results(wanted: str, device: str) -> tuple[list[dict[str, Any]], str]:
    """``kernel_benchmarks(device)`` and no note, or no rows and the note saying why they are
    unmeasured. ``wanted`` is ``--kernels``: yes, no, or auto (on cuda only)."""
    if wanted == "no" or (wanted == "auto" and device != "cuda"):
        return [], UNMEASURED_NOTE
    return kernel_benchmarks(device), ""
