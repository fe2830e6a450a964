"""int8 calibration: activation observers, per-channel weight quantization, ``calibrate``.

Convention (fixed for all of graphopt's int8): symmetric int8 in [-127, 127] with zero point 0.
A tensor's ``scale`` is ``threshold / 127``, where ``threshold`` is the clip value for ``|x|``:
``q = round(x / scale).clamp(-127, 127)`` (``torch.round``: half to even), ``x ~ q * scale``.

Activations get one scale per tensor from an observer that has watched the node's values on the
calibration batches:

    name         threshold
    minmax       max |x|
    percentile   the p-th percentile of |x| (default 99.99), from a histogram of |x|
    mse          argmin over candidate thresholds of the expected squared error (clip + round)
    entropy      TensorRT's KL-divergence calibration on the histogram of |x|

Calibration is a stream: each batch is run, observed and dropped, in one pass over the data.
Histogram observers count ``|x|`` on a grid that grows with the data (``Observer``): ``[0, R)``
with ``R`` the smallest power of two above ``max|x|``, cut into fine bins; when a batch widens
the range, ``R`` doubles and pairs of bins merge, which is exact. So the histogram of a data set
does not depend on how it was cut into batches or shards, and the observers of several processes
(each on its own shard) combine exactly: ``all_reduce_observers`` takes the MAX of the ranges and
the SUM of the histograms once every process has observed its shard. ``threshold()`` reads the
fine histogram as ``bins`` equal bins over ``[0, max|x|]``, the histogram the rules are defined on.

Weights are quantized per output channel with ``quantize_weight_per_channel``.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Node

from graphopt.errors import GraphoptError
from graphopt.ir.state import user_placeholders
from graphopt.verification.interpreter import Runner

QMAX = 127
# Smallest threshold a scale is computed from, so that a scale is never 0 (an all-zero tensor):
# zeros still quantize to 0 exactly, anything else saturates to +-127 * scale ~ 0. The same floor
# as graphopt's per-token activation scales. Quantize in float32: 1e-12 / 127 underflows float16.
MIN_THRESHOLD = 1e-12

# Fine histogram bins per bin of the histogram the thresholds are read from (at least half of them
# fall below amax): the error of spreading a fine bin's count evenly is a fraction of a fine bin.
OVERSAMPLE = 16

_LOW_PRECISION = (torch.float16, torch.bfloat16)
B = TypeVar("B")


def _abs_finite(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` flattened, without inf/nan, in float32 at least (bf16 cannot tell 2048 bins apart)."""
    a = x.detach().reshape(-1)
    a = a.float().abs() if a.dtype in _LOW_PRECISION else a.abs()
    finite = torch.isfinite(a)
    return a if bool(finite.all()) else a[finite]


class Observer:
    """Statistics of ``|x|`` for one tensor, gathered in one pass, and the clip threshold they
    imply.

    Protocol: ``observe(x)`` on every batch as it streams past; ``all_reduce_observers`` once
    when several processes calibrate, each on its own shard; then ``threshold()`` and
    ``scale()``. Non-finite values (inf, nan) are ignored: they have no int8 code, and an
    attention mask of -inf must not stretch the range.

    Histogram observers count ``|x|`` in ``fine_bins`` (the power of two at or above
    ``OVERSAMPLE * bins``) equal bins over ``[0, R)``, where ``R = 2**e`` is the smallest power
    of two above ``amax``. A value's bin is ``floor(|x| * fine_bins / R)``, a product by a power
    of two and so exact in floating point; when a batch raises ``amax`` past ``R``, ``R``
    doubles (as often as needed) and bins ``2k`` and ``2k + 1`` merge into bin ``k``, which is
    exactly where their values fall on the wider grid. The histogram therefore depends only on
    the values seen, not on their order, their batches or their processes (torch.ao's
    HistogramObserver also re-bins as its range grows, but approximately). ``histogram()``
    reads it as ``bins`` bins over ``[0, amax]``, each fine bin's count spread evenly over the
    part of it below ``amax``: with at least ``OVERSAMPLE / 2`` fine bins per bin, the exact
    histogram over ``[0, amax]`` up to a fraction of a fine bin's count at each edge
    (docs/int8.md has what that changes in the thresholds).

    State (``state()``/``load_state``) is a dict of float64 tensors: ``amax``, ``count`` (finite
    values seen) and, for histogram observers, ``hist`` (the fine histogram; its grid is
    implied by ``amax``).
    """

    name: ClassVar[str]
    needs_histogram: ClassVar[bool] = True

    def __init__(self, bins: int = 2048) -> None:
        if self.needs_histogram and (not isinstance(bins, int) or bins < 1):
            raise GraphoptError(f"{self.name} observer: bins must be a positive int, got {bins!r}")
        self.bins = bins if self.needs_histogram else 0
        self.fine_bins = 1 << (OVERSAMPLE * bins - 1).bit_length() if self.needs_histogram else 0
        self.amax = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.hist = torch.zeros(self.fine_bins, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(amax={float(self.amax):.6g}, count={int(self.count)})"

    # -- streaming ---------------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        """Add the finite values of ``x`` to the statistics (one batch of the stream)."""
        a = _abs_finite(x)
        if not a.numel():
            return
        amax = torch.maximum(self.amax, a.max().to("cpu", torch.float64))
        self.widen(amax)
        self.amax = amax
        if self.needs_histogram:
            self.hist += self._counts(a)
        self.count += a.numel()

    def widen(self, amax: torch.Tensor) -> None:
        """Move the histogram onto the grid of ``amax`` (>= this observer's): merge bins in
        groups of ``2**d``, ``d`` the number of doublings of the range. Exact."""
        old, new = float(self.amax), float(amax)
        if not self.needs_histogram or old == 0.0 or new <= old:
            return  # with amax 0 every count is in bin 0, which stays bin 0 on any grid
        d = _exponent(new) - _exponent(old)
        if d == 0:
            return
        merged = torch.zeros_like(self.hist)
        if d >= self.fine_bins.bit_length() - 1:
            merged[0] = self.hist.sum()
        else:
            groups = self.hist.reshape(self.fine_bins >> d, 1 << d).sum(1)
            merged[: groups.numel()] = groups
        self.hist = merged

    def _counts(self, a: torch.Tensor) -> torch.Tensor:
        """Counts of ``a`` (finite |x|, all <= amax) on the grid of the current amax."""
        amax = float(self.amax)
        if amax == 0.0:
            counts = torch.zeros(self.fine_bins, dtype=torch.float64)
            counts[0] = a.numel()
            return counts
        shift = self.fine_bins.bit_length() - 1 - _exponent(amax)  # fine_bins / R = 2**shift
        if shift > 100:  # 2**shift overflows float32: scale in float64 (still exact)
            a = a.double()
        # exact (a power of two) and < fine_bins, since a <= amax < R; the cast floors
        index = (a * 2.0**shift).long().clamp_(max=self.fine_bins - 1)
        return torch.bincount(index, minlength=self.fine_bins).to("cpu", torch.float64)

    def histogram(self) -> torch.Tensor:
        """The counts of ``|x|`` in ``bins`` equal bins over ``[0, amax]`` (values at amax in the
        last), read off the fine histogram with each fine bin's count spread evenly over the
        part of it below ``amax``."""
        if not self.needs_histogram:
            raise GraphoptError(f"the {self.name} observer keeps no histogram")
        amax = float(self.amax)
        total = self.hist.sum()
        if amax == 0.0:
            coarse = torch.zeros(self.bins, dtype=torch.float64)
            coarse[0] = total
            return coarse
        width = 2.0 ** _exponent(amax) / self.fine_bins
        left = torch.arange(self.bins, dtype=torch.float64) * (amax / self.bins)
        j = torch.floor(left / width).long().clamp_(0, self.fine_bins - 1)
        lo = j.double() * width
        extent = (torch.clamp(lo + width, max=amax) - lo).clamp_min(torch.finfo(torch.float64).tiny)
        below = torch.cat([self.hist.new_zeros(1), self.hist.cumsum(0)])[j]
        below = below + self.hist[j] * ((left - lo) / extent).clamp(0.0, 1.0)
        return torch.cat([below, total.reshape(1)]).diff().clamp_min_(0.0)

    # -- result ------------------------------------------------------------------------------
    def threshold(self) -> float:
        """The clip value for ``|x|``."""
        if float(self.count) == 0.0:
            raise GraphoptError(
                f"{self.name} observer has seen no finite values; feed it calibration data "
                "with observe(x) first"
            )
        if not self.needs_histogram:
            return float(self.amax)
        if float(self.amax) == 0.0:
            return 0.0
        return float(self.threshold_from_histogram(self.histogram(), float(self.amax)))

    def scale(self) -> float:
        """``threshold / 127``, with the threshold floored at ``MIN_THRESHOLD`` (never 0)."""
        return max(self.threshold(), MIN_THRESHOLD) / QMAX

    def threshold_from_histogram(self, hist: torch.Tensor, amax: float) -> float:
        """This observer's rule applied to ``hist``, the counts of ``|x|`` in ``bins`` equal
        bins over ``[0, amax]`` (values at ``amax`` in the last)."""
        raise NotImplementedError

    # -- state -------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        state = {"amax": self.amax.clone(), "count": self.count.clone()}
        if self.needs_histogram:
            state["hist"] = self.hist.clone()
        return state

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.state())
        if set(state) != expected:
            raise GraphoptError(
                f"{self.name} observer state must have keys {sorted(expected)}, got {sorted(state)}"
            )
        hist = torch.as_tensor(state.get("hist", self.hist), dtype=torch.float64)
        if hist.shape != self.hist.shape:
            bins = hist.numel() // OVERSAMPLE
            raise GraphoptError(
                f"{self.name} observer state has a histogram of {hist.numel()} fine bins; "
                f"this observer has {self.fine_bins} (make it with bins={bins})"
            )
        self.amax = torch.as_tensor(state["amax"], dtype=torch.float64).detach().cpu().clone()
        self.count = torch.as_tensor(state["count"], dtype=torch.float64).detach().cpu().clone()
        self.hist = hist.detach().cpu().clone()


def _exponent(amax: float) -> int:
    """``e`` with ``2**(e - 1) <= amax < 2**e`` (amax > 0): the histogram grid is [0, 2**e)."""
    return math.frexp(amax)[1]


class MinMaxObserver(Observer):
    """threshold = max |x|. One pass, no histogram."""

    name = "minmax"
    needs_histogram = False

    def __init__(self) -> None:
        super().__init__()


class PercentileObserver(Observer):
    """threshold = the ``percentile``-th percentile of |x|, read off the histogram.

    The result is the upper edge of the bin where the cumulative count reaches the percentile
    (as pytorch-quantization does), so it lies within one bin width (amax / bins) above the exact
    percentile of the data.
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.99, bins: int = 2048) -> None:
        if not 0.0 < percentile <= 100.0:
            raise GraphoptError(
                f"percentile observer: percentile must be in (0, 100], got {percentile}"
            )
        super().__init__(bins)
        self.percentile = float(percentile)

    def threshold_from_histogram(self, hist: torch.Tensor, amax: float) -> float:
        cdf = hist.cumsum(0) / hist.sum()
        k = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100, dtype=cdf.dtype)))
        return min(k + 1, self.bins) * amax / self.bins


def _sawtooth_sq_integral(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``integral_0^v (u - s * round(u / s))^2 du`` for ``v >= 0``, in closed form.

    The rounding error is a sawtooth of period ``s`` going from -s/2 to s/2; each full period
    contributes s^3/12, and the partial one ((f - s/2)^3 + (s/2)^3) / 3. The constant s^3/24 is the
    part of the first period below 0.
    """
    t = v / s + 0.5
    k = torch.floor(t)
    f = (t - k) * s
    half = s / 2
    return k * s**3 / 12 + ((f - half) ** 3 + half**3) / 3 - s**3 / 24


def expected_sq_error(hist: torch.Tensor, amax: float, thresholds: torch.Tensor) -> torch.Tensor:
    """Expected total squared error of int8 quantization of the histogrammed |x| at each threshold.

    Values are taken as uniform within their bin; a value ``v`` costs ``(v - T)^2`` above the
    threshold ``T`` (clipped) and the squared rounding error to the grid ``s = T / 127`` below it,
    both integrated exactly over each bin. Returns one error per threshold.
    """
    bins = hist.numel()
    width = amax / bins
    lo = torch.arange(bins, dtype=torch.float64)[None, :] * width
    hi = lo + width
    t = thresholds.to(torch.float64)[:, None]
    s = t / QMAX
    rounding = _sawtooth_sq_integral(torch.minimum(hi, t), s) - _sawtooth_sq_integral(
        torch.minimum(lo, t), s
    )
    clipping = ((torch.maximum(hi, t) - t) ** 3 - (torch.maximum(lo, t) - t) ** 3) / 3
    return ((rounding + clipping) / width * hist.to(torch.float64)[None, :]).sum(1)


class MseObserver(Observer):
    """threshold = the candidate minimizing the expected squared quantization error.

    ``candidates`` thresholds, evenly spaced from ``start_bin`` bin widths (amax / 16 with the
    defaults) up to amax, are scored by ``expected_sq_error`` on the histogram. Below
    ``start_bin`` the int8 step would be finer than a bin, and the histogram cannot tell the
    rounding error apart; a tensor whose best clip is below amax / 16 gets amax / 16.
    """

    name = "mse"

    def __init__(self, bins: int = 2048, candidates: int = 200, start_bin: int = 128) -> None:
        super().__init__(bins)
        if candidates < 1 or start_bin < 1:
            raise GraphoptError(
                f"mse observer: candidates and start_bin must be >= 1, got {candidates}, {start_bin}"
            )
        self.candidates = candidates
        self.start_bin = min(start_bin, bins)

    def threshold_from_histogram(self, hist: torch.Tensor, amax: float) -> float:
        width = amax / self.bins
        thresholds = torch.linspace(self.start_bin, self.bins, self.candidates, dtype=torch.float64)
        thresholds = thresholds * width
        errors = expected_sq_error(hist, amax, thresholds)
        return float(thresholds[int(torch.argmin(errors))])


def kl_divergences(hist: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """KL(P_i || Q_i) for each candidate cut ``i`` (number of bins kept, 1..bins) of a histogram.

    P_i: the first ``i`` bins, with the count of the rest added to bin ``i - 1`` (clipping).
    Q_i: the first ``i`` bins merged into 128 levels (bin ``j`` -> level ``j * 128 // i``), each
    level's count spread evenly over its non-empty bins. inf where Q_i misses mass that P_i has.

    With q constant over the non-empty bins of a level, sum_j h_j ln(h_j / q_j) is a prefix sum of
    h ln h minus sum_levels mass ln(mass / nonempty), so every candidate costs O(128), not O(bins).
    """
    h = hist.to(torch.float64)
    levels = QMAX + 1
    total = h.sum()
    zero = h.new_zeros(1)
    mass_before = torch.cat([zero, h.cumsum(0)])  # mass_before[k] = h[:k].sum()
    filled_before = torch.cat([zero, (h > 0).double().cumsum(0)])
    hlogh_before = torch.cat([zero, torch.xlogy(h, h).cumsum(0)])
    i = candidates.long()[:, None]
    first = (torch.arange(levels + 1) * i + levels - 1) // levels  # first bin of each level; i
    mass = mass_before[first[:, 1:]] - mass_before[first[:, :-1]]
    filled = filled_before[first[:, 1:]] - filled_before[first[:, :-1]]
    q_level = mass / filled.clamp_min(1)
    kept = mass_before[i[:, 0]]
    terms = hlogh_before[i[:, 0]] - torch.xlogy(mass, q_level).sum(1)  # sum_j<i h_j ln(h_j/q_j)
    # the last kept bin also holds the clipped tail
    last, tail = h[i[:, 0] - 1], total - kept
    q_last = q_level.gather(1, (i - 1) * levels // i)[:, 0]
    terms = terms - torch.xlogy(last, last) + torch.xlogy(last, q_last)
    terms = terms + torch.xlogy(last + tail, last + tail) - torch.xlogy(last + tail, q_last)
    kl = terms / total + torch.log(kept / total)
    return torch.where((last == 0) & (tail > 0), torch.inf, kl)


class EntropyObserver(Observer):
    """TensorRT's entropy calibration: the threshold whose int8 version of the distribution of
    |x| is closest (in KL divergence) to the distribution itself.

    For each candidate ``i`` (bins ``start_bin``..``bins``, every ``stride``-th): the reference
    P is the histogram cut at bin ``i`` with the clipped tail added to its last bin; Q merges the
    ``i`` bins into 128 levels (int8 magnitudes 0..127) and spreads each level's count evenly over
    its non-empty bins. The threshold is the upper edge of the candidate with the smallest
    KL(P || Q), the largest such on ties. As in TensorRT (and NVIDIA's pytorch-quantization), bin
    0 is first set to the count of bin 1, so that the exact zeros of a ReLU do not dominate P.
    """

    name = "entropy"

    def __init__(self, bins: int = 2048, start_bin: int = 128, stride: int = 1) -> None:
        super().__init__(bins)
        if start_bin < 1 or stride < 1:
            raise GraphoptError(
                f"entropy observer: start_bin and stride must be >= 1, got {start_bin}, {stride}"
            )
        self.start_bin = min(start_bin, bins)
        self.stride = stride

    def threshold_from_histogram(self, hist: torch.Tensor, amax: float) -> float:
        h = hist.clone()
        if self.bins > 1:
            h[0] = h[1]
        candidates = torch.arange(self.start_bin, self.bins + 1, self.stride)
        kl = kl_divergences(h, candidates)
        best = len(kl) - 1 - int(torch.argmin(kl.flip(0)))  # the last minimum, as TensorRT
        return int(candidates[best]) * amax / self.bins


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MseObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, **options: Any) -> Observer:
    """A new observer by registry name, e.g. ``make_observer("percentile", percentile=99.9)``."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise GraphoptError(f"unknown observer {name!r}; use one of {', '.join(OBSERVERS)}")
    params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(params))
    if unknown:
        takes = ", ".join(params) if params else "no options"
        raise GraphoptError(
            f"observer {name!r} got unknown option(s) {', '.join(unknown)}; it takes {takes}"
        )
    return cls(**options)


# -- weights ------------------------------------------------------------------------------------


def _along(scale: torch.Tensor, axis: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize_weight_per_channel(
    w: torch.Tensor, axis: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-channel int8: ``(q int8 like w, scales float32 [w.shape[axis]])``.

    ``scale_c = max |w_c| / 127`` (1 for an all-zero channel), ``q = round(w / scale).clamp(-127,
    127)``, computed in float32. ``w`` is not modified.
    """
    if w.dim() == 0 or not -w.dim() <= axis < w.dim():
        raise GraphoptError(
            f"quantize_weight_per_channel: axis {axis} is out of range for a weight of shape "
            f"{tuple(w.shape)}"
        )
    if not w.is_floating_point():
        raise GraphoptError(f"quantize_weight_per_channel: weight dtype is {w.dtype}, not a float")
    axis %= w.dim()
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise GraphoptError(
            "quantize_weight_per_channel: the weight has inf or nan entries; it cannot be "
            "quantized (check the model's parameters)"
        )
    others = [d for d in range(w.dim()) if d != axis]
    amax = wf.abs().amax(dim=others) if others else wf.abs()
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(wf / _along(scales, axis, w.dim())).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scales


def quantize_per_tensor(x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``round(x / scale).clamp(-127, 127)`` as int8, computed in float32."""
    if float(torch.as_tensor(scale).min()) <= 0:
        raise GraphoptError(f"quantize_per_tensor: scale must be > 0, got {scale}")
    return torch.round(x.detach().float() / scale).clamp_(-QMAX, QMAX).to(torch.int8)


def dequantize(
    q: torch.Tensor, scale: float | torch.Tensor, axis: int | None = None
) -> torch.Tensor:
    """``q * scale`` in float32; with ``axis``, ``scale`` holds one value per slice along it."""
    x = q.float()
    if axis is None:
        return x * scale
    return x * _along(torch.as_tensor(scale, dtype=torch.float32), axis % q.dim(), q.dim())


# -- distributed reductions ---------------------------------------------------------------------


def _distributed(group: Any) -> bool:
    if group is not None:
        if not (dist.is_available() and dist.is_initialized()):
            raise GraphoptError(
                "a process group was given for calibration but torch.distributed is not "
                "initialized; call torch.distributed.init_process_group first"
            )
        return True
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _collective_device(group: Any) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and mixed "cpu:gloo,cuda:nccl" groups) take CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(values: torch.Tensor, op: Any, group: Any) -> torch.Tensor:
    buffer = values.to(_collective_device(group), torch.float64)
    dist.all_reduce(buffer, op=op, group=group)
    return buffer.cpu()


def _check_same_observers(observers: list[Observer], group: Any) -> None:
    """Every process must reduce the same observers: a mismatch would hang or mix up nodes."""
    bins = sum(o.fine_bins for o in observers)
    layout = torch.tensor([len(observers), bins], dtype=torch.float64)
    both = _all_reduce(torch.cat([layout, -layout]), dist.ReduceOp.MAX, group)
    if not (torch.equal(both[:2], layout) and torch.equal(-both[2:], layout)):
        raise GraphoptError(
            f"calibration processes disagree on the observers: this one has {len(observers)} "
            f"with {int(layout[1])} histogram bins in all; every process must calibrate the "
            "same node names, in the same order, with the same observer options"
        )


def all_reduce_observers(
    observers: Mapping[str, Observer] | Sequence[Observer], group: Any = None
) -> None:
    """Combine the observers of all processes, in place; call once, after every process has
    observed its whole shard.

    ``amax`` is reduced with MAX and ``count`` with SUM; each process then widens its histograms
    to the grid of the common ``amax`` (``Observer.widen``, exact) and the histograms are
    reduced with SUM (exact: counts are integers in float64). So the result is bit for bit what
    one process observing all the shards gets. Reductions run over ``group`` if given, else over
    the default group when torch.distributed is initialized with more than one process;
    otherwise there is nothing to combine. Tensors are float64 with ReduceOp.MAX/SUM, which gloo
    supports. Every process must pass the same observers in the same order (checked).
    """
    obs = list(observers.values()) if isinstance(observers, Mapping) else list(observers)
    if not _distributed(group):
        return
    _check_same_observers(obs, group)
    if not obs:
        return
    amax = _all_reduce(torch.stack([o.amax for o in obs]), dist.ReduceOp.MAX, group)
    count = _all_reduce(torch.stack([o.count for o in obs]), dist.ReduceOp.SUM, group)
    for o, a, c in zip(obs, amax, count):
        o.widen(a)
        o.amax, o.count = a.clone(), c.clone()
    with_hist = [o for o in obs if o.needs_histogram]
    if with_hist:
        summed = _all_reduce(torch.cat([o.hist for o in with_hist]), dist.ReduceOp.SUM, group)
        for o, h in zip(with_hist, summed.split([o.fine_bins for o in with_hist])):
            o.hist = h.clone()


def all_reduce_max(values: torch.Tensor, group: Any = None) -> torch.Tensor:
    """The elementwise MAX of ``values`` over the processes calibrating together (``group``, or
    the default group of more than one process); ``values`` itself otherwise. Every process
    must call it with the same shape."""
    if not _distributed(group):
        return values
    return _all_reduce(values, dist.ReduceOp.MAX, group).to(values.device, values.dtype)


# -- calibration over a graph ---------------------------------------------------------------------


class _ObservingRunner(Runner):
    """Runs the graph and feeds the named nodes' values to their observers; records nothing."""

    def __init__(self, gm: GraphModule, observers: Mapping[str, Observer]) -> None:
        super().__init__(gm, record=False)
        self.observers = observers

    def run_node(self, n: Node) -> Any:
        value = super().run_node(n)
        observer = self.observers.get(n.name)
        if observer is not None:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                what = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                raise GraphoptError(
                    f"calibrate: node {n.name} ({n.target}) produces {what}; only floating-point "
                    "tensor values can be calibrated"
                )
            observer.observe(value)
        return value


def _flat_batch(batch: Any, index: int, placeholders: list[Node]) -> list[Any]:
    flat = [batch] if isinstance(batch, torch.Tensor) else batch
    if not isinstance(flat, (list, tuple)) or len(flat) != len(placeholders):
        got = f"{len(flat)} inputs" if isinstance(flat, (list, tuple)) else type(batch).__name__
        raise GraphoptError(
            f"calibration batch {index} has {got}; the graph takes {len(placeholders)} "
            f"({', '.join(p.name for p in placeholders)}): pass each batch as a flat list of "
            "the graph's inputs"
        )
    return list(flat)


@contextmanager
def _progress_bar(enabled: bool, total: int | None) -> Iterator[Callable[[str], None]]:
    if not enabled:
        yield lambda description: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn()) as bar:
        task = bar.add_task("calibrating", total=total)
        yield lambda description: bar.update(task, advance=1, description=description)


def calibrate(
    gm: GraphModule,
    node_names: Sequence[str],
    batches: Iterable[Sequence[torch.Tensor]],
    observer: str = "minmax",
    *,
    options: dict[str, Any] | None = None,
    group: Any = None,
    progress: bool = False,
) -> dict[str, Observer]:
    """Run ``gm`` on ``batches`` and return one observer (``make_observer(observer, **options)``)
    per node name, with the statistics of that node's value.

    ``batches`` is a stream, read once, batch by batch (a list, a generator, a DataLoader): each
    batch is run, its values fed to the observers as they are computed, and dropped; nothing
    else is kept, whatever the observer. Each batch is a flat list of the graph's inputs (a lone
    tensor is taken as a one-input batch). Then ``all_reduce_observers``: under
    torch.distributed (``group``, or an initialized default group of more than one process) each
    process passes its own shard and all get the same observers, bit for bit those of one
    process on all the shards; all must pass the same node names in the same order.
    ``progress=True`` shows a rich progress bar (on rank 0) over the batches.
    """
    names = list(dict.fromkeys([node_names] if isinstance(node_names, str) else node_names))
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [name for name in names if name not in nodes]
    if missing:
        raise GraphoptError(
            f"calibrate: the graph has no node(s) named {', '.join(missing)}; pass names of "
            "value nodes of this graph (e.g. the inputs of its linear layers)"
        )
    make_observer(observer, **(options or {}))  # unknown names and options fail before any run
    if not names:
        return {}
    observers = {name: make_observer(observer, **(options or {})) for name in names}
    placeholders = user_placeholders(gm)  # a stateful graph's state inputs come from the graph
    total = len(batches) if isinstance(batches, Sized) else None
    distributed = _distributed(group)
    rank0 = not distributed or dist.get_rank(group) == 0
    runner = _ObservingRunner(gm, observers)
    seen = 0
    with _progress_bar(progress and rank0, total) as advance:
        for seen, batch in enumerate(batches, start=1):
            runner.run_graph(_flat_batch(batch, seen - 1, placeholders))
            advance(f"calibrating ({observer})")
    if seen == 0 and not distributed:  # a process may have an empty shard
        raise GraphoptError(
            "calibrate got no calibration batches; pass at least one batch of inputs"
        )
    all_reduce_observers(observers, group)
    return observers


def split_first(batches: Iterable[B] | None, default: B) -> tuple[B, Iterator[B]]:
    """The first batch of a calibration stream, and an iterator over the whole stream (that
    first batch again, then the rest as it is read): ``batches`` is read once, and only the
    first batch is kept. ``default`` stands in for no batches (None or an empty stream)."""
    stream = iter(batches if batches is not None else ())
    first = next(stream, _NOTHING)
    if first is _NOTHING:
        return default, iter([default])
    return first, itertools.chain([first], stream)


_NOTHING: Any = object()
