"""cli.main: what ends in one line (exit 2) and what keeps its traceback; each command's
optional extras checked before it starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from threetowers.cli import HANDLERS, NEEDS, main
from threetowers.errors import UserError


@pytest.mark.parametrize(
    ("argv", "missing", "extra"),
    [
        (["serve", "no-index"], "fastapi", "search"),
        (["serve", "no-index"], "faiss", "search"),
        (["index", "no-run", "--images", "x", "--out", "y"], "faiss", "search"),
        (["analyze", "no-run"], "matplotlib", "plots"),
        (["reproduce", "--quick"], "matplotlib", "plots"),
    ],
)
def test_a_command_without_its_extra_says_which_to_install(
    argv, missing, extra, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
    called = []
    monkeypatch.setitem(HANDLERS, argv[0], lambda args: called.append(args))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"threetowers {argv[0]} needs {missing}" in err
    assert f"pip install 'threetowers[{extra}]'" in err
    assert not called  # refused before the command started any work


def test_every_needed_module_belongs_to_an_extra():
    from threetowers.errors import EXTRAS

    assert {module for modules in NEEDS.values() for module in modules} <= set(EXTRAS)


def test_a_user_error_is_one_line_and_a_bug_keeps_its_traceback(monkeypatch, capsys):
    def user_mistake(args):
        raise UserError("the value is wrong; fix it")

    monkeypatch.setitem(HANDLERS, "config", user_mistake)
    assert main(["config", "tiny"]) == 2
    assert capsys.readouterr().err == "threetowers config: error: the value is wrong; fix it\n"

    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setitem(HANDLERS, "config", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["config", "tiny"])


def test_a_moved_key_is_one_warning_line_naming_the_new_one(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("model: {third: {backbone: efficientnet_lite0}}\n")
    done = subprocess.run(
        [sys.executable, "-m", "threetowers", "config", str(old)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stderr.splitlines() == [
        f"threetowers: warning: {old}: model.third is model.frozen: [{{name: h, ...}}] now "
        "(model.third was the one-tower shorthand of that list); read as that. Write the new "
        "key: `threetowers config` prints the whole config in today's form"
    ]
    assert "frozen:" in done.stdout and "third" not in done.stdout
