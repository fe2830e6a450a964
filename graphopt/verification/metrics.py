"""Error metrics between a computed tensor and its reference, shared by verification and bench."""

from __future__ import annotations

import math

import torch


def _pair(x: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.detach().to("cpu", torch.float64).flatten(), ref.detach().to(
        "cpu", torch.float64
    ).flatten()


def max_abs(x: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _pair(x, ref)
    return float((a - b).abs().max()) if a.numel() else 0.0


def rel_max(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: the rounding contract's error (scale-free, NaN-aware)."""
    a, b = _pair(x, ref)
    if a.numel() == 0:
        return 0.0
    if torch.isnan(a).ne(torch.isnan(b)).any():
        return math.inf
    a, b = torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
    scale = float(b.abs().max())
    err = float((a - b).abs().max())
    return err / scale if scale > 0 else err


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _pair(x, ref)
    denom = float(b.norm())
    num = float((a - b).norm())
    return num / denom if denom > 0 else num


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = _pair(x, ref)
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(a @ b) / (na * nb)


def sqnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    a, b = _pair(x, ref)
    noise = float((a - b).pow(2).sum())
    signal = float(b.pow(2).sum())
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def top1(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of rows (last dim = classes) whose argmax agrees with the reference."""
    if x.dim() == 0:
        return 1.0
    a = x.detach().to("cpu", torch.float64).reshape(-1, x.shape[-1]).argmax(-1)
    b = ref.detach().to("cpu", torch.float64).reshape(-1, ref.shape[-1]).argmax(-1)
    return float((a == b).double().mean()) if a.numel() else 1.0


METRICS = {
    "max_abs": max_abs,
    "rel_max": rel_max,
    "rel_l2": rel_l2,
    "rel_error": rel_l2,
    "cosine": cosine,
    "sqnr": sqnr,
    "top1": top1,
}

# The rounding contract's floor: the error a correct reordering may always cost, by dtype,
# as rel_max. About 64 ulps of the dtype's epsilon near 1.0.
ROUNDING_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def rounding_floor(dtype: torch.dtype) -> float:
    return ROUNDING_FLOOR.get(dtype, 0.0)
