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
