"""The house: one installed namespace, imports flowing one way, no cycles, files of one concern.

These tests read the source tree (ast), so a new module is checked the day it is added.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Installed name -> repository folder (pyproject.toml's package-dir).
FOLDERS = {
    "fedbrats": "fedbrats",
    "fedbrats.server": "server",
    "fedbrats.client": "client",
    "fedbrats.strategies": "strategies",
    "fedbrats.shared": "shared",
    "fedbrats.simulations": "simulations",
}

#: What each layer may import (DESIGN section 1): CLI -> simulations -> server/client -> strategies -> shared.
ALLOWED = {
    "cli": {"cli", "simulations", "server", "client", "strategies", "shared"},
    "simulations": {"simulations", "server", "client", "strategies", "shared"},
    "server": {"server", "strategies", "shared"},
    "client": {"client", "strategies", "shared"},
    "strategies": {"strategies", "shared"},
    "shared": {"shared"},
}

MAX_LINES = 450


def project_modules() -> dict[str, Path]:
    """Every module of the installed distribution, by dotted name, with the file it must come from."""
    modules: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            # fedbrats/ itself must not hold the other folders (they are mapped, not nested)
            name = ".".join([package, *parts])
            if package == "fedbrats" and parts and f"fedbrats.{parts[0]}" in FOLDERS:
                continue
            modules[name] = path
    return modules


MODULES = project_modules()


def layer(module: str) -> str:
    for package in ("server", "client", "strategies", "shared", "simulations"):
        if module == f"fedbrats.{package}" or module.startswith(f"fedbrats.{package}."):
            return package
    return "cli"


def imports_of(module: str, path: Path) -> set[str]:
    """Project modules `module` imports anywhere in its file (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in MODULES else prefix for alias in node.names]
        else:
            continue
        for name in names:
            # `import fedbrats.shared.models.resunet` names the deepest module that exists
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module, path) for module, path in MODULES.items()}


def test_every_module_resolves_to_its_repository_folder():
    assert len(MODULES) > 50
    for name, path in MODULES.items():
        spec = importlib.util.find_spec(name)
        assert spec is not None, f"{name} is not importable"
        assert Path(spec.origin).resolve() == path.resolve(), f"{name} resolves to {spec.origin}, expected {path}"


def test_every_package_folder_is_installed():
    """A folder with an __init__.py that pyproject.toml forgot would be missing from a wheel."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert packages == listed


def test_generic_top_level_names_are_not_importable_from_elsewhere(tmp_path):
    """`import server` must fail outside the checkout; the `fedbrats.*` names must work."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for generic in ("server", "client", "shared", "strategies", "simulations"):
        done = subprocess.run([sys.executable, "-c", f"import {generic}"], cwd=tmp_path, env=env, capture_output=True)
        assert done.returncode != 0, f"`import {generic}` worked from {tmp_path}"
    done = subprocess.run(
        [sys.executable, "-c", "import fedbrats.server.app, fedbrats.client.app"],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_imports_flow_one_way():
    wrong = [
        f"{module} ({layer(module)}) imports {target} ({layer(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert not wrong, "\n".join(wrong)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_cycle_finder_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_project_modules():
    assert find_cycles(GRAPH) == []


@pytest.mark.parametrize("folder", sorted(set(FOLDERS.values()) | {"tests", "benchmarks"}))
def test_source_files_stay_short(folder):
    long = {
        str(path.relative_to(ROOT)): n
        for path in (ROOT / folder).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split by concern): {long}"
