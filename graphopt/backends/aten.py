"""aten: the verified graph itself, calling ATen and ``graphopt::`` ops one node at a time.

The reference every other backend is judged against, available everywhere; ``graphopt::`` ops
run their Triton kernels on CUDA where those measure faster, their ATen reference elsewhere.
"""

from __future__ import annotations

from graphopt.backends.base import Backend, Engine, Handoff, register_backend
from graphopt.ops.registry import executable


@register_backend
class Aten(Backend):
    name = "aten"

    def build(self, handoff: Handoff, target: str) -> Engine:
        return Engine(self.name, executable(handoff.flat()))
