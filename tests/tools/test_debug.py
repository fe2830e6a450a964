"""``graphopt debug``: every flag prints what it promises, and every run leaves its folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import zoo
from graphopt.tools.cli import main

MLP_FUSE = "cleanup,fold-bn,fuse-epilogue{measure=false}"


def run(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> str:
    assert main(["debug", *argv, "--out", str(tmp_path / "out")]) == 0
    return capsys.readouterr().out


def test_print_changed_diffs_only_the_passes_that_changed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = run(capsys, tmp_path, "mlp", "--pipeline", MLP_FUSE, "--print-changed")
    changed = re.findall(r"\*\*\* IR changed by (\S+) \*\*\*", out)
    # cse and fold-constants find nothing in the mlp; everything else rewrites it
    assert changed == ["cleanup:remove-noops", "cleanup:dce", "fold-bn", "fuse-epilogue"]
    assert "-%dropout = aten.dropout.default(%relu, 0.1, False)" in out
    assert "-%batch_norm = aten.batch_norm.default(" in out
    assert re.search(r"^\+%linear_default_\d+ = graphopt\.linear\.default\(", out, re.M)
    assert "--- before fold-bn" in out and "+++ after fold-bn" in out


def test_print_after_all_and_print_after_one_pass(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = run(capsys, tmp_path, "mlp", "--pipeline", MLP_FUSE, "--print-after-all")
    names = re.findall(r"\*\*\* IR after (\S+) \*\*\*", out)
    assert names[:4] == [
        "cleanup:remove-noops", "cleanup:fold-constants", "cleanup:cse", "cleanup:dce",
    ]  # fmt: skip
    assert names[-2:] == ["fold-bn", "fuse-epilogue"]
    out = run(capsys, tmp_path, "mlp", "--pipeline", MLP_FUSE, "--print-after=fold-bn")
    assert re.findall(r"\*\*\* IR after (\S+) \*\*\*", out) == ["fold-bn"]
    after_fold = out.split("*** IR after fold-bn ***")[1]
    assert "aten.batch_norm" not in after_fold.split("return")[0]
    assert "aten.relu.default" in after_fold


def test_print_after_unknown_pass_is_a_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["debug", "mlp", "--pipeline", "-O1", "--print-after=fuse-epilogue",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert code != 0
    assert out.count("\n") == 1 and out.startswith("error: --print-after=fuse-epilogue")
    assert "cleanup:dce" in out and "fold-bn" in out
    assert not (tmp_path / "out").exists()


def test_opt_bisect_limit_runs_only_the_first_passes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = run(capsys, tmp_path, "mlp", "--pipeline", "-O1", "--opt-bisect-limit", "1")
    assert "BISECT: running pass (1) cleanup:remove-noops" in out
    assert "BISECT: NOT running pass (5) fold-bn" in out
    assert len(re.findall(r"^BISECT: running", out, re.M)) == 1
    assert len(re.findall(r"^BISECT: NOT running", out, re.M)) == 8
    table = out.split("status\n")[1]
    assert "cleanup:remove-noops" in table and "fold-bn" not in table


def test_stats_timing_and_verify_tables(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["mlp", "--pipeline", MLP_FUSE, "--stats", "--timing", "--verify"]
    out = run(capsys, tmp_path, *argv)
    assert "fold-bn: runs 1, rewrites 2, folded=2" in out
    assert "rule linear+act: applied 2, near misses 0" in out
    timing = out.split("timing (sorted by total")[1].split("\n\n")[0]
    assert "verify ms" in timing
    totals = [float(line.split()[-2]) for line in timing.splitlines()[3:]]
    assert totals == sorted(totals, reverse=True) and len(totals) == 6
    verify = out.split("equivalence per pass")[1].split("\n\n")[0]
    assert re.search(r"^fold-bn\s+rounding\s+\S+e-0\d\s+allowed=1e-05, error=", verify, re.M)
    assert re.search(r"^cleanup:cse\s+exact\s+-\s+-\s+unchanged", verify, re.M)


def test_max_rewrites_skips_the_rest(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = run(capsys, tmp_path, "mlp", "--pipeline", MLP_FUSE, "--max-rewrites", "1")
    assert re.search(r"^fuse-epilogue .* skipped$", out, re.M)


def test_compare_nodes_prints_both_modes_and_fused_inner_ops(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pipeline = "cleanup,patterns,fuse-pointwise{measure=false}"
    out = run(capsys, tmp_path, "bert", "--pipeline", pipeline, "--compare-nodes")
    assert "propagated (the optimized graph run on the inputs)" in out
    assert "local (each node fed float64 reference inputs)" in out
    for column in ("counterpart", "max abs", "rel L2", "cosine", "SQNR dB"):
        assert out.count(column) >= 3
    # nodes kept from the captured graph are their own counterparts; fused inner ops are listed
    assert re.search(r"^layer_norm\s+aten\.layer_norm\.default\s+layer_norm\s+\S+e-0\d", out, re.M)
    assert re.search(r"^fused_default\S*/\S+\s+aten\.\S+\s+\S+\s+\S+", out, re.M)
    rows = out.split("local (each node fed")[1].split("\n\n")[0].splitlines()[3:]
    assert 0 < len(rows) <= 20
    rel_l2 = [float(row.split()[4]) for row in rows]
    assert rel_l2 == sorted(rel_l2, reverse=True) and max(rel_l2) < 1e-5


def test_every_run_writes_its_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["debug", "mlp", "--pipeline", "cleanup", "--timing"]) == 0
    assert main(["debug", "mlp", "--pipeline", "cleanup"]) == 0
    out = capsys.readouterr().out
    folders = sorted((tmp_path / "debug-out").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("mlp-") for f in folders)
    env = json.loads((folders[0] / "environment.json").read_text())
    assert set(env) >= {"torch", "triton", "onnx", "graphopt", "python", "gpu", "date"}
    assert env["graphopt"] and env["python"].count(".") == 2
    report = (folders[0] / "report.txt").read_text()
    assert "timing (sorted by total" in report and "cleanup:dce" in report
    assert f"debug output written to {Path('debug-out') / folders[0].name}" in out


def test_calib_file_calibrates_int8(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``--calib``: the per-layer table is graphopt.compile's with the same calibration data."""
    gen = torch.Generator().manual_seed(5)
    batches = [3 * torch.randn(16, 128, generator=gen) for _ in range(3)]
    torch.save(batches, tmp_path / "batches.pt")
    pipeline = "-O1,int8{measure=false}"
    out = run(
        capsys, tmp_path, "mlp", "--pipeline", pipeline, "--calib", str(tmp_path / "batches.pt")
    )
    model, inputs = zoo.mlp()
    compiled = graphopt.compile(model, inputs, pipeline=pipeline, calibration_data=batches)
    table = compiled.report.layer_text()
    assert table.startswith("int8: per layer") and table in out
    assert (
        compiled.report.layer_text()
        != graphopt.compile(model, inputs, pipeline=pipeline).report.layer_text()
    )
    assert re.search(r"^int8 .* ok$", out, re.M) and re.search(r"^lower-int8 .* ok$", out, re.M)
