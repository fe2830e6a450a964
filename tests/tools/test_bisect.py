"""``graphopt debug bisect``: three planted bugs (tests/tools/planted.py), each found exactly.

The expected pass, rewrite and node are derived independently of the bisector: the pass from
the pipeline text, the rewrite from the rewrite counts of the correct passes before it (a run of
that prefix) plus the planted occurrence, the node from the graph the planted pass receives.
Each repro script runs in its own process, fails with the bug and passes with the bug removed
(``GRAPHOPT_PLANTED_FIXED=1``).
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import planted
import pytest
import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

import graphopt
from graphopt import EquivalenceError, PassManager, zoo
from graphopt.frontends.capture import capture
from graphopt.ir.graph import original_name
from graphopt.pipeline.parse import parse_pipeline
from graphopt.tools.bisect import Verdict, bisect
from graphopt.tools.cli import main
from graphopt.tools.debug import pass_labels
from graphopt.tools.repro import Minimizer, Signature
from graphopt.verification.interpreter import native_run, reference_run

aten = torch.ops.aten
PREFIX = {"relu": "cleanup,fold-bn", "kernel": "cleanup,fold-bn", "int8": "cleanup,fold-bn"}
PLANTED = {
    "relu": "relu-to-clamp{wrong_at=2}",
    "kernel": "fuse-add-relu",
    "int8": "int8-planted{measure=false,wrong_layer=2}",
}
MODELS = {"relu": ("mlp", {}), "kernel": ("resnet", {"batch": 2, "image": 16}), "int8": ("mlp", {})}


def pipeline(case: str) -> str:
    return f"{PREFIX[case]},{PLANTED[case]},cleanup"


@dataclass
class Case:
    verdict: Verdict
    received: GraphModule  # the graph the planted pass receives (the correct prefix's output)
    prefix_rewrites: int  # rewrites the correct passes before it made
    captured: GraphModule
    inputs: list[Any]
    repro: Path


def _prefix(captured: GraphModule, inputs: list[Any], case: str) -> tuple[GraphModule, int]:
    gm, report = PassManager(PREFIX[case], on_fail="raise").run(captured, inputs)
    assert all(r.status != "rolled back" for r in report.records)
    return gm, sum(r.rewrites for r in report.records)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    found = {}
    for case, (name, kwargs) in MODELS.items():
        model, inputs = zoo.get(name, **kwargs)
        repro = tmp_path_factory.mktemp(f"repro-{case}")
        verdict = bisect(model, inputs, pipeline(case), repro=repro)
        captured = capture(model, inputs)
        flat = pytree.tree_leaves(inputs)
        received, rewrites = _prefix(captured, flat, case)
        found[case] = Case(verdict, received, rewrites, captured, flat, repro)
    return found


@pytest.fixture(scope="module")
def repro_runs(cases: dict[str, Case]) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every repro script run on its own: its own process, outside the repository, without
    PYTHONPATH; all three at once to keep the test fast."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRAPHOPT_PLANTED_FIXED")}
    procs = {
        case: subprocess.Popen(
            [sys.executable, str(c.repro / "repro.py")],
            cwd=c.repro.parent,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, c in cases.items()
    }
    results = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[case] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def _calls(gm: GraphModule, target: Any) -> list[Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def _position(case: str) -> int:
    """1-based position of the planted pass in the flattened pipeline, as the pipeline schedules
    it (passes a pass declares with ``followed_by``, such as int8's lower-int8, included)."""
    labels = pass_labels(parse_pipeline(pipeline(case)))
    position = labels.index(PLANTED[case].split("{")[0]) + 1
    assert position == len(pass_labels(parse_pipeline(PREFIX[case]))) + 1
    return position


# -- (i) a wrong rewrite --------------------------------------------------------------------------


def test_wrong_rewrite_is_found_exactly(cases: dict[str, Case]) -> None:
    c = cases["relu"]
    v = c.verdict
    second_relu = _calls(c.received, aten.relu.default)[1]
    assert (v.pass_name, v.pass_index) == ("relu-to-clamp", _position("relu"))
    assert (v.rewrite_in_pass, v.rewrite) == (2, c.prefix_rewrites + 2)
    assert v.rule == "relu->clamp"
    assert v.op == "aten.clamp_min.default" and v.kind == "local"
    assert v.replaced == second_relu.name and v.origin == original_name(second_relu)
    # the node's own error, recomputed from the float64 reference: clamp_min(x, -0.05) on the
    # reference input rounded to float32, against relu of the reference input
    _, ref = reference_run(c.captured, c.inputs)
    x = ref[original_name(second_relu.args[0])]
    wrong = torch.clamp_min(x.float(), -0.05).double()
    expected = float((wrong - ref[v.origin]).abs().max() / ref[v.origin].abs().max())
    assert v.metric == "rel_max" and v.value == pytest.approx(expected, rel=1e-3)
    assert v.threshold == pytest.approx(1e-5)
    assert v.trials <= 4  # one verified run, log2(2) halvings, one evidence run


def test_the_culprit_budget_fails_and_one_less_passes(cases: dict[str, Case]) -> None:
    """Checked with the pass manager itself: max_rewrites=N raises in the planted pass, N-1 not."""
    c = cases["relu"]
    n = c.verdict.rewrite
    assert n is not None
    with pytest.raises(EquivalenceError) as info:
        PassManager(pipeline("relu"), on_fail="raise", max_rewrites=n).run(c.captured, c.inputs)
    assert info.value.pass_name == "relu-to-clamp" and info.value.origin == c.verdict.origin
    PassManager(pipeline("relu"), on_fail="raise", max_rewrites=n - 1).run(c.captured, c.inputs)


# -- (ii) a wrong kernel --------------------------------------------------------------------------


def test_wrong_kernel_is_found_exactly(cases: dict[str, Case]) -> None:
    c = cases["kernel"]
    v = c.verdict
    # relu(add) pairs in graph order; the kernel is wrong where the last dim has a partial block
    fused = [
        n
        for n in _calls(c.received, aten.relu.default)
        if isinstance(n.args[0], Node) and n.args[0].target == aten.add.Tensor
    ]
    wrong = [i for i, n in enumerate(fused, 1) if n.meta["val"].shape[-1] % planted.BLOCK]
    assert wrong and wrong[0] > 1  # the bug is not at the first rewrite
    culprit = fused[wrong[0] - 1]
    assert (v.pass_name, v.pass_index) == ("fuse-add-relu", _position("kernel"))
    assert (v.rewrite_in_pass, v.rewrite) == (wrong[0], c.prefix_rewrites + wrong[0])
    assert v.rewrites_in_pass == len(fused)
    assert v.op == "planted.add_relu.default" and v.kind == "local"
    assert v.replaced == culprit.name and v.origin == original_name(culprit)
    assert (
        v.rewrite_did is not None and f"%{culprit.args[0].name} (aten.add.Tensor)" in v.rewrite_did
    )
    assert v.metric == "rel_max" and v.value is not None and v.value > 0.1 > v.threshold


# -- (iii) a wrong quantization scale -------------------------------------------------------------


def test_wrong_int8_scale_is_found_exactly(cases: dict[str, Case]) -> None:
    c = cases["int8"]
    v = c.verdict
    second_layer = _calls(c.received, aten.linear.default)[1]
    assert (v.pass_name, v.pass_index) == ("int8-planted", _position("int8"))
    # int8 rewrites each chosen layer once (its QDQ form; lower-int8, the next pass, lowers it):
    # layer 2 is rewrite 2
    assert (v.rewrite_in_pass, v.rewrite) == (2, c.prefix_rewrites + 2)
    assert v.rule == "int8" and v.kind == "local"
    assert v.replaced == second_layer.name and v.origin == original_name(second_layer)
    assert v.contract == "lossy(cosine=0.99)" and v.metric == "cosine"
    assert v.value is not None and v.value < 0.99 == v.threshold


# -- the repro scripts ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(PLANTED))
def test_repro_fails_on_its_own_and_passes_once_fixed(
    case: str,
    cases: dict[str, Case],
    repro_runs: dict[str, subprocess.CompletedProcess[str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    v = cases[case].verdict
    broken = repro_runs[case]
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert broken.stdout.startswith(f"reproduced: {v.pass_name} makes %{v.replaced}")
    assert "AssertionError" in broken.stderr
    assert "against float64" in broken.stderr  # the numbers of the divergence
    # the control: the same script, run as a program here, with the planted bug removed
    monkeypatch.setenv("GRAPHOPT_PLANTED_FIXED", "1")
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(cases[case].repro / "repro.py"), run_name="__main__")
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("not reproduced")


def test_repro_is_the_smallest_subgraph(cases: dict[str, Case]) -> None:
    """relu: both relus (the bug is at the second occurrence); kernel: the add and its relu;
    int8: two layers (the bug is at the second layer)."""
    expected_ops = {
        "relu": ["aten.relu.default"] * 2,
        "kernel": ["aten.add.Tensor", "aten.relu.default"],
        "int8": ["aten.linear.default"] * 2,
    }
    for case, ops in expected_ops.items():
        c = cases[case]
        text = (c.repro / "repro.py").read_text()
        written = [line.split("torch.ops.")[1].split(",")[0] for line in text.splitlines()
                   if "g.create_node('call_function'" in line]  # fmt: skip
        assert [f"aten.{w.split('.', 1)[1]}" for w in written] == ops, case
        assert c.verdict.repro_nodes == len(ops)
        assert f"name={c.verdict.replaced!r}" in text
        assert "from planted import" in text
        assert c.verdict.repro_rewrites is not None and c.verdict.repro_rewrites >= 1
        saved = torch.load(c.repro / "tensors.pt")
        assert set(saved) == {"inputs", "weights"} and saved["inputs"]


def test_minimizer_refuses_a_different_failure(cases: dict[str, Case]) -> None:
    """With the bug at the first relu, a subgraph holding both relus fails at the first one: it
    does not count as the failure at the second."""
    c = cases["relu"]
    first, second = (n.name for n in _calls(c.received, aten.relu.default)[:2])
    _, values = native_run(c.received, c.inputs, record=True)
    p = planted.ReluToClamp(wrong_at=1)
    sig = Signature("relu-to-clamp", "EquivalenceError", "aten.clamp_min.default", second,
                    "rel_max", "relu->clamp")  # fmt: skip
    minimizer = Minimizer(c.received, values, p, sig)
    assert minimizer.reproduces({first, second}) is None
    assert minimizer.reproduces({second}) == 1  # alone, the second relu is the first one
    right = Signature("relu-to-clamp", "EquivalenceError", "aten.clamp_min.default", first,
                      "rel_max", "relu->clamp")  # fmt: skip
    assert Minimizer(c.received, values, p, right).reproduces({first, second}) == 1


def test_a_crashing_pass_is_found_at_the_rewrite_it_attempted(tmp_path: Path) -> None:
    model, inputs = zoo.mlp()
    v = bisect(model, inputs, "cleanup,fold-bn,crash-at{at=2},cleanup", repro=tmp_path)
    captured = capture(model, inputs)
    _, before = PassManager("cleanup,fold-bn").run(captured, pytree.tree_leaves(inputs))
    assert (v.pass_name, v.kind, v.node) == ("crash-at", "crash", None)
    assert (v.rewrite_in_pass, v.rewrite) == (2, sum(r.rewrites for r in before.records) + 2)
    assert v.rewrites_in_pass == 2  # the one it made and the one it crashed in
    assert "RuntimeError: planted crash at %relu_1" in v.message
    with pytest.raises(AssertionError, match="planted crash"):  # its repro fails the same way
        runpy.run_path(str(tmp_path / "repro.py"), run_name="__main__")


# -- no failure; the command line -----------------------------------------------------------------


def test_a_correct_pipeline_has_nothing_to_find() -> None:
    model, inputs = zoo.mlp()
    v = bisect(model, inputs, "-O1")
    assert not v.failed and v.trials == 1 and v.rewrite is None
    assert v.to_text().startswith("no pass broke its contract")


def test_command_line_writes_verdict_and_repro(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import planted  # noqa: F401  (registers the planted passes)\n"
        "from graphopt import zoo\n\n\n"
        "def mlp(batch=16):\n    return zoo.mlp(batch=batch)\n"
    )
    out, repro = tmp_path / "out", tmp_path / "repro"
    argv = ["debug", "bisect", f"{model_file}:mlp", "--pipeline", pipeline("relu")]
    assert main([*argv, "--out", str(out), "--repro", str(repro)]) == 0
    text = capsys.readouterr().out
    assert "first breaking pass: relu-to-clamp (pass 6 of the pipeline)" in text
    assert "culprit rewrite: rewrite 2 of relu-to-clamp (of 2;" in text
    assert "first diverging node: %clamp_min_default_1 (aten.clamp_min.default)" in text
    assert f"repro: python {repro / 'repro.py'}" in text
    verdict = json.loads((out / "verdict.json").read_text())
    assert (verdict["pass_name"], verdict["rewrite_in_pass"], verdict["replaced"]) == (
        "relu-to-clamp", 2, "relu_1",
    )  # fmt: skip
    assert {"torch", "triton", "graphopt"} <= set(
        json.loads((out / "environment.json").read_text())
    )
    assert "first breaking pass" in (out / "report.txt").read_text()
    assert (repro / "repro.py").is_file() and (repro / "tensors.pt").is_file()


# -- calibration data (--calib) -------------------------------------------------------------------


def _calibration(n: int = 4) -> list[torch.Tensor]:
    """Batches like the zoo MLP's example input, three times as wide: calibrated on them, int8
    has other scales than on the example inputs."""
    gen = torch.Generator().manual_seed(5)
    return [3 * torch.randn(16, 128, generator=gen) for _ in range(n)]


def test_bisect_with_calib_reproduces_the_int8_compile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """``debug bisect MODEL --pipeline "-O2,int8" --calib batches.pt`` runs the compile that
    ``graphopt.compile(..., calibration_data=the same batches)`` runs: the same verdict (no pass
    breaks its contract) and the same per-layer decisions, numbers included."""
    batches = _calibration()
    torch.save(batches, tmp_path / "batches.pt")
    model, inputs = zoo.mlp()
    compiled = graphopt.compile(model, inputs, pipeline="-O2,int8", calibration_data=batches)
    assert all(r.status != "rolled back" for r in compiled.report.records)
    int8 = next(r for r in compiled.report.records if r.name == "int8")

    def bisect_cli(*calib: str) -> dict[str, Any]:
        out = tmp_path / f"out{len(calib)}"
        argv = ["debug", "bisect", "mlp", "--pipeline", "-O2,int8", *calib, "--out", str(out)]
        assert main(argv) == 0
        return json.loads((out / "verdict.json").read_text())

    verdict = bisect_cli("--calib", str(tmp_path / "batches.pt"))
    text = capsys.readouterr().out
    assert verdict["pass_name"] is None and "no pass broke its contract" in text
    assert f"calibration {tmp_path / 'batches.pt'}" in text
    assert "per-layer decisions of the verified run" in text and "int8: per layer" in text
    assert verdict["layers"]["int8"] == _jsonable(int8.stats["layers"])
    # without the calibration data the numbers are others: the file was read
    assert bisect_cli()["layers"]["int8"] != verdict["layers"]["int8"]


def _jsonable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return json.loads(json.dumps(Verdict("", 0, layers={"x": rows}).to_json()["layers"]["x"]))


def test_planted_int8_bug_is_found_with_calibration_data(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The planted wrong scale, on a model calibrated with --calib: the same pass, rewrite and
    node as without, the numbers of the calibrated scales, and a repro that carries the
    calibration batches its subgraph sees and fails on its own."""
    batches = _calibration()
    torch.save(batches, tmp_path / "batches.pt")
    model_file = tmp_path / "model.py"
    model_file.write_text(
        "import planted  # noqa: F401  (registers the planted passes)\n"
        "from graphopt import zoo\n\n\n"
        "def mlp(batch=16):\n    return zoo.mlp(batch=batch)\n"
    )
    out, repro = tmp_path / "out", tmp_path / "repro"
    argv = ["debug", "bisect", f"{model_file}:mlp", "--pipeline", pipeline("int8")]
    calib = ["--calib", str(tmp_path / "batches.pt")]
    assert main([*argv, *calib, "--out", str(out), "--repro", str(repro)]) == 0
    text = capsys.readouterr().out
    v = json.loads((out / "verdict.json").read_text())
    model, inputs = zoo.mlp()
    plain = bisect(model, inputs, pipeline("int8"))
    assert (v["pass_name"], v["pass_index"]) == ("int8-planted", _position("int8"))
    assert (v["rewrite_in_pass"], v["replaced"], v["kind"]) == (2, plain.replaced, "local")
    assert v["metric"] == "cosine" and v["value"] < 0.99
    assert v["value"] != pytest.approx(plain.value, abs=1e-6)  # calibrated on the batches
    assert f"--calib {tmp_path / 'batches.pt'} --max-rewrites {v['rewrite']}" in text
    # the Python API finds the same, with the same numbers
    same = bisect(model, inputs, pipeline("int8"), calibration_data=batches)
    assert (same.rewrite, same.node, same.value) == (v["rewrite"], v["node"], v["value"])
    # the repro: the subgraph's inputs on each calibration batch, saved next to the script
    saved = torch.load(repro / "tensors.pt")
    assert set(saved) == {"inputs", "weights", "calibration"}
    assert len(saved["calibration"]) == len(batches)
    assert [set(b) for b in saved["calibration"]] == [set(saved["inputs"])] * len(batches)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GRAPHOPT_PLANTED_FIXED")}
    script = [sys.executable, str(repro / "repro.py")]
    broken = subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert broken.returncode != 0 and broken.stdout.startswith("reproduced: int8-planted")
    fixed = subprocess.run(
        script, cwd=tmp_path, env={**env, "GRAPHOPT_PLANTED_FIXED": "1"}, capture_output=True,
        text=True,
    )  # fmt: skip
    assert fixed.returncode == 0 and fixed.stdout.startswith("not reproduced")


def test_bisect_refuses_a_one_shot_iterator() -> None:
    model, inputs = zoo.mlp()
    with pytest.raises(graphopt.GraphoptError, match="pass a list of batches, or a function"):
        bisect(model, inputs, "-O1,int8", calibration_data=iter(_calibration()))


def test_a_repro_carries_calibration_data_only_to_a_pass_that_reads_it(tmp_path: Path) -> None:
    model, inputs = zoo.mlp()
    v = bisect(model, inputs, pipeline("relu"), repro=tmp_path, calibration_data=_calibration())
    assert v.pass_name == "relu-to-clamp"
    assert set(torch.load(tmp_path / "tensors.pt")) == {"inputs", "weights"}


# -- the README's example: examples/planted_bug.py ------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_readme_example_finds_the_planted_bug_and_its_repro_fails_on_its_own(
    tmp_path: Path,
) -> None:
    """The README's bisect command, run as a user runs it (its own process, from the checkout),
    names the planted pass, rewrite and node, and writes a repro that fails alone and passes
    once the bug is removed."""
    exe = Path(sys.executable).with_name("graphopt")
    out = tmp_path / "repro-out"
    argv = [str(exe), "debug", "bisect", "examples/planted_bug.py:build"]
    argv += ["--pipeline", "-O1,relu-to-clamp", "--repro", str(out), "--out", str(tmp_path / "d")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "first breaking pass: relu-to-clamp" in done.stdout
    assert "rewrite 2 of relu-to-clamp" in done.stdout
    assert "aten.clamp_min.default" in done.stdout and "local:" in done.stdout
    script = out / "repro.py"
    failing = subprocess.run([sys.executable, str(script)], capture_output=True, timeout=600)
    assert failing.returncode == 1, failing.stderr[-2000:]
    env = {**os.environ, "GRAPHOPT_PLANTED_FIXED": "1"}
    fixed = subprocess.run([sys.executable, str(script)], capture_output=True, env=env, timeout=600)
    assert fixed.returncode == 0, fixed.stderr[-2000:]


def test_nothing_to_bisect_says_no_repro_was_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repro = tmp_path / "repro-out"
    argv = ["debug", "bisect", "mlp", "--pipeline", "-O1", "--repro", str(repro)]
    assert main([*argv, "--out", str(tmp_path / "d")]) == 0
    text = capsys.readouterr().out
    assert "no pass broke its contract" in text
    assert f"no repro written to {repro}: no pass broke its contract" in text
    assert not repro.exists()
