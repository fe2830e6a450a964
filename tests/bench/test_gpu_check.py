"""``tools/gpu_check.sh``, the GPU readiness check, run here with ``--dry-run``: the same three
steps (environment, GPU-marked tests, benchmark) on the CPU with tiny settings. It prints the
versions and the device, writes its tables, ends with a non-zero status naming the step when a
test fails or a step runs out of time, and refuses to run without a GPU unless dry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import triton

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def gpu_check(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def planted_test(folder: Path, body: str) -> str:
    """A GPU-marked test file outside tests/ (so the suite's skip-without-GPU does not apply)."""
    path = folder / "test_planted.py"
    path.write_text(
        f"import time\n\nimport pytest\n\n\n@pytest.mark.gpu\ndef test_planted():\n{body}\n"
    )
    return str(path)


def test_dry_run_prints_versions_and_writes_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    done = gpu_check(
        "--dry-run",
        GPU_CHECK_OUT=str(out),
        GPU_CHECK_TESTS="tests/core/test_gpu.py",
        GPU_CHECK_MODES="eager,graphopt-O1",  # the plumbing, without the backends' builds
    )
    assert done.returncode == 0, done.stdout + done.stderr
    log = done.stdout
    assert f"torch {torch.__version__} (CUDA {torch.version.cuda})" in log
    assert f"triton {triton.__version__}" in log and "device: cpu" in log
    steps = (
        "environment",
        "GPU tests (pytest -m gpu tests/core/test_gpu.py)",
        "GPU benchmark (mlp)",
    )
    for step in steps:
        assert f"== {step} (time bound " in log and f"== {step}: passed in " in log
    # the GPU-marked tests were selected (and skipped: this machine has no GPU)
    assert "skipped" in (out / "tests.txt").read_text()
    assert "device: cpu" in (out / "environment.txt").read_text()
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["model"], r["mode"], r["status"]) for r in results] == [
        ("mlp", "eager", "ok"),
        ("mlp", "graphopt-O1", "ok"),
    ]
    assert "| mlp | 4 | graphopt-O1 | aten |" in (out / "results.md").read_text()
    assert "gpu_check: benchmark modes: {'ok': 2}" in log


@pytest.mark.parametrize(
    "body, bound, message",
    [
        ("    assert 1 == 2", "150", "failed with exit status 1"),
        ("    time.sleep(60)", "4", "timed out after 4 s"),
    ],
)
def test_a_failing_or_overlong_step_fails_the_check_loudly(
    tmp_path: Path, body: str, bound: str, message: str
) -> None:
    out = tmp_path / "gpu"
    done = gpu_check(
        "--dry-run",
        GPU_CHECK_OUT=str(out),
        GPU_CHECK_TESTS=planted_test(tmp_path, body),
        GPU_CHECK_TEST_S=bound,
    )
    assert done.returncode == 1
    assert f"gpu_check: FAILED: GPU tests (pytest -m gpu {tmp_path}" in done.stderr
    assert message in done.stderr and str(out / "tests.txt") in done.stderr
    assert not (out / "results.json").exists()  # the check stopped at the failing step


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_check_refuses_to_run(tmp_path: Path) -> None:
    done = gpu_check(GPU_CHECK_OUT=str(tmp_path))
    assert done.returncode == 1
    assert "no CUDA device: torch.cuda.is_available() is False" in done.stdout
    assert "gpu_check: FAILED: environment failed" in done.stderr
    assert not (tmp_path / "tests.txt").exists()


def test_help_and_unknown_options() -> None:
    done = gpu_check("--help")
    assert done.returncode == 0 and "tools/gpu_check.sh --dry-run" in done.stdout
    assert "GPU_CHECK_BENCH_S" in done.stdout and not done.stdout.startswith("#")
    wrong = gpu_check("--cpu")
    assert wrong.returncode == 2 and "unknown option '--cpu'" in wrong.stderr
