"""The README's commands as a new user runs them: CI runs the README's test command verbatim,
that command sets everything up itself (Chromium included), and every command in the README
runs as written after the set-up line, which does not activate the virtual environment."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def bash_blocks(text: str) -> list[list[str]]:
    """The command lines of each ```bash block (comments and blank lines left out)."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [
        [ln.strip() for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
        for b in blocks
    ]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_block = README.split("Set up and run the whole test suite", 1)[1]
    command = bash_blocks(test_block)[0]
    assert command == ["bash tools/run_tests.sh"]
    ci = [ln for ln in (ROOT / ".ci/run").read_text().splitlines() if ln and ln[0] != "#"]
    assert ci[-1] == command[0]


def test_the_test_script_installs_chromium_and_the_same_environment_as_the_demo() -> None:
    script = (ROOT / "tools/run_tests.sh").read_text()
    assert "apt-get install -y -qq --no-install-recommends chromium" in script
    assert "command -v chromium" in script
    demo = bash_blocks(README)[0][0]
    setup = demo.split(" && .venv/bin/graphopt demo")[0]
    for step in setup.split(" && "):
        assert step in script, step
    assert script.rstrip().endswith('.venv/bin/python -m pytest "$@"')


def test_every_readme_command_runs_without_an_activated_venv() -> None:
    for block in bash_blocks(README):
        for line in block:
            program = line.split()[0]
            assert program in ("python3", "bash", "source") or program.startswith(".venv/bin/"), (
                f"README command {line!r}: after the set-up line only .venv/bin/... is on hand"
            )
