"""The layers import downwards only: flows → tasks → mlpaint. The library never reaches up
into the Prefect wiring (so it can be used, and tested, without it), and tasks never start
flows."""

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


@pytest.mark.parametrize(("package", "forbidden"), [
    ("mlpaint", ("flows", "tasks")),
    ("tasks", ("flows",)),
])
def test_a_layer_does_not_import_the_layers_above_it(package, forbidden):
    offending = {
        str(path.relative_to(REPO)): sorted(
            module for module in _imported_modules(path)
            if module.split(".")[0] in forbidden)
        for path in sorted((REPO / package).rglob("*.py"))}
    assert {path: modules for path, modules in offending.items() if modules} == {}


def _package_modules(package: str) -> dict[str, Path]:
    modules = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports_within(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of the others, wherever they stand (a function-local import is
    a dependency all the same: it only hides the cycle from the interpreter until called)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets.add(node.module)
                targets.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def test_the_library_has_no_import_cycles():
    graph = _imports_within(_package_modules("mlpaint"))
    cycles = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        for imported in sorted(graph[module]):
            if imported in path:
                cycles.append(" -> ".join([*path[path.index(imported):], imported]))
            elif imported not in done:
                visit(imported, [*path, imported], done)
        done.add(module)

    finished: set[str] = set()
    for module in sorted(graph):
        if module not in finished:
            visit(module, [module], finished)
    assert cycles == []


@pytest.mark.parametrize("module", ["flows.cli", "mlpaint.training.spec"])
def test_parsing_a_command_or_a_spec_compiles_no_kernel(module):
    """The command line and the spec (which every run form and CLI parse validates) import
    no numba: its import alone costs a second, paid by every command before it does
    anything. The kernels load when a feature stage or explanation first runs."""
    import subprocess
    import sys

    loaded = subprocess.run(
        [sys.executable, "-c", f"import sys, {module}; print('numba' in sys.modules)"],
        capture_output=True, text=True, check=True, cwd=REPO).stdout.strip()
    assert loaded == "False"
