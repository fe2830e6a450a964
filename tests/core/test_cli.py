"""The ``graphopt`` command: compile a zoo model or a file:factory and print the report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import graphopt
from graphopt import zoo
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


# -- --calib: calibration data for int8 -------------------------------------------------------------

INT8 = "-O1,int8{measure=false}"


def _calibration(n: int = 4) -> list[torch.Tensor]:
    """Batches like the zoo MLP's example input, three times as wide (so the scales differ)."""
    gen = torch.Generator().manual_seed(5)
    return [3 * torch.randn(16, 128, generator=gen) for _ in range(n)]


def test_compile_calibrates_on_the_calib_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The saved model is graphopt.compile's with calibration_data=the same batches, bit for
    bit, and not the one calibrated on the example inputs."""
    batches = _calibration()
    torch.save(batches, tmp_path / "batches.pt")
    saved = tmp_path / "mlp.graphopt"
    argv = ["compile", "mlp", "--pipeline", INT8, "--calib", str(tmp_path / "batches.pt")]
    assert main([*argv, "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "int8: per layer" in out and "lower-int8" in out
    model, inputs = zoo.mlp()
    want = graphopt.compile(model, inputs, pipeline=INT8, calibration_data=batches)
    uncalibrated = graphopt.compile(model, inputs, pipeline=INT8)
    got = graphopt.load(str(saved))(*inputs)
    assert torch.equal(got, want(*inputs)) and not torch.equal(got, uncalibrated(*inputs))


def test_calib_factory_is_called_for_each_compile(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = tmp_path / "calib.py"
    src.write_text(
        "import torch\n"
        "def batches():\n"
        "    gen = torch.Generator().manual_seed(5)\n"
        "    for _ in range(4):\n"
        "        yield 3 * torch.randn(16, 128, generator=gen)\n"
    )
    saved = tmp_path / "mlp.graphopt"
    argv = ["compile", "mlp", "--pipeline", INT8, "--calib", f"{src}:batches"]
    assert main([*argv, "--save", str(saved)]) == 0
    model, inputs = zoo.mlp()
    want = graphopt.compile(model, inputs, pipeline=INT8, calibration_data=_calibration())
    assert torch.equal(graphopt.load(str(saved))(*inputs), want(*inputs))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "--calib {file}: file not found; save it with torch.save([batch, ...]"),
        ({"x": torch.ones(2)}, "--calib {file} holds dict, not a list of batches; save it with"),
        ([], "--calib {file} holds an empty list, not a list of batches"),
        ([torch.ones(16, 128), "x"], "--calib {file}: batch 1 is a str; each batch is a tensor"),
        (b"not a pickle", "--calib {file}: cannot read it ("),
        (
            [(torch.ones(16, 128), torch.ones(16, 128))],
            "calibration batch 0 has 2 inputs; the model takes 1",
        ),  # fmt: skip
        (
            [torch.ones(128)],
            "calibration batch 0: input 0 is a 1-d float32 tensor on cpu, the "
            "example input is a 2-d float32 tensor on cpu",
        ),  # fmt: skip
    ],
)
def test_bad_calib_files_are_one_clear_line(
    content: object, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    file = tmp_path / "batches.pt"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is not None:
        torch.save(content, file)
    assert main(["compile", "mlp", "--pipeline", INT8, "--calib", str(file)]) == 2
    out = " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    assert message.format(file=file) in out, out


def test_bad_calib_factories_are_one_clear_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    src = tmp_path / "calib.py"
    src.write_text("import torch\ndef as_tensor():\n    return torch.ones(16, 128)\n")
    for spec, message in [
        (f"{src}:missing", f"{src} has no callable 'missing'; define missing() returning"),
        (f"{src}:as_tensor", "gave a Tensor, not an iterable of batches"),
        (f"{tmp_path / 'nofile.py'}:f", "file " + str(tmp_path / "nofile.py") + " not found"),
        ("batches.npy", "expected a .pt file holding a list of batches, or path/to/file.py:"),
    ]:
        assert main(["compile", "mlp", "--pipeline", INT8, "--calib", spec]) == 2
        out = " ".join(capsys.readouterr().out.split())
        assert message in out, out


def test_help_says_what_a_new_user_looks_for(capsys: pytest.CaptureFixture[str]) -> None:
    """compile --help names every kind of MODEL (.onnx included); debug --help names bisect."""
    for argv, wanted in [
        (["compile", "--help"], ["path/to/model.onnx", "path/to/file.py:factory", "--backend"]),
        (["debug", "--help"], ["graphopt debug bisect MODEL", "--repro"]),
    ]:
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        for phrase in wanted:
            assert phrase in text, (argv, phrase)


def test_near_miss_lines_are_not_wrapped(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "bert", "--pipeline", "-O2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    reason = "is its ATen reference on the CPU (kernels are CUDA-only): no gain"
    whole = [ln for ln in lines if ln.startswith("    %") and ln.endswith(reason)]
    assert whole, "the near-miss reason is not on one line"
    assert not any(ln.startswith("(kernels are CUDA-only)") for ln in lines)


def test_demo_runs_as_the_readme_runs_it(capsys: pytest.CaptureFixture[str]) -> None:
    """``graphopt demo`` (the README's first command) compiles both zoo models and prints their
    reports; it once failed on an option only ``compile`` defines."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "resnet  pipeline" in out and "bert  pipeline" in out
    assert out.count("max |compiled - eager| over outputs") == 2
