"""A pass with a planted bug, for trying ``graphopt debug bisect`` (README, docs/debugging.md).

``relu-to-clamp`` rewrites ``relu(x) -> clamp_min(x, 0)``, which is right, except at the second
relu of the graph, where the bound is -0.05: small negatives leak through, and the model is
wrong by a few percent. Loading this file as the model (``examples/planted_bug.py:build``) registers
the pass, so it can be named in ``--pipeline``:

    .venv/bin/graphopt debug bisect examples/planted_bug.py:build --pipeline "-O1,relu-to-clamp" --repro repro-out
    .venv/bin/python repro-out/repro.py    # exits 1 while the bug is there

The verdict names the pass, its second rewrite and the node ``clamp_min`` that replaced the
second relu. ``GRAPHOPT_PLANTED_FIXED=1`` removes the bug (the repro then passes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import Node

from graphopt import Call, Match, Rule, RulePass, register_pass

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class ReluToClamp(RulePass):
    """relu(x) -> clamp_min(x, 0.0), with a wrong bound at the ``wrong_at``-th relu"""

    name = "relu-to-clamp"
    contract = "rounding"
    wrong_at: int = 2
    stat = "rewritten"

    @property
    def rules(self) -> list[Rule]:  # type: ignore[override]
        seen = [0]

        def relu_to_clamp(node: Node) -> Match:
            seen[0] += 1
            wrong = seen[0] == self.wrong_at and os.environ.get("GRAPHOPT_PLANTED_FIXED") != "1"
            bound = -0.05 if wrong else 0.0  # the planted bug
            return Match([node], Call(aten.clamp_min.default, (node.args[0], bound)))

        return [Rule("relu->clamp", (aten.relu.default,), relu_to_clamp)]  # relu -> clamp_min


def build(batch: int = 4) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A three-layer MLP (fixed seed) and an example batch: what the command line loads."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    return model.eval(), (torch.randn(batch, 32),)
