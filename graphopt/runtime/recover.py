"""``graphopt.recover``: win back accuracy a lossy pipeline (pruning) cost, by distillation.

The compiled graph is the student and the original model the teacher. A copy of the graph is
fine-tuned with Adam on ``alpha * T^2 * KL(teacher || student)`` (+ ``(1 - alpha) * task_loss``);
the compiled module passed in is never touched and a new one is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.fx import GraphModule
from torch.nn import functional as F

from graphopt.errors import GraphoptError
from graphopt.frontends.capture import eval_mode
from graphopt.frontends.exported import as_args
from graphopt.pipeline.report import PassRecord
from graphopt.runtime.compiled import CompiledModule

TaskLoss = Callable[[Any, Any], torch.Tensor]

# BatchNorm statistics are not weights: gradient descent must not move them.
_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")
_EMPTY = object()


def recover(
    compiled: CompiledModule,
    teacher: torch.nn.Module,
    data: Iterable[Any],
    steps: int = 100,
    *,
    lr: float = 1e-3,
    temperature: float = 2.0,
    alpha: float = 1.0,
    task_loss: TaskLoss | None = None,
    progress: bool = True,
) -> CompiledModule:
    """Fine-tune a copy of ``compiled`` towards ``teacher`` and return it as a new module.

    ``data``: batches shaped like the compile's example inputs (a tensor or a tuple of
    positional inputs), cycled until ``steps`` Adam steps are done (a one-shot iterator is
    cached on its first pass). The loss per batch is
    ``alpha * T^2 * kl_div(log_softmax(s / T), log_softmax(t / T), "batchmean")`` plus
    ``(1 - alpha) * task_loss(student_output, batch)`` when ``task_loss`` is given. The logits
    ``s`` and ``t`` are the output when it is a tensor, else its first floating tensor leaf
    (tuples and lists in order, dicts in insertion order, dataclasses in field order); logits
    with more than two dims are flattened to rows over the last dim (one distribution each).

    The teacher runs in eval mode under no_grad (its train/eval flags are restored). Trained:
    the floating parameters and floating buffers of the copied graph (the weights passes fold
    into ``_graphopt_*`` buffers), turned into parameters for the run and back into buffers
    after. Frozen: integer buffers (int8 weights, indices) and BatchNorm running statistics.
    Pruned zeros stay zero: every trained tensor with zeros at the start gets the mask
    ``w != 0``, re-applied after each step. The result has the input's signature, pipeline and
    target, and a copy of its report with a ``recover`` record (steps, first and last loss).
    """
    _check_args(compiled, teacher, steps, lr, temperature, alpha)
    stream = _cycle(data)
    first = next(stream, _EMPTY)
    if first is _EMPTY:
        raise GraphoptError("graphopt.recover: `data` is empty; pass at least one batch")
    stream = itertools.chain([first], stream)

    start = time.perf_counter()
    student = _copy_graph(compiled.gm)
    trained, converted = _make_trainable(student)
    if not trained:
        raise GraphoptError(
            "graphopt.recover: the compiled graph has no floating-point weights to fine-tune"
        )
    masks = {name: p.detach() != 0 for name, p in trained.items() if bool((p == 0).any())}
    params = list(trained.values())
    optimizer = torch.optim.Adam(params, lr=lr)

    losses: list[float] = []
    student.train()
    with eval_mode(teacher), _progress(progress, steps) as advance:
        for _ in range(steps):
            batch = next(stream)
            args = as_args(batch)
            compiled.signature.check(args, {})
            with torch.no_grad():
                teacher_logits = _logits(teacher(*args), "teacher")
            out = student(*args)
            loss = alpha * _distill(_logits(out, "student"), teacher_logits, temperature)
            if task_loss is not None and alpha < 1.0:
                loss = loss + (1.0 - alpha) * task_loss(out, batch)
            if not loss.requires_grad:
                raise GraphoptError(
                    "graphopt.recover: no gradient reaches the weights (the graph's ops, e.g. "
                    "int8 kernels, are not differentiable); recover a float pipeline, then quantize"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    trained[name].mul_(mask)
            losses.append(float(loss.detach()))
            advance(losses[-1])
    student.eval()
    _freeze(student, trained, converted)
    report = _noted(compiled, student, steps, losses, time.perf_counter() - start)
    return CompiledModule(
        student,
        compiled.signature,
        report=report,
        pipeline=compiled.pipeline,
        target=compiled.target,
    )


def _check_args(
    compiled: Any, teacher: Any, steps: int, lr: float, temperature: float, alpha: float
) -> None:
    if not isinstance(compiled, CompiledModule):
        raise GraphoptError(
            f"graphopt.recover takes what graphopt.compile returned, got {type(compiled).__name__}"
        )
    if not isinstance(teacher, torch.nn.Module):
        raise GraphoptError(
            f"graphopt.recover: the teacher must be a torch.nn.Module (the original model), "
            f"got {type(teacher).__name__}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise GraphoptError(f"graphopt.recover: steps must be an int >= 1, got {steps!r}")
    if not lr > 0:
        raise GraphoptError(f"graphopt.recover: lr must be > 0, got {lr!r}")
    if not temperature > 0:
        raise GraphoptError(f"graphopt.recover: temperature must be > 0, got {temperature!r}")
    if not 0.0 <= alpha <= 1.0:
        raise GraphoptError(f"graphopt.recover: alpha must be in [0, 1], got {alpha!r}")


def _cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Yield ``data``'s batches forever: re-iterate a collection, replay a one-shot iterator."""
    it = iter(data)
    replayable = it is not data
    seen: list[Any] = []
    while True:
        any_batch = False
        for batch in it:
            any_batch = True
            if not replayable:
                seen.append(batch)
            yield batch
        if not any_batch:
            return
        it = iter(data) if replayable else iter(seen)


def _first_float(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() else None
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        children: Iterable[Any] = (getattr(out, f.name) for f in dataclasses.fields(out))
    elif isinstance(out, dict):
        children = out.values()
    elif isinstance(out, (list, tuple)):
        children = out
    else:
        return None
    for child in children:
        found = _first_float(child)
        if found is not None:
            return found
    return None


def _logits(out: Any, who: str) -> torch.Tensor:
    logits = _first_float(out)
    if logits is None:
        raise GraphoptError(
            f"graphopt.recover: the {who}'s output ({type(out).__name__}) has no floating-point "
            "tensor to distill on"
        )
    return logits


def _distill(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    # T^2 keeps the gradient scale independent of T (Hinton et al., 2015)
    if student.shape != teacher.shape:
        raise GraphoptError(
            f"graphopt.recover: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} differ in shape; the teacher must be the compiled model"
        )
    classes = student.shape[-1] if student.dim() else 1
    s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


def _copy_graph(gm: GraphModule) -> GraphModule:
    with warnings.catch_warnings():
        # torch's own pytree specs on the graph warn about a deprecation when deep-copied
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(gm)


def _make_trainable(gm: GraphModule) -> tuple[dict[str, torch.nn.Parameter], set[str]]:
    """Turn ``gm``'s floating weights into parameters that require grad; freeze the rest.
    Returns the trained tensors by name and the names that were buffers."""
    trained: dict[str, torch.nn.Parameter] = {}
    for name, p in gm.named_parameters():
        p.requires_grad_(p.is_floating_point())
        if p.is_floating_point():
            trained[name] = p
    converted: set[str] = set()
    for name, buf in list(gm.named_buffers()):
        if not buf.is_floating_point() or name.endswith(_RUNNING_STATS):
            continue
        owner, _, leaf = name.rpartition(".")
        module = gm.get_submodule(owner)
        del module._buffers[leaf]
        param = torch.nn.Parameter(buf.detach().clone(), requires_grad=True)
        module.register_parameter(leaf, param)
        trained[name] = param
        converted.add(name)
    return trained, converted


def _freeze(gm: GraphModule, trained: dict[str, torch.nn.Parameter], converted: set[str]) -> None:
    """Give ``gm`` the input's layout back: converted buffers become buffers again, and the
    parameters stop requiring grad (the result is for inference)."""
    for name, param in trained.items():
        param.requires_grad_(False)
        if name in converted:
            owner, _, leaf = name.rpartition(".")
            module = gm.get_submodule(owner)
            del module._parameters[leaf]
            module.register_buffer(leaf, param.detach())


def _noted(
    compiled: CompiledModule, gm: GraphModule, steps: int, losses: list[float], seconds: float
) -> Any:
    report = copy.deepcopy(compiled.report)
    if report is None or not hasattr(report, "records"):
        return report
    nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    record = PassRecord(
        "recover",
        "lossy",
        time_s=seconds,
        nodes_before=nodes,
        nodes_after=nodes,
        status="ok",
        message=(
            f"distilled for {steps} steps: loss {losses[0]:.4g} -> {losses[-1]:.4g} "
            "(weights changed; outputs no longer verified against the original)"
        ),
        stats={"steps": steps, "loss_first": losses[0], "loss_last": losses[-1]},
    )
    report.records.append(record)
    return report


class _progress:
    """A rich progress bar over the steps, showing the loss; a no-op when disabled."""

    def __init__(self, enabled: bool, steps: int) -> None:
        self.enabled, self.steps = enabled, steps

    def __enter__(self) -> Callable[[float], None]:
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(
            TextColumn("recover"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            transient=True,
        )
        self.bar.__enter__()
        task = self.bar.add_task("recover", total=self.steps, loss="-")
        return lambda loss: self.bar.update(task, advance=1, loss=f"{loss:.4f}")

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.__exit__(None, None, None)
