"""Numerical contracts: what a pass promises about the function the graph computes, judged
against a float64 run of the captured graph (see graphopt.verification.verify)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from graphopt.errors import PipelineError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Contract:
    """What a pass promises about the function the graph computes (see docs/contracts.md).

    * ``exact``: outputs bitwise equal to the outputs before the pass.
    * ``rounding``: error against the float64 reference at most
      ``max(2 x error before the pass, floor(dtype))``. ``dtype`` (optional) names the dtype
      the graph computes in when it differs from the outputs' (fp16 inside, fp32 returned):
      the floor is then the larger of the two dtypes' floors.
    * ``lossy``: the user's budget on one metric (``cosine`` >= t, ``sqnr`` >= t dB,
      ``rel_error`` <= t, ``top1`` >= t), judged against the float64 reference.
    """

    kind: str
    metric: str | None = None
    threshold: float | None = None
    dtype: str | None = None  # rounding: the compute dtype, e.g. "float16" (a string: hashable)

    @staticmethod
    def exact() -> Contract:
        return Contract("exact")

    @staticmethod
    def rounding(dtype: torch.dtype | str | None = None) -> Contract:
        """``dtype``: a floating ``torch.dtype`` (or its name) the graph computes in."""
        if dtype is None:
            return Contract("rounding")
        name = str(dtype).removeprefix("torch.")
        if name not in ROUNDING_DTYPES:
            raise PipelineError(
                f"Contract.rounding(dtype={dtype!r}): use one of {', '.join(ROUNDING_DTYPES)}"
            )
        return Contract("rounding", dtype=name)

    @staticmethod
    def lossy(metric: str, threshold: float) -> Contract:
        if metric not in LOSSY_METRICS:
            raise PipelineError(
                f"unknown lossy metric {metric!r}; use one of {', '.join(sorted(LOSSY_METRICS))}"
            )
        return Contract("lossy", metric, float(threshold))

    @staticmethod
    def parse(text: str, *, where: str = "contract") -> Contract:
        """The contract ``str(contract)`` prints: ``exact``, ``rounding``, ``rounding(float16)``,
        ``lossy(cosine=0.99)``."""
        m = re.fullmatch(r"\s*(exact|rounding|lossy)\s*(?:\((.*)\))?\s*", text)
        if m is not None:
            kind, arg = m.group(1), (m.group(2) or "").strip()
            if kind == "exact" and not arg:
                return Contract.exact()
            if kind == "rounding":
                return Contract.rounding(arg or None)
            metric, _, threshold = arg.partition("=")
            if kind == "lossy" and metric and threshold:
                try:
                    return Contract.lossy(metric.strip(), float(threshold))
                except ValueError:
                    pass
        raise PipelineError(
            f"{where}: {text!r} is not a contract; write 'exact', 'rounding', "
            "'rounding(float16)' or 'lossy(cosine=0.99)' (metrics: "
            f"{', '.join(sorted(LOSSY_METRICS))})"
        )

    @property
    def judged_by(self) -> str:
        """The metric a value is judged by under this contract."""
        if self.kind == "lossy":
            return str(self.metric)
        return "rel_max" if self.kind == "rounding" else "bitwise"

    def __str__(self) -> str:
        if self.kind == "lossy":
            return f"lossy({self.metric}={self.threshold:g})"
        return f"{self.kind}({self.dtype})" if self.dtype else self.kind


# metric -> True when larger is better
LOSSY_METRICS = {"cosine": True, "sqnr": True, "top1": True, "rel_error": False}
# compute dtypes a rounding contract may name (the floors are graphopt.verification.metrics.ROUNDING_FLOOR)
ROUNDING_DTYPES = ("float16", "bfloat16", "float32", "float64")
