"""Run the onnx package's own backend test cases through graphopt's importer.

Two sources, both shipped in the installed onnx wheel: the node cases
(``onnx.backend.test.case.node.collect_testcases``, models with inputs and expected outputs built
in Python) and the converted PyTorch models under ``onnx/backend/test/data/pytorch-converted`` and
``pytorch-operator`` (``model.onnx`` plus ``test_data_set_*/{input,output}_*.pb``).

A case whose op types are all in ``graphopt.frontends.onnx_ops.OPS`` is imported (without graph cleanup, so
graphopt's own op implementations are what is tested, not onnx-graphsurgeon's constant folding
through ONNX Runtime) and compared with the expected outputs at per-dtype tolerances, at three
levels: ``eager`` (the imported ``OnnxModule`` called directly), and ``-O0`` / ``-O2``
(``graphopt.compile`` of that module with the case's first data set as example inputs: capture
through torch.export, the pipeline with every pass verified, then every data set through the
compiled model). ``python -m tests.onnx.backend_cases`` writes the per-op table of all three to
docs/onnx_import_cases.md (the full sweep; the test runs the eager level in full and a
deterministic sample of the compiled levels, see test_backend_cases.py).
"""

from __future__ import annotations

import collections
import glob
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import graphopt
from graphopt.frontends.onnx_import import load_onnx
from graphopt.frontends.onnx_ops import DTYPES, OPS

LEVELS = ("eager", "-O0", "-O2")  # eager import, then graphopt.compile at these pipelines

# Tolerance floors per output dtype; a case's own rtol/atol apply when they are looser.
TOLERANCE = {
    np.dtype("float16"): (1e-2, 1e-3),
    np.dtype("float32"): (1e-3, 1e-6),
    np.dtype("float64"): (1e-7, 1e-12),
}
BFLOAT16_TOLERANCE = (1.6e-2, 1e-2)  # compared in float32 after the bits are moved


# Every supported-op case that fails, with the reason; the test fails on any other failure and on
# a listed case that passes (so the list stays exact).
_TRAINING = "training mode (graphopt imports for inference)"
_BLOCKED = "blocked quantization (block_size, opset 21)"
_ATTENTION = "Attention with nonpad_kv_seqlen or a sliding window"
KNOWN_FAILURES: dict[str, str] = {
    "test_training_dropout_default": _TRAINING + "; its output is random",
    "test_training_dropout_default_mask": _TRAINING + "; its output is random",
    "test_training_dropout": _TRAINING + "; its output is random",
    "test_training_dropout_mask": _TRAINING + "; its output is random",
    "test_training_dropout_zero_ratio": _TRAINING,
    "test_training_dropout_zero_ratio_mask": _TRAINING,
    "test_dequantizelinear_blocked": _BLOCKED,
    "test_quantizelinear_blocked_asymmetric": _BLOCKED,
    "test_quantizelinear_blocked_symmetric": _BLOCKED,
    # Attention (opset 23+): the padded-KV (nonpad_kv_seqlen, opset 24) and sliding-window
    # (opset 25) forms are refused by name
    "test_attention_4d_diff_heads_mask4d_padded_kv": _ATTENTION,
    "test_attention_4d_padded_kv_bf16": _ATTENTION,
    "test_attention_4d_causal_padded_kv_bf16": _ATTENTION,
    "test_attention_4d_gqa_causal_nonpad_decode": _ATTENTION,
    "test_attention_4d_gqa_causal_nonpad_decode_fp16": _ATTENTION,
    "test_attention_4d_causal_nonpad_continued_prefill": _ATTENTION,
    "test_attention_4d_causal_nonpad_negative_offset_structural_empty": _ATTENTION,
    "test_attention_4d_causal_nonpad_attn_mask_composition": _ATTENTION,
    "test_attention_4d_causal_nonpad_batch_prefill": _ATTENTION,
    "test_attention_local_window": _ATTENTION,
    "test_attention_bidirectional_window": _ATTENTION,
    "test_attention_local_window_rank1_boolean_mask": _ATTENTION,
    "test_attention_local_window_with_past": _ATTENTION,
    "test_attention_local_window_ext_cache_rank3_head_mask": _ATTENTION,
    "test_attention_local_window_ext_cache_rank4_batch_mask": _ATTENTION,
    "test_attention_local_window_ext_cache_rank2_mask": _ATTENTION,
    "test_attention_local_window_ext_cache_float16_mask": _ATTENTION,
    "test_attention_3d_local_window": _ATTENTION,
    "test_attention_local_window_gqa_rank4_mask": _ATTENTION,
    # Resize: nearest in every mode (a gather of computed indices); linear/cubic through interpolate
    # in the common coordinate modes; the rest are refused by name
    "test_resize_downsample_scales_linear_align_corners": "Resize align_corners to a size-1 dim (ONNX samples 0, torch does not)",
    "test_resize_downsample_scales_cubic_align_corners": "Resize cubic align_corners downsampling (torch samples differently)",
    "test_resize_upsample_scales_cubic_A_n0p5_exclude_outside": "Resize cubic with cubic_coeff_a other than -0.75",
    "test_resize_downsample_scales_cubic_A_n0p5_exclude_outside": "Resize cubic with cubic_coeff_a other than -0.75",
    "test_resize_upsample_scales_cubic_asymmetric": "Resize mode 'cubic' with asymmetric",
    "test_resize_tf_crop_and_resize": "Resize mode 'linear' with tf_crop_and_resize",
    "test_resize_tf_crop_and_resize_extrapolation_value": "Resize mode 'linear' with tf_crop_and_resize",
    "test_resize_downsample_sizes_linear_pytorch_half_pixel": "Resize pytorch_half_pixel to a size-1 dim (ONNX samples 0, torch does not)",
    "test_resize_downsample_scales_linear_antialias": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_downsample_sizes_linear_antialias": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_downsample_scales_cubic_antialias": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_downsample_sizes_cubic_antialias": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_tf_crop_and_resize_axes_2_3": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_tf_crop_and_resize_axes_3_2": "Resize with axes, antialias or keep_aspect_ratio_policy",
    "test_resize_downsample_scales_linear_half_pixel_symmetric": "Resize mode 'linear' with half_pixel_symmetric",
    "test_resize_upsample_scales_linear_half_pixel_symmetric": "Resize mode 'linear' with half_pixel_symmetric",
}

# Cases that pass eagerly but fail through graphopt.compile (at -O0 and -O2), and those that
# fail only at -O2, with the reason
_PAD_VALUE = (
    "the expanded Attention body pads with a value computed from tensors, which torch.export "
    "cannot read as a number (Pad's constant_value)"
)
KNOWN_COMPILED_FAILURES: dict[str, str] = {
    "test_attention_causal_boolmask_nan_robustness_expanded": _PAD_VALUE,
    "test_attention_24_fullymasked_qk_matmul_output_mode3_zero_expanded": _PAD_VALUE,
    "test_attention_24_qk_matmul_output_mode3_softmax_precision_expanded": _PAD_VALUE,
    "test_attention_4d_diff_heads_mask4d_padded_kv_expanded": _PAD_VALUE,
    "test_attention_4d_padded_kv_bf16_expanded": _PAD_VALUE,
    "test_attention_4d_causal_padded_kv_bf16_expanded": _PAD_VALUE,
    "test_attention_4d_causal_nonpad_attn_mask_composition_expanded": _PAD_VALUE,
    "test_attention_local_window_rank1_boolean_mask_expanded": _PAD_VALUE,
    "test_attention_local_window_ext_cache_rank3_head_mask_expanded": _PAD_VALUE,
    "test_attention_local_window_ext_cache_rank4_batch_mask_expanded": _PAD_VALUE,
    "test_attention_local_window_ext_cache_rank2_mask_expanded": _PAD_VALUE,
    "test_attention_local_window_ext_cache_float16_mask_expanded": _PAD_VALUE,
    "test_attention_local_window_gqa_rank4_mask_expanded": _PAD_VALUE,
}
KNOWN_O2_FAILURES: dict[str, str] = {}


@dataclass
class Case:
    name: str
    source: str  # "node", "pytorch-converted" or "pytorch-operator"
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class Outcome:
    case: Case
    ops: tuple[str, ...]
    status: str  # "pass", "fail" or "unsupported"
    reason: str = ""


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0
    level: str = "eager"

    def by_status(self, status: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]


def op_types(model: onnx.ModelProto) -> tuple[str, ...]:
    keys = set()
    for node in model.graph.node:
        keys.add(
            node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        )
    return tuple(sorted(keys))


def node_cases() -> Iterator[Case]:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    for c in cases:
        sets = [(list(inputs), list(outputs)) for inputs, outputs in c.data_sets]
        yield Case(c.name, "node", c.model, sets, c.rtol, c.atol)


def converted_cases() -> Iterator[Case]:
    import onnx.backend.test as backend_test

    root = os.path.join(os.path.dirname(backend_test.__file__), "data")
    for source in ("pytorch-converted", "pytorch-operator"):
        for folder in sorted(glob.glob(os.path.join(root, source, "*"))):
            model_path = os.path.join(folder, "model.onnx")
            if not os.path.isfile(model_path):
                continue
            sets = []
            for data in sorted(glob.glob(os.path.join(folder, "test_data_set_*"))):
                sets.append((_tensors(data, "input"), _tensors(data, "output")))
            yield Case(os.path.basename(folder), source, onnx.load(model_path), sets)


def _tensors(folder: str, kind: str) -> list[np.ndarray]:
    files = sorted(
        glob.glob(os.path.join(folder, f"{kind}_*.pb")), key=lambda f: int(f.rsplit("_", 1)[1][:-3])
    )
    return [numpy_helper.to_array(onnx.load_tensor(f)) for f in files]


def all_cases() -> list[Case]:
    return list(node_cases()) + list(converted_cases())


def run_case(case: Case, level: str = "eager") -> Outcome:
    """The case at ``level``: "eager" calls the imported module; "-O0"/"-O2" compile it with
    the first data set as example inputs and run every data set through the compiled model."""
    ops = op_types(case.model)
    missing = [op for op in ops if op not in OPS]
    if missing:
        return Outcome(case, ops, "unsupported", ", ".join(missing))
    kinds = unsupported_types(case.model)
    if kinds:
        return Outcome(case, ops, "unsupported", ", ".join(kinds))
    try:
        module = load_onnx(case.model, cleanup=False)
        if level != "eager":
            example = tuple(_to_torch(x) for x in case.data_sets[0][0])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rollbacks and static-shape fallbacks
                module = graphopt.compile(module, example, pipeline=level)
        for inputs, expected in case.data_sets:
            args = [_to_torch(x) for x in inputs]
            with torch.no_grad():
                got = module(*args)
            got = got if isinstance(got, tuple) else (got,)
            problem = compare(got, expected, case.rtol, case.atol)
            if problem:
                return Outcome(case, ops, "fail", problem)
    except Exception as exc:  # each case's failure is recorded with its reason, not raised
        return Outcome(case, ops, "fail", f"{type(exc).__name__}: {first_line(exc)}")
    return Outcome(case, ops, "pass")


def unsupported_types(model: onnx.ModelProto) -> list[str]:
    """The graph's input/output value types that graphopt does not import, as 'dtype:NAME'
    (string, float8, 4-bit, complex) or 'value:KIND' (sequences, optionals, maps)."""
    out = []
    for v in list(model.graph.input) + list(model.graph.output):
        kind = v.type.WhichOneof("value")
        if kind != "tensor_type":
            out.append(f"value:{kind}")
        elif v.type.tensor_type.elem_type not in DTYPES:
            out.append(f"dtype:{onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}")
    return sorted(set(out))


def _array(x: Any) -> np.ndarray:
    if isinstance(x, onnx.TensorProto):
        return numpy_helper.to_array(x)
    return np.asarray(x)


def _to_torch(x: Any) -> Any:
    x = _array(x)
    x = np.ascontiguousarray(x).reshape(x.shape)  # ascontiguousarray alone makes a 0-d array 1-d
    if x.dtype.name == "bfloat16":  # numpy has no bfloat16 of its own: move the bits
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def compare(got: tuple[Any, ...], expected: list[Any], rtol: float, atol: float) -> str:
    """'' when every output matches (shape, dtype, values within tolerance), else why not."""
    if len(got) != len(expected):
        return f"{len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        e = _array(e)
        tolerance = TOLERANCE.get(e.dtype, (rtol, atol))
        if e.dtype.name == "bfloat16":
            e, tolerance = e.astype(np.float32), BFLOAT16_TOLERANCE
            g = g.float() if isinstance(g, torch.Tensor) and g.dtype == torch.bfloat16 else g
        g = g.detach().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        if g.shape != e.shape:
            return f"output {i}: shape {g.shape}, expected {e.shape}"
        if g.dtype != e.dtype:
            return f"output {i}: dtype {g.dtype}, expected {e.dtype}"
        if e.dtype.kind in "fc":
            floor_rtol, floor_atol = tolerance
            r, a = max(rtol, floor_rtol), max(atol, floor_atol)
            gf, ef = g.astype(np.float64), e.astype(np.float64)
            close = np.isclose(gf, ef, rtol=r, atol=a, equal_nan=True)
            if not close.all():
                err = float(np.nanmax(np.abs(gf - ef)))
                return f"output {i}: {int((~close).sum())}/{close.size} values off (max abs err {err:.3g})"
        elif not np.array_equal(g, e):
            return f"output {i}: {int((g != e).sum())}/{e.size} values differ"
    return ""


def first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()[:160]
    return ""


def run_all(cases: list[Case] | None = None, level: str = "eager") -> Run:
    start = time.perf_counter()
    run = Run([run_case(c, level) for c in (cases if cases is not None else all_cases())])
    run.seconds = time.perf_counter() - start
    run.level = level
    return run


def per_op_table(run: Run) -> list[tuple[str, int, int]]:
    """(op type, passed, run) for every supported op type; a case counts under each op in it."""
    passed: dict[str, int] = collections.Counter()
    ran: dict[str, int] = collections.Counter()
    for o in run.outcomes:
        if o.status == "unsupported":
            continue
        for op in o.ops:
            ran[op] += 1
            passed[op] += o.status == "pass"
    return [(op, passed[op], ran[op]) for op in sorted(ran)]


def known_failures(level: str) -> dict[str, str]:
    """The cases expected to fail at ``level``, with their reasons."""
    known = dict(KNOWN_FAILURES)
    if level != "eager":
        known.update(KNOWN_COMPILED_FAILURES)
    if level == "-O2":
        known.update(KNOWN_O2_FAILURES)
    return known


def unexpected(run: Run) -> tuple[dict[str, str], list[str]]:
    """(failures not listed for the run's level, listed cases that pass): both empty when the
    known-failure lists are exact."""
    known = known_failures(run.level)
    failing = {o.case.name: o.reason for o in run.by_status("fail") if o.case.name not in known}
    passing = [o.case.name for o in run.by_status("pass") if o.case.name in known]
    return failing, passing


def _rate(run: Run) -> str:
    n_pass, n_ran = len(run.by_status("pass")), len(run.by_status("pass") + run.by_status("fail"))
    return f"{n_pass} / {n_ran} ({100 * n_pass / max(n_ran, 1):.1f}%)"


def markdown(runs: list[Run]) -> str:
    """docs/onnx_import_cases.md from one run per level (eager, -O0, -O2), all over every case."""
    tables = {r.level: {op: (p, n) for op, p, n in per_op_table(r)} for r in runs}
    first = runs[0]
    n_unsup = len(first.by_status("unsupported"))
    lines = [
        "# ONNX import: backend test cases",
        "",
        "Generated by `python -m tests.onnx.backend_cases` (about "
        f"{sum(r.seconds for r in runs) / 60:.0f} minutes on 2 cores): the onnx wheel's node test "
        "cases and its converted PyTorch models, each imported by graphopt without cleanup and "
        "compared with the expected outputs at three levels: `eager` (the imported module "
        "called directly), `-O0` and `-O2` (`graphopt.compile` of that module with the case's "
        "first data set as example inputs, then every data set through the compiled model). A "
        "case counts under every op type in its graph. Inputs that an op reads as numbers (a "
        "Reshape's shape, Slice's starts, TopK's k) are specialized to the example's values "
        'when compiled (docs/onnx.md, "Shape inputs").',
        "",
        f"onnx {onnx.__version__}, torch {torch.__version__}: {len(first.outcomes)} cases; "
        f"{len(first.outcomes) - n_unsup} in scope, {n_unsup} use an op type or a value type "
        "(string, float8, 4-bit, sequence) graphopt does not import. Passed / in scope: "
        + "; ".join(f"{r.level} {_rate(r)} in {r.seconds:.0f} s" for r in runs)
        + ". Every failure is listed below with its reason.",
        "",
        "| op type | " + " | ".join(r.level for r in runs) + " |",
        "|---|" + "---:|" * len(runs),
    ]
    for op in sorted(tables[first.level]):
        cells = []
        for r in runs:
            p, n = tables[r.level].get(op, (0, 0))
            cells.append(f"{p} / {n}" + ("" if p == n else f" ({100 * p / n:.0f}%)"))
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += ["", "## Known failures", "", "| case | levels | reason |", "|---|---|---|"]
    listed = {**KNOWN_FAILURES, **KNOWN_COMPILED_FAILURES, **KNOWN_O2_FAILURES}
    for name in sorted(listed):
        levels = [r.level for r in runs if name in known_failures(r.level)]
        lines.append(f"| {name} | {', '.join(levels)} | {listed[name]} |")
    unsup: dict[str, int] = collections.Counter()
    for o in first.by_status("unsupported"):
        for op in o.reason.split(", "):
            unsup[op] += 1
    lines += ["", "## Op and value types in the cases that graphopt does not import", ""]
    lines.append(", ".join(f"{op} ({n})" for op, n in sorted(unsup.items())))
    return "\n".join(lines) + "\n"


def print_table(run: Run) -> None:
    print(f"\nONNX backend cases through graphopt's importer, {run.level} ({run.seconds:.1f}s)")
    print(f"{'op type':<24}{'passed':>8}{'run':>6}{'rate':>7}")
    for op, p, r in per_op_table(run):
        print(f"{op:<24}{p:>8}{r:>6}{100 * p / r:>6.0f}%")
    print(
        f"cases: {len(run.outcomes)}; pass {len(run.by_status('pass'))}, fail "
        f"{len(run.by_status('fail'))}, unsupported op or value types {len(run.by_status('unsupported'))}"
    )


if __name__ == "__main__":
    cases = all_cases()
    runs = []
    for level in LEVELS:
        runs.append(run_all(cases, level))
        print_table(runs[-1])
        failing, passing = unexpected(runs[-1])
        if failing or passing:
            print(f"{level}: unexpected failures {failing}; listed but passing {passing}")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "onnx_import_cases.md")
    with open(path, "w") as f:
        f.write(markdown(runs))
