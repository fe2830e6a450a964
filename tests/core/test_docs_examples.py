"""The worked examples of docs/architecture.md (add a pass, a kernel, an op) run as written.

They run in a process of their own: the op example registers a graphopt:: op, which must not
stay in this process's registry for the tests that enumerate it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
EXAMPLE = re.compile(r"^### [^\n]*\(`(\w+)\.py`\)\n.*?```python\n(.*?)```", re.S | re.M)


def examples() -> list[tuple[str, str]]:
    return EXAMPLE.findall(DOC.read_text())


def test_the_doc_has_the_three_examples() -> None:
    assert [name for name, _ in examples()] == ["example_pass", "example_kernel", "example_op"]


def test_the_examples_run_as_written(tmp_path: Path) -> None:
    for name, code in examples():
        (tmp_path / f"{name}.py").write_text(code)  # files: Triton reads the kernel's source
    driver = "import runpy\n" + "".join(
        f"runpy.run_path({name + '.py'!r}, run_name={name!r})\n" for name, _ in examples()
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # the op example imports the kernel one
    done = subprocess.run(
        [sys.executable, "-c", driver], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
