"""``graphopt bench``: graphopt against eager PyTorch, torch.compile and ONNX Runtime, side by side.

All modes of a model run in one process on the same inputs: warm-up first, then the median of
many timed calls over rotating random inputs (never zeros). On the CPU the thread count is fixed;
on the GPU timings come from ``triton.testing.do_bench``. Every mode's outputs are compared with
eager fp32 (max abs, relative L2, cosine). A mode that cannot run is reported with its reason.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

import graphopt
from graphopt import zoo
from graphopt.errors import GraphoptError
from graphopt.pipeline.parse import OPT_LEVELS, half_pipeline
from graphopt.verification import metrics

Runner = Callable[..., Any]


class ModeUnavailable(Exception):
    """This mode cannot run here (missing package, wrong device); the reason is reported."""


# -- models ----------------------------------------------------------------------------------------


def _torchvision(name: str) -> Callable[[int], tuple[torch.nn.Module, tuple[Any, ...]]]:
    def build(batch: int) -> tuple[torch.nn.Module, tuple[Any, ...]]:
        try:
            import torchvision.models as tvm
        except Exception as exc:  # not installed, or built for another torch
            raise ModeUnavailable(
                f"torchvision unavailable ({type(exc).__name__}: {exc})"
            ) from None
        model = getattr(tvm, name)(weights=None).eval()
        return model, (torch.randn(batch, 3, 224, 224),)

    return build


def _hf(kind: str) -> Callable[[int], tuple[torch.nn.Module, tuple[Any, ...]]]:
    def build(batch: int) -> tuple[torch.nn.Module, tuple[Any, ...]]:
        try:
            import transformers as tf
        except Exception as exc:
            raise ModeUnavailable(
                f"transformers unavailable ({type(exc).__name__}: {exc})"
            ) from None
        torch.manual_seed(0)
        if kind == "vit":
            model = tf.ViTModel(tf.ViTConfig()).eval()
            return model, (torch.randn(batch, 3, 224, 224),)
        if kind == "gpt2":
            model = tf.GPT2LMHeadModel(tf.GPT2Config(use_cache=False)).eval()
        else:
            model = tf.BertModel(tf.BertConfig()).eval()
        return model, (torch.randint(0, 1000, (batch, 128)),)

    return build


EXTERNAL_MODELS: dict[str, Callable[[int], tuple[torch.nn.Module, tuple[Any, ...]]]] = {
    "resnet50": _torchvision("resnet50"),
    "mobilenet_v3": _torchvision("mobilenet_v3_large"),
    "bert-base": _hf("bert"),
    "gpt2": _hf("gpt2"),
    "vit-base": _hf("vit"),
}


def build_model(name: str, batch: int) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    if name in zoo.ZOO:
        return zoo.get(name, batch=batch)
    if name in EXTERNAL_MODELS:
        return EXTERNAL_MODELS[name](batch)
    raise GraphoptError(
        f"unknown model {name!r}; choose from {', '.join([*zoo.ZOO, *EXTERNAL_MODELS])}"
    )


# -- modes: each returns a callable running the model, built (and compiled) for one device ---------


@dataclass
class Setup:
    model: torch.nn.Module
    inputs: tuple[Any, ...]
    device: str


def _eager(dtype: torch.dtype | None) -> Callable[[Setup], Runner]:
    def make(s: Setup) -> Runner:
        if dtype is not None and s.device != "cuda":
            raise ModeUnavailable(f"eager {dtype} is measured on the GPU only")
        model = s.model if dtype is None else _cast(s.model, dtype)

        def run(*args: Any) -> Any:
            with torch.no_grad():
                return model(*(_cast_input(a, dtype) for a in args))

        return run

    return make


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


def _cast_input(x: Any, dtype: torch.dtype | None) -> Any:
    if dtype is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    return x


def _torch_compile(mode: str | None, dtype: torch.dtype | None = None) -> Callable[[Setup], Runner]:
    def make(s: Setup) -> Runner:
        if (mode == "max-autotune" or dtype is not None) and s.device != "cuda":
            raise ModeUnavailable(f"torch.compile {mode or dtype} is measured on the GPU only")
        torch._dynamo.reset()  # a cold compile each time: no reuse of another batch's graphs
        compiled = torch.compile(s.model if dtype is None else _cast(s.model, dtype), mode=mode)

        def run(*args: Any) -> Any:
            with torch.no_grad():
                return compiled(*(_cast_input(a, dtype) for a in args))

        run(*s.inputs)  # compile now, so compile time is measured here
        return run

    return make


def _graphopt(pipeline: str, gpu_only: bool = False) -> Callable[[Setup], Runner]:
    def make(s: Setup) -> Runner:
        if gpu_only and s.device != "cuda":
            raise ModeUnavailable(f"graphopt {pipeline} is measured on the GPU only")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(s.model, s.inputs, pipeline=pipeline)

    return make


def _graphopt_int8(pipeline: str) -> Callable[[Setup], Runner]:
    """graphopt with int8, calibrated on 8 random batches shaped like the example inputs."""

    def make(s: Setup) -> Runner:
        g = torch.Generator().manual_seed(11)
        calib = [tuple(random_like(x, g) for x in s.inputs) for _ in range(8)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(s.model, s.inputs, pipeline=pipeline, calibration_data=calib)

    return make


def _onnxruntime(s: Setup) -> Runner:
    return _ort_runner(_original_onnx(s))


_ORIGINAL_ONNX: dict[int, tuple[Setup, Path]] = {}


def _original_onnx(s: Setup) -> Path:
    """The model as torch.onnx.export writes it (TorchScript exporter, symbolic batch), once per
    setup: the ONNX modes all start from this one file."""
    if s.device != "cpu":
        raise ModeUnavailable("the ONNX modes are measured on the CPU only (no onnxruntime-gpu)")
    cached = _ORIGINAL_ONNX.get(id(s))
    if cached is not None and cached[0] is s:
        return cached[1]
    path = Path(tempfile.mkdtemp(prefix="graphopt-bench-")) / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        names = [f"input_{i}" for i in range(len(pytree.tree_leaves(s.inputs)))]
        dynamic = {n: {0: "batch"} for n in names}
        try:
            torch.onnx.export(
                s.model, s.inputs, str(path), input_names=names, dynamic_axes=dynamic, dynamo=False
            )
        except Exception as exc:
            raise RuntimeError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}") from None
    _ORIGINAL_ONNX.clear()  # one model at a time: the previous setup's file is not needed
    _ORIGINAL_ONNX[id(s)] = (s, path)
    return path


def _ort_runner(path: Path) -> Runner:
    try:
        import onnxruntime as ort
    except Exception as exc:
        raise ModeUnavailable(f"onnxruntime not installed ({exc})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # Idle ORT threads otherwise spin and steal the cores from the mode timed next.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]

    def run(*args: Any) -> Any:
        leaves = [a.numpy() for a in pytree.tree_leaves(args)]
        outs = session.run(None, dict(zip(feed_names, leaves)))
        return [torch.from_numpy(o) for o in outs]

    return run


def _graphopt_onnx(pipeline: str) -> Callable[[Setup], Runner]:
    """graphopt on the graph imported from the original ONNX file."""

    def make(s: Setup) -> Runner:
        path = _original_onnx(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return graphopt.compile(str(path), s.inputs, pipeline=pipeline)

    return make


def _ort_on_export(build: Callable[[Setup], Runner]) -> Callable[[Setup], Runner]:
    """ONNX Runtime on graphopt's export (graphopt.export_onnx) of what ``build`` compiles."""

    def make(s: Setup) -> Runner:
        if s.device != "cpu":
            raise ModeUnavailable("the ONNX modes are measured on the CPU only")
        compiled = build(s)
        path = Path(tempfile.mkdtemp(prefix="graphopt-bench-")) / "graphopt.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            graphopt.export_onnx(compiled, path)
        return _ort_runner(path)

    return make


MODES: dict[str, Callable[[Setup], Runner]] = {
    "eager": _eager(None),
    "eager-fp16": _eager(torch.float16),
    "eager-bf16": _eager(torch.bfloat16),
    "torch.compile": _torch_compile(None),
    "torch.compile-max-autotune": _torch_compile("max-autotune"),
    "torch.compile-fp16": _torch_compile(None, torch.float16),
    **{f"graphopt{level}": _graphopt(level) for level in OPT_LEVELS},
    "graphopt-O2-fp16": _graphopt(half_pipeline("-O2", "fp16", 0.999), gpu_only=True),
    "graphopt-O2-bf16": _graphopt(half_pipeline("-O2", "bf16", 0.999), gpu_only=True),
    # pruning is judged for speed here: random-init zoo models lose accuracy when pruned and
    # need graphopt.recover, so the budget is off (min_cosine=0) in these modes
    "graphopt-O1-channel30": _graphopt("-O1,prune{kind=channel,amount=0.3,min_cosine=0.0}"),
    "graphopt-O1-2:4": _graphopt("-O1,prune{kind=2:4,amount=0.5,min_cosine=0.0}", gpu_only=True),
    "graphopt-O2-int8": _graphopt_int8("-O2,int8"),
    "graphopt-O2-int8-dynamic": _graphopt_int8("-O2,int8{act=dynamic}"),
    "onnxruntime": _onnxruntime,
    # the ONNX path: ORT on the original file (above), graphopt on the graph imported from it,
    # ORT on graphopt's export of that graph, and ORT on graphopt's int8 (QDQ) export; that one
    # is int8{measure=false}: graphopt's speed measurement judges its own kernels, not ORT's
    "onnx-graphopt-O2": _graphopt_onnx("-O2"),
    "onnxruntime-graphopt-O2": _ort_on_export(_graphopt_onnx("-O2")),
    "onnxruntime-graphopt-O2-int8": _ort_on_export(_graphopt_int8("-O2,int8{measure=false}")),
}
ONNX_MODES = [
    "onnxruntime",
    "onnx-graphopt-O2",
    "onnxruntime-graphopt-O2",
    "onnxruntime-graphopt-O2-int8",
]
DEFAULT_MODES = [
    "eager",
    "torch.compile",
    *(f"graphopt{level}" for level in OPT_LEVELS),
    "graphopt-O2-int8",
    "graphopt-O2-int8-dynamic",
    "graphopt-O1-channel30",
    "onnxruntime",
]
GPU_EXTRA_MODES = [
    "eager-fp16",
    "eager-bf16",
    "torch.compile-fp16",
    "torch.compile-max-autotune",
    "graphopt-O2-fp16",
    "graphopt-O2-bf16",
    "graphopt-O1-2:4",
]


# -- measuring -------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    mode: str
    batch: int
    status: str = "ok"  # ok | unavailable | failed
    reason: str = ""
    latency_ms: float | None = None  # median
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int = 0  # timed calls on the CPU; -1 on the GPU, where do_bench chooses
    compile_s: float | None = None
    peak_mem_mb: float | None = None
    max_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    speedup: float | None = None  # eager latency / this latency


@dataclass
class Settings:
    device: str = "cpu"
    threads: int = 1
    warmup: int = 3
    min_reps: int = 10
    min_time_s: float = 0.5
    rotate: int = 4
    rounds: int = 5  # CPU: modes take turns this many times


def random_like(x: Any, generator: torch.Generator) -> Any:
    """A fresh input like ``x``: normal floats; ints drawn from x's own range (ids stay valid,
    0/1 masks stay masks)."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.is_floating_point():
        return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    if x.dtype == torch.bool or x.numel() == 0:
        return x.clone()
    lo, hi = int(x.min()), int(x.max())
    if hi - lo <= 1:
        return x.clone()
    return torch.randint(lo, hi + 1, x.shape, generator=generator, dtype=x.dtype).to(x.device)


def input_sets(inputs: tuple[Any, ...], n: int, seed: int = 0) -> list[tuple[Any, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [pytree.tree_map(lambda x: random_like(x, g), inputs) for _ in range(n)]


def output_errors(got: Any, want: Any) -> dict[str, float]:
    """Worst max-abs, relative-L2 and cosine over the float outputs, against eager fp32."""
    g, w = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(g) != len(w):
        raise RuntimeError(f"{len(g)} outputs instead of {len(w)}")
    pairs = [(a, b) for a, b in zip(g, w) if isinstance(b, torch.Tensor) and b.is_floating_point()]
    for a, b in pairs:
        if tuple(a.shape) != tuple(b.shape):
            raise RuntimeError(f"output shape {tuple(a.shape)} instead of {tuple(b.shape)}")
    return {
        "max_abs": max((metrics.max_abs(a, b) for a, b in pairs), default=0.0),
        "rel_l2": max((metrics.rel_l2(a, b) for a, b in pairs), default=0.0),
        "cosine": min((metrics.cosine(a, b) for a, b in pairs), default=1.0),
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def _memory(device: str, out: dict[str, float]) -> Iterator[None]:
    """GPU: peak allocated by torch. CPU: resident-set growth of the process during the mode."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        torch.cuda.synchronize()
        out["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        base = _rss_mb()
        yield
        out["peak_mem_mb"] = max(0.0, _rss_mb() - base)


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


def _summary(times: list[float]) -> Timing:
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
    return Timing(statistics.median(times), q[0], q[-1], len(times))


def time_runners(
    runs: Sequence[Runner], sets: Sequence[tuple[Any, ...]], settings: Settings
) -> list[Timing]:
    """Latency of each runner over rotating inputs, after warm-up.

    CPU: the runners take turns in ``settings.rounds`` rounds, so a slow spell of a shared machine
    lands on every mode rather than on whichever ran then. GPU: ``triton.testing.do_bench``.
    """
    for run in runs:
        for i in range(settings.warmup):
            run(*sets[i % len(sets)])
    if settings.device == "cuda":
        return [_do_bench(run, sets, settings) for run in runs]
    times: list[list[float]] = [[] for _ in runs]
    reps = max(1, math.ceil(settings.min_reps / settings.rounds))
    budget = settings.min_time_s / settings.rounds
    for _ in range(settings.rounds):
        for run, out in zip(runs, times):
            start, i = time.perf_counter(), 0
            while i < reps or time.perf_counter() - start < budget:
                t0 = time.perf_counter()
                run(*sets[(len(out)) % len(sets)])
                out.append((time.perf_counter() - t0) * 1e3)
                i += 1
    return [_summary(t) for t in times]


def _do_bench(run: Runner, sets: Sequence[tuple[Any, ...]], settings: Settings) -> Timing:
    from triton.testing import do_bench

    state = {"i": 0}

    def call() -> None:
        state["i"] += 1
        run(*sets[state["i"] % len(sets)])

    rep_ms = max(100, int(settings.min_time_s * 1000))
    p10, p50, p90 = do_bench(call, warmup=25, rep=rep_ms, quantiles=[0.1, 0.5, 0.9])
    return Timing(float(p50), float(p10), float(p90), -1)  # do_bench picks the count


def _to_device(x: Any, device: str) -> Any:
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


def bench_model(
    name: str,
    modes: Sequence[str],
    batch: int,
    settings: Settings,
    on_mode: Callable[[str], None] | None = None,
) -> list[Result]:
    """Every mode of one model, in this process, on the same inputs."""
    try:
        model, inputs = build_model(name, batch)
    except ModeUnavailable as exc:
        return [Result(name, m, batch, "unavailable", str(exc)) for m in modes]
    model = model.eval().to(settings.device)
    inputs = _to_device(inputs, settings.device)
    sets = [_to_device(s, settings.device) for s in input_sets(inputs, settings.rotate)]
    check = sets[0]
    with torch.no_grad():
        reference = model(*check)
    setup = Setup(model, inputs, settings.device)
    results, runs = [], []
    for mode in modes:
        if on_mode:
            on_mode(mode)
        result, run = _prepare_mode(name, mode, batch, setup, check, reference, settings)
        results.append(result)
        runs.append(run)
    ready = [(r, run) for r, run in zip(results, runs) if run is not None]
    try:
        timings = time_runners([run for _, run in ready], sets, settings)
    except Exception as exc:  # a mode that worked once and then failed while timed
        for r, _ in ready:
            r.status, r.reason = "failed", f"while timing: {_one_line(exc)}"
        return results
    for (r, _), timing in zip(ready, timings):
        r.latency_ms, r.p10_ms, r.p90_ms, r.reps = (
            timing.median_ms,
            timing.p10_ms,
            timing.p90_ms,
            timing.reps,
        )
    eager = next((r for r in results if r.mode == "eager" and r.latency_ms), None)
    for r in results:
        if eager and r.latency_ms:
            r.speedup = eager.latency_ms / r.latency_ms  # type: ignore[operator]
    return results


def _one_line(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first[:300]}"


def _prepare_mode(
    name: str,
    mode: str,
    batch: int,
    setup: Setup,
    check: tuple[Any, ...],
    reference: Any,
    settings: Settings,
) -> tuple[Result, Runner | None]:
    """Build (compile) one mode, measure its compile time and memory, check its outputs."""
    result = Result(name, mode, batch)
    if mode not in MODES:
        result.status, result.reason = "failed", f"unknown mode {mode!r}"
        return result, None
    mem: dict[str, float] = {}
    try:
        with _memory(settings.device, mem):
            t0 = time.perf_counter()
            run = MODES[mode](setup)
            result.compile_s = time.perf_counter() - t0
            result.__dict__.update(output_errors(run(*check), reference))
    except ModeUnavailable as exc:
        result.status, result.reason = "unavailable", str(exc)
        return result, None
    except Exception as exc:  # a mode failing is a finding to report, not a crash
        result.status, result.reason = "failed", _one_line(exc)
        return result, None
    result.peak_mem_mb = mem.get("peak_mem_mb")
    return result, run


# -- scaling ---------------------------------------------------------------------------------------


def batch_scaling(
    models: Sequence[str],
    modes: Sequence[str],
    batches: Sequence[int],
    settings: Settings,
    progress: Callable[[str], None],
) -> list[Result]:
    out = []
    for name in models:
        for batch in batches:
            progress(f"batch scaling: {name} batch {batch}")
            out += bench_model(name, modes, batch, settings)
    return out


def compile_scaling(
    depths: Sequence[int], settings: Settings, progress: Callable[[str], None]
) -> list[dict[str, Any]]:
    """graphopt -O1 compile time (and graph size) for zoo GPT decoders of growing depth."""
    rows = []
    for depth in depths:
        progress(f"compile scaling: gpt with {depth} layers")
        model, inputs = zoo.gpt(batch=2, layers=depth)
        model, inputs = model.to(settings.device), _to_device(inputs, settings.device)
        t0 = time.perf_counter()
        compiled = graphopt.compile(model, inputs, pipeline="-O1")
        total = time.perf_counter() - t0
        nodes = compiled.report.records[0].nodes_before if compiled.report.records else 0
        passes = sum(r.time_s + r.verify_s for r in compiled.report.records)
        rows.append({"layers": depth, "nodes": nodes, "compile_s": total, "passes_s": passes})
    return rows


def growth_exponent(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of log(y) against log(x): 1.0 is linear growth."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


# -- environment and output ------------------------------------------------------------------------


def environment(settings: Settings) -> dict[str, Any]:
    def version(module: str) -> str:
        try:
            return str(__import__(module).__version__)
        except Exception:
            return "not installed"

    device = torch.cuda.get_device_name() if settings.device == "cuda" else _cpu_name()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_kind": settings.device,
        "threads": settings.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "onnx": version("onnx"),
        "onnxruntime": version("onnxruntime"),
        "graphopt": graphopt.__version__,
        "method": (
            "all modes in one process; warm-up then median of rotating random inputs "
            + (
                "(triton.testing.do_bench)"
                if settings.device == "cuda"
                else f"(modes take turns in {settings.rounds} rounds; per mode >= {settings.min_reps} calls "
                f"and >= {settings.min_time_s} s; {settings.threads} thread(s))"
            )
        ),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(results: Sequence[Result]) -> str:
    lines = [
        "| model | batch | mode | median ms | p10-p90 ms | speedup vs eager | compile s | mem MB | max abs err | cosine | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown: set[tuple[str, int]] = set()
    for r in results:
        same = [o for o in results if (o.model, o.batch) == (r.model, r.batch)]
        if all(o.status == "unavailable" and o.reason == r.reason for o in same):
            if (r.model, r.batch) not in shown:  # one row for a model no mode could run
                shown.add((r.model, r.batch))
                lines.append(
                    f"| {r.model} | {r.batch} | all modes | - | - | - | - | - | - | - | unavailable: {r.reason} |"
                )
            continue
        spread = "-" if r.p10_ms is None else f"{r.p10_ms:.3g}-{r.p90_ms:.3g}"
        status = r.status if r.status == "ok" else f"{r.status}: {r.reason}"
        lines.append(
            f"| {r.model} | {r.batch} | {r.mode} | {_fmt(r.latency_ms, '.3f')} | {spread} | "
            f"{_fmt(r.speedup, '.2f')} | {_fmt(r.compile_s, '.2f')} | {_fmt(r.peak_mem_mb, '.0f')} | "
            f"{_fmt(r.max_abs, '.1e')} | {_fmt(r.cosine, '.6f')} | {status.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def compile_table(rows: Sequence[dict[str, Any]], exponent: float | None) -> str:
    lines = [
        "| gpt layers | graph nodes | graphopt -O1 compile s | of which passes + checks s |",
        "|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['layers']} | {row['nodes']} | {row['compile_s']:.2f} | {row['passes_s']:.2f} |"
        )
    if exponent is not None:
        lines.append(
            f"\nGrowth exponent of compile time against graph size (log-log slope; 1.0 is linear): **{exponent:.2f}**"
        )
    return "\n".join(lines) + "\n"


@dataclass
class BenchReport:
    env: dict[str, Any]
    results: list[Result]
    batch_scaling: list[Result] = field(default_factory=list)
    compile_scaling: list[dict[str, Any]] = field(default_factory=list)
    compile_exponent: float | None = None
    kernels: list[dict[str, Any]] = field(default_factory=list)
    kernels_note: str = ""

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=1, default=str)

    def to_markdown(self, plots: Sequence[str] = ()) -> str:
        env = self.env
        parts = [
            f"Measured {env['date']} on {env['device']}; torch {env['torch']}, triton {env['triton']}, "
            f"onnxruntime {env['onnxruntime']}, python {env['python']}. Method: {env['method']}.\n",
            "Error columns compare each mode's outputs with eager fp32 on the same input.\n",
            markdown_table(self.results),
        ]
        if self.batch_scaling:
            parts += ["\n### Latency against batch size\n", markdown_table(self.batch_scaling)]
        if self.compile_scaling:
            parts += [
                "\n### Compile time against model depth\n",
                compile_table(self.compile_scaling, self.compile_exponent),
            ]
        parts += [
            "\n### Kernels\n",
            kernel_table(self.kernels) if self.kernels else self.kernels_note,
        ]
        parts += [f"\n![{Path(p).stem}]({p})\n" for p in plots]
        return "\n".join(parts)


def kernel_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per kernel measurement from ``graphopt.kernels.bench.kernel_benchmarks``."""
    head = "| kernel | shape | dtype | ms | baseline ms | speedup | rate | max rel err |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        rate = r.get("gbps") or r.get("tflops") or r.get("tops")
        unit = next(
            (
                u
                for k, u in (("gbps", " GB/s"), ("tflops", " TFLOPS"), ("tops", " TOPS"))
                if r.get(k)
            ),
            "",
        )
        lines.append(
            f"| {r.get('name')} | {r.get('shape')} | {r.get('dtype')} | {_fmt(r.get('ms'), '.4f')} "
            f"| {_fmt(r.get('baseline_ms'), '.4f')} | {_fmt(r.get('speedup'), '.2f')} "
            f"| {_fmt(rate, '.1f')}{unit if rate else ''} | {_fmt(r.get('max_rel_err'), '.1e')} |"
        )
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------------


def parse_list(text: str | None, default: Sequence[str]) -> list[str]:
    if text is None or text.strip() == "":
        return list(default)
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GraphoptError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise GraphoptError(f"expected positive integers, got {text!r}")
    return values


def resolve_modes(text: str | None, device: str) -> list[str]:
    default = DEFAULT_MODES + (GPU_EXTRA_MODES if device == "cuda" else [])
    modes = parse_list(text, default)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise GraphoptError(f"unknown mode(s) {', '.join(unknown)}; modes: {', '.join(MODES)}")
    if "eager" not in modes:
        modes.insert(0, "eager")  # the baseline every speedup and error is relative to
    return modes


def resolve_models(text: str | None) -> list[str]:
    models = parse_list(text, [*zoo.ZOO, *EXTERNAL_MODELS])
    known = [*zoo.ZOO, *EXTERNAL_MODELS]
    unknown = [m for m in models if m not in known]
    if unknown:
        raise GraphoptError(f"unknown model(s) {', '.join(unknown)}; models: {', '.join(known)}")
    return models


def add_arguments(p: Any) -> None:
    p.add_argument(
        "--models",
        default=None,
        help=f"comma-separated; default the zoo ({','.join(zoo.ZOO)}) and {','.join(EXTERNAL_MODELS)} "
        "(reported unavailable when torchvision/transformers are missing)",
    )
    p.add_argument(
        "--modes",
        default=None,
        help=f"comma-separated; default {','.join(DEFAULT_MODES)} (+GPU modes on cuda)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--batch", type=int, default=8, help="batch size of the main table")
    p.add_argument(
        "--out", default="bench-out", help="folder for results.json, results.md and plots"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads, the same for every mode (default 1: on small shared machines the "
        "thread pools of different runtimes disturb each other's timings)",
    )
    p.add_argument(
        "--min-time", type=float, default=0.5, help="seconds of timed calls per mode (CPU)"
    )
    p.add_argument("--min-reps", type=int, default=10, help="timed calls per mode at least (CPU)")
    p.add_argument("--rounds", type=int, default=5, help="CPU: modes take turns this many times")
    p.add_argument(
        "--scaling-batches",
        default="1,4,16,64,256",
        help="batch sizes for the latency-vs-batch plot ('' to skip)",
    )
    p.add_argument(
        "--scaling-models", default="resnet,bert", help="models for the latency-vs-batch plot"
    )
    p.add_argument(
        "--scaling-modes",
        default="eager,torch.compile,graphopt-O1,onnxruntime",
        help="modes for the latency-vs-batch plot",
    )
    p.add_argument(
        "--depths",
        default="2,4,8,16,32,48",
        help="gpt depths for the compile-time plot ('' to skip)",
    )
    p.add_argument(
        "--docs", default=None, help="also write this markdown page (e.g. docs/benchmarks.md)"
    )
    p.add_argument(
        "--kernels",
        choices=("auto", "yes", "no"),
        default="auto",
        help="kernel microbenchmarks (copy bandwidth, norms, GEMM epilogue, attention); "
        "auto: on cuda only",
    )


def run(args: Any, console: Any) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from graphopt.tools import bench_plots

    if args.device == "cuda" and not torch.cuda.is_available():
        raise GraphoptError(
            "--device cuda but torch.cuda.is_available() is False; use --device cpu"
        )
    settings = Settings(
        device=args.device,
        threads=args.threads,
        min_reps=args.min_reps,
        min_time_s=args.min_time,
        rounds=args.rounds,
    )
    torch.set_num_threads(settings.threads)
    models = resolve_models(args.models)
    modes = resolve_modes(args.modes, args.device)
    batches = parse_ints(args.scaling_batches) if args.scaling_batches else []
    depths = parse_ints(args.depths) if args.depths else []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = BenchReport(environment(settings), [])
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        steps = (
            len(models) * len(modes)
            + len(batches) * len(parse_list(args.scaling_models, []))
            + len(depths)
        )
        task = progress.add_task("bench", total=steps)

        def step(text: str) -> None:
            progress.update(task, description=text, advance=1)

        for name in models:
            report.results += bench_model(
                name, modes, args.batch, settings, lambda m, n=name: step(f"{n}: {m}")
            )
        if batches:
            scale_modes = resolve_modes(args.scaling_modes, args.device)
            report.batch_scaling = batch_scaling(
                resolve_models(args.scaling_models), scale_modes, batches, settings, step
            )
        if depths:
            report.compile_scaling = compile_scaling(depths, settings, step)
            report.compile_exponent = growth_exponent(
                [r["nodes"] for r in report.compile_scaling],
                [r["compile_s"] for r in report.compile_scaling],
            )
    report.kernels, report.kernels_note = kernel_results(args, settings)
    plots = [bench_plots.speedup_plot(report.results, out / "speedup.png")]
    if report.batch_scaling:
        plots.append(bench_plots.batch_plot(report.batch_scaling, out / "latency_vs_batch.png"))
    if report.compile_scaling:
        plots.append(bench_plots.compile_plot(report.compile_scaling, out / "compile_vs_depth.png"))
    (out / "results.json").write_text(report.to_json())
    (out / "results.md").write_text(report.to_markdown([p.name for p in plots]))
    if args.docs:
        write_docs(Path(args.docs), report, plots, args)
    console.print(markdown_table(report.results), markup=False, highlight=False)
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'} and {len(plots)} plot(s)")
    return 0


def kernel_results(args: Any, settings: Settings) -> tuple[list[dict[str, Any]], str]:
    """Kernel microbenchmarks on the GPU, or the note saying why they are unmeasured."""
    wanted = getattr(args, "kernels", "auto")
    if wanted == "no" or (wanted == "auto" and settings.device != "cuda"):
        return [], (
            "Unmeasured in this run: the kernel microbenchmarks (generated pointwise and norm "
            "kernels against copy bandwidth at 64M elements, GEMM with fused epilogue against "
            "cuBLAS plus a separate epilogue, attention against SDPA) run with `--device cuda`."
        )
    from graphopt.kernels.bench import kernel_benchmarks

    return kernel_benchmarks(settings.device), ""


def write_docs(page: Path, report: BenchReport, plots: Sequence[Path], args: Any) -> None:
    rel = [os.path.relpath(p, page.parent) for p in plots]
    command = "graphopt bench " + " ".join(
        f"--{k.replace('_', '-')} {v!r}"
        if " " in str(v) or v == ""
        else f"--{k.replace('_', '-')} {v}"
        for k, v in sorted(vars(args).items())
        if k not in ("func", "command", "docs") and v is not None
    )
    page.write_text(
        "# Benchmarks\n\n"
        "Written by `graphopt bench` (tools/bench.py); every figure below was measured in the run it "
        "describes. GPU figures appear only after a run with `--device cuda` on a GPU machine; until "
        "then they are unmeasured.\n\n"
        f"Reproduce:\n\n```bash\n{command} --docs {page}\n```\n\n"
        "Method: every mode of a model runs in one process on the same inputs; warm-up, then the "
        "median of timed calls over rotating random inputs (CPU: a fixed thread count and "
        "`time.perf_counter` per call; GPU: `triton.testing.do_bench`). Compile time is the wall time "
        "to build the mode (for torch.compile, its first call). Memory: GPU, peak allocated by torch; "
        "CPU, growth of the process's resident set while the mode is built and run (a rough figure). "
        "Errors compare each mode's outputs with eager fp32 on the same input. torch.compile's "
        "compile time is measured after `torch._dynamo.reset()`, but Inductor's on-disk cache from "
        "earlier runs on the machine may still serve it. Models from torchvision and Hugging Face "
        "are built from their configs with random weights when those packages are installed, and "
        "reported unavailable otherwise.\n\n"
        "## Latest run\n\n" + report.to_markdown(rel) + unmeasured_note(report)
    )


GPU_TARGETS = (
    "generated pointwise and norm kernels at 64M elements against device-to-device copy "
    "bandwidth (target: at least 90%)",
    "GEMM with fused epilogue against cuBLAS GEMM plus a separate epilogue on BERT-base and "
    "GPT-2 shapes (target: faster)",
    "graphopt -O2 fp16 (`graphopt-O2-fp16`) end to end against `torch.compile-fp16` on the zoo "
    "and on HF BERT-base, GPT-2 small and torchvision ResNet-50 (target: no slower)",
    "compile time of graphopt -O2 against torch.compile on the same models (target: at most half)",
)


def unmeasured_note(report: BenchReport) -> str:
    """The GPU figures a CPU run leaves unmeasured, named so nobody mistakes them for measured."""
    if report.env.get("device_kind") != "cuda":
        items = "\n".join(f"- {t}" for t in GPU_TARGETS)
        return (
            "\n\n## Unmeasured in this run\n\nThis run had no GPU, so these GPU figures are "
            f"unmeasured (they come from `graphopt bench --device cuda`):\n\n{items}\n"
        )
    return ""
