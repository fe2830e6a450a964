"""The worked examples of docs/architecture.md (add a pass, a kernel, an op) run as written."""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
EXAMPLE = re.compile(r"^### [^\n]*\(`(\w+)\.py`\)\n.*?```python\n(.*?)```", re.S | re.M)


def examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(DOC.read_text())


def test_the_doc_has_the_three_examples() -> None:
    assert [name for name, _ in examples()] == ["example_pass", "example_kernel", "example_op"]


def test_the_examples_run_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))  # the op example imports the kernel example
    for name, code in examples():
        path = tmp_path / f"{name}.py"
        path.write_text(code)
        runpy.run_path(str(path), run_name=name)  # a file, so Triton can read the kernel source
    sys.modules.pop("example_kernel", None)
