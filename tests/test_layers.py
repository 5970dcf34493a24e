"""The layers a folder listing shows import one way: the library (model, towers, backbones,
data, evaluation, config, files) nothing of the trainer, the apps, the project or the CLI; the
trainer nothing of the apps or the CLI (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "src" / "threetowers"
LIBRARY = ("model", "towers", "backbones", "data", "evaluation", "config", "files")
ABOVE_LIBRARY = ("trainer", "apps", "project", "cli")


def imported(path: Path) -> set[str]:
    """Every threetowers module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.startswith("threetowers")}


def layer_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize(
    ("folders", "forbidden"),
    [(LIBRARY, ABOVE_LIBRARY), (("trainer",), ("apps", "cli"))],
    ids=["library", "trainer"],
)
def test_no_layer_imports_one_above_it(folders, forbidden):
    files = layer_files(*folders)
    assert len(files) > 5
    wrong = {
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in files
        for name in imported(path)
        if name.count(".") and name.split(".")[1] in forbidden
    }
    assert not wrong, sorted(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from threetowers.apps.embed import embed\n")
    assert "threetowers.apps.embed" in imported(sample)
