"""What a benchmark mode is: a function from a ``Setup`` (model, inputs, device) to a ``Runner``
that calls the model the mode's way, built (and compiled) once; ``ModeUnavailable`` when it
cannot run here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Runner = Callable[..., Any]


class ModeUnavailable(Exception):
    """This mode cannot run here (missing package, wrong device); the reason is reported."""


@dataclass
class Setup:
    model: torch.nn.Module
    inputs: tuple[Any, ...]
    device: str


Mode = Callable[[Setup], Runner]
