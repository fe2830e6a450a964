"""What a captured model accepts: arity, keyword names, each tensor's dtype, rank, static dims
and device, and whether the batch dimension is dynamic. The compiled model checks every call
against it and raises ``InputMismatchError`` with expected versus got."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from graphopt.errors import InputMismatchError


def plain_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Positional tensors only (the common call): the arguments are the flat inputs as they
    are, with no pytree to walk."""
    return not kwargs and all(type(a) is torch.Tensor for a in args)


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int | None, ...]  # None: dynamic (the batch dimension)
    device: str

    def describe(self) -> str:
        dims = ", ".join("*" if d is None else str(d) for d in self.shape)
        return f"{self.dtype.replace('torch.', '')}[{dims}] on {self.device}"


@dataclass(frozen=True)
class InputSignature:
    """What a compiled model accepts: arity, keyword names, each tensor's dtype/rank/device and
    static dims, and whether all inputs share one (dynamic) batch size."""

    n_args: int
    kwarg_names: tuple[str, ...]
    leaves: tuple[TensorSpec | None, ...]  # None for non-tensor leaves
    dynamic_batch: bool
    shared_batch: bool = False
    # inputs the model was specialized to (an imported ONNX Reshape's shape, a TopK's k):
    # (index, name, the values compiled for); another value at call time is a mismatch
    values: tuple[tuple[int, str, tuple[Any, ...]], ...] = ()

    @staticmethod
    def of(args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool) -> InputSignature:
        leaves: list[TensorSpec | None] = []
        batches = set()
        for leaf in pytree.tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor):
                shape = tuple(
                    None if (i == 0 and dynamic_batch) else int(d) for i, d in enumerate(leaf.shape)
                )
                leaves.append(TensorSpec(str(leaf.dtype), shape, leaf.device.type))
                if leaf.dim() >= 1:
                    batches.add(int(leaf.shape[0]))
            else:
                leaves.append(None)
        shared = dynamic_batch and len(batches) == 1
        return InputSignature(
            len(args), tuple(sorted(kwargs)), tuple(leaves), dynamic_batch, shared
        )

    @functools.cached_property
    def _expected(
        self,
    ) -> tuple[tuple[int, torch.dtype, str, int, tuple[tuple[int, int], ...]], ...]:
        """Per tensor leaf: (index, dtype, device type, rank, static dims) for the fast check."""
        out = []
        for i, spec in enumerate(self.leaves):
            if spec is not None:
                dtype = getattr(torch, spec.dtype.replace("torch.", ""))
                static = tuple((j, d) for j, d in enumerate(spec.shape) if d is not None)
                out.append((i, dtype, spec.device, len(spec.shape), static))
        return tuple(out)

    def check(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise InputMismatchError unless the call matches; cheap when it does."""
        if len(args) != self.n_args:
            raise InputMismatchError(
                f"compiled model called with {len(args)} positional argument(s), expected "
                f"{self.n_args} (as in example_inputs)"
            )
        if len(kwargs) != len(self.kwarg_names) or any(k not in kwargs for k in self.kwarg_names):
            raise InputMismatchError(
                f"compiled model called with keyword arguments {sorted(kwargs)}, expected "
                f"{list(self.kwarg_names)}"
            )
        leaves = list(args) if plain_call(args, kwargs) else pytree.tree_leaves((args, kwargs))
        if len(leaves) != len(self.leaves):
            raise InputMismatchError(
                f"compiled model called with {len(leaves)} input tensors/values in its arguments' "
                f"structure, expected {len(self.leaves)}"
            )
        batch = None
        for i, dtype, device, rank, static in self._expected:
            leaf = leaves[i]
            if not (
                isinstance(leaf, torch.Tensor)
                and leaf.dtype is dtype
                and leaf.dim() == rank
                and leaf.device.type == device
                and all(leaf.shape[j] == d for j, d in static)
            ):
                raise self._mismatch(i, leaf)
            if self.shared_batch and rank >= 1:
                if batch is None:
                    batch = (i, leaf.shape[0])
                elif leaf.shape[0] != batch[1]:
                    raise InputMismatchError(
                        f"inputs {batch[0]} and {i} must have the same batch size (dim 0), as in "
                        f"example_inputs; got {batch[1]} and {leaf.shape[0]}"
                    )
        for i, name, expected in self.values:
            got = leaves[i].reshape(-1).tolist()
            if got != list(expected):
                raise InputMismatchError(
                    f"input {i} ({name!r}) holds values the model reads as a shape, axes or a "
                    f"size, so it was compiled for {list(expected)}; got {got}. Compile again "
                    "with this value in the example inputs (or make it a constant of the model)"
                )

    def _mismatch(self, i: int, leaf: Any) -> InputMismatchError:
        spec = self.leaves[i]
        assert spec is not None
        if not isinstance(leaf, torch.Tensor):
            return InputMismatchError(
                f"input {i}: expected a tensor {spec.describe()}, got {type(leaf).__name__}"
            )
        got = TensorSpec(str(leaf.dtype), tuple(leaf.shape), leaf.device.type)
        if got.dtype != spec.dtype:
            what = "dtype"
        elif got.device != spec.device:
            what = "device"
        else:
            what = "rank" if len(got.shape) != len(spec.shape) else "shape"
        hint = " (* is the dynamic batch dimension)" if self.dynamic_batch else ""
        return InputMismatchError(
            f"input {i}: wrong {what}: expected {spec.describe()}, got {got.describe()}{hint}"
        )
