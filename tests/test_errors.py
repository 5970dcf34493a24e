"""errors.py: the optional extras. ``require`` imports one or raises a MissingExtraError (a
UserError) naming the extra that installs it, keeps a real import bug as it is; ``has`` asks
without importing; every extra named exists and installs its module. (What the command line
does with a UserError: tests/cli/test_main.py.)"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

import threetowers
from threetowers.errors import EXTRAS, MissingExtraError, UserError, has, require


def test_a_missing_extra_names_what_needs_it_and_how_to_install_it(monkeypatch):
    for name in ("fsspec", "fsspec.implementations.local"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingExtraError) as caught:
        require("fsspec.implementations.local", "reading s3:// shards")
    assert str(caught.value) == (
        "reading s3:// shards needs fsspec, which this install lacks; install the 'remote' "
        "extra: pip install 'threetowers[remote]'"
    )
    assert isinstance(caught.value, UserError) and isinstance(caught.value, ImportError)
    assert caught.value.__suppress_context__  # the one line, not the import's traceback


def test_a_present_module_is_returned_imported():
    assert require("faiss", "search") is importlib.import_module("faiss")
    assert require("pyarrow.parquet", "parquet").__name__ == "pyarrow.parquet"


def test_an_extra_whose_own_imports_are_broken_is_a_bug_not_a_missing_extra(tmp_path, monkeypatch):
    """An installed package that fails on one of its own imports keeps its real error."""
    assert "fsspec" in EXTRAS
    package = tmp_path / "fsspec"
    package.mkdir()
    (package / "__init__.py").write_text("import threetowers_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fsspec", raising=False)
    with pytest.raises(ModuleNotFoundError) as caught:
        require("fsspec", "remote shards")
    assert not isinstance(caught.value, MissingExtraError)
    assert caught.value.name == "threetowers_no_such_dependency"


def test_has_answers_without_importing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "threetowers_probe_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert has("threetowers_probe_module")
    assert not marker.exists() and "threetowers_probe_module" not in sys.modules
    assert not has("threetowers_no_such_module")


def test_each_extra_named_installs_the_module_it_is_named_for():
    """The extra a MissingExtraError names (or the core install) holds the module's package."""
    tomllib = pytest.importorskip("tomllib")
    pyproject = Path(threetowers.__file__).parents[2] / "pyproject.toml"
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]
    for module, extra in EXTRAS.items():
        requirements = [*extras[extra], *project["dependencies"]]
        names = [r.lower().replace("-", "_") for r in requirements]
        assert any(module in name for name in names), (module, extra)
