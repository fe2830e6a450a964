"""The folder tree is the architecture: imports point one way, with no loops and no private names
crossing files (issue 14). Every import counts, the lazy ones inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# folder -> the package it installs as (pyproject.toml [tool.setuptools.package-dir])
FOLDERS = {
    "graphopt": "graphopt",
    "passes": "graphopt.passes",
    "kernels": "graphopt.kernels",
    "tools": "graphopt.tools",
}

# stage -> the stages it may import (graphopt/<stage>/__init__.py says the same in words);
# "facade" is graphopt/__init__.py and graphopt.api, which may import everything but tools
STAGES = {
    "errors": set(),
    "kernels": {"errors", "ir"},
    "ir": {"errors"},
    "ops": {"errors", "ir", "kernels"},
    "verification": {"errors", "ir", "ops"},
    "pipeline": {"errors", "ir", "verification"},
    "frontends": {"errors", "ir", "ops"},
    "export": {"errors", "ir", "ops", "frontends"},
    "backends": {"errors", "ir", "ops", "kernels", "frontends", "verification", "export"},
    "runtime": {"errors", "ir", "ops", "frontends", "pipeline", "verification", "backends"},
    "passes": {"errors", "ir", "ops", "verification", "pipeline", "kernels"},
    "zoo": {"errors"},
    "testing": {"errors", "ir", "frontends", "pipeline", "verification"},
    "facade": {
        "errors", "ir", "ops", "verification", "pipeline", "frontends", "runtime", "export",
        "backends", "passes", "zoo", "kernels", "facade",
    },
    "tools": {
        "errors", "ir", "ops", "verification", "pipeline", "frontends", "runtime", "export",
        "backends", "passes", "zoo", "kernels", "facade",
    },
}  # fmt: skip


def stage(module: str) -> str:
    parts = module.split(".")
    if module in ("graphopt", "graphopt.api"):
        return "facade"
    return parts[1]


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imports(path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(module imported, names taken from it, line) for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("graphopt")]
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("graphopt")
        ):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                if sub in known:  # "from graphopt.ops import fused": the submodule
                    out.append((sub, [], node.lineno))
                else:
                    out.append((node.module, [a.name], node.lineno))
    return out


def edges() -> dict[str, set[str]]:
    found = modules()
    graph: dict[str, set[str]] = {m: set() for m in found}
    for module, path in found.items():
        for target, _, _ in imports(path, set(found)):
            if target in found and target != module:
                graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    loops: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return loops


def test_no_import_loops() -> None:
    loops = cycles(edges())
    assert not loops, "import loops (lazy imports included):\n" + "\n".join(map(str, loops))


def test_the_loop_finder_finds_a_loop() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_point_one_way() -> None:
    wrong = []
    for module, targets in edges().items():
        for target in targets:
            if stage(target) != stage(module) and stage(target) not in STAGES[stage(module)]:
                wrong.append(
                    f"{module} -> {target} ({stage(module)} may not import {stage(target)})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_every_stage_says_what_it_owns_and_may_import() -> None:
    for folder in sorted((ROOT / "graphopt").iterdir()):
        init = folder / "__init__.py"
        if folder.is_dir() and init.exists():
            doc = ast.get_docstring(ast.parse(init.read_text())) or ""
            assert "May import:" in doc, f"{init} does not say what it may import"


def test_no_private_name_crosses_a_file() -> None:
    found = modules()
    crossing = []
    for module, path in found.items():
        for target, names, line in imports(path, set(found)):
            for name in names:
                if name.startswith("_") and target != module:
                    crossing.append(f"{path.relative_to(ROOT)}:{line}: {name} from {target}")
    assert not crossing, "\n".join(crossing)


def test_every_package_is_installed() -> None:
    """pyproject.toml lists every package folder (a missing one works in an editable install and
    is left out of a wheel)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join([FOLDERS[folder], *init.parent.relative_to(ROOT / folder).parts])
        for folder in FOLDERS
        for init in (ROOT / folder).rglob("__init__.py")
    }
    assert found - listed == set(), f"add to [tool.setuptools] packages: {sorted(found - listed)}"
