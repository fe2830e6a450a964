"""The ``graphopt`` command: compile a zoo model or a file:factory and print the report."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphopt.tools.cli import main


def test_compile_zoo_model_prints_the_per_pass_table(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "mlp.graphopt"
    assert main(["compile", "mlp", "--pipeline", "-O1", "--save", str(out_file)]) == 0
    out = capsys.readouterr().out
    for column in ("pass", "time", "nodes", "rewrites", "error vs f64", "status"):
        assert column in out
    assert "fold-bn" in out and "cleanup:dce" in out and "ok" in out
    assert out_file.exists()


def test_compile_file_factory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    src = tmp_path / "model.py"
    src.write_text(
        "import torch\n"
        "def build(batch=2):\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))\n"
        "    return m, (torch.randn(batch, 4),)\n"
    )
    assert main(["compile", f"{src}:build", "--pipeline", "cleanup", "--show-graph"]) == 0
    out = capsys.readouterr().out
    assert "cleanup:remove-noops" in out and "aten.linear.default" in out


def test_model_file_may_define_dataclasses(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # dataclasses look their module up in sys.modules while the file runs
    src = tmp_path / "dc_model.py"
    src.write_text(
        "from __future__ import annotations\n"
        "import dataclasses, torch\n"
        "@dataclasses.dataclass\n"
        "class Options:\n"
        "    width: int = 4\n"
        "def build(batch=2):\n"
        "    w = Options().width\n"
        "    return torch.nn.Linear(w, w), (torch.randn(batch, w),)\n"
    )
    assert main(["compile", f"{src}:build", "--pipeline", "dce"]) == 0
    assert "dce" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "vgg"]) == 2
    assert "unknown zoo model 'vgg'" in capsys.readouterr().out
    assert main(["compile", "mlp", "--pipeline", "fold-bm"]) == 2
    assert "Did you mean 'fold-bn'" in capsys.readouterr().out
    assert main(["compile", "nofile.py:build"]) == 2
    assert "not found" in capsys.readouterr().out


def test_compile_prints_why_not_fused(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = "-O1,fuse-epilogue{measure=false}"
    assert main(["compile", "mlp", "--pipeline", pipeline]) == 0
    out = capsys.readouterr().out
    assert "why (not) fused" in out and "linear+act: applied 2" in out
