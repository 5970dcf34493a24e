"""Hostile YAML configs (alias bombs, deep nesting, repeated keys) end in one ConfigError."""

from __future__ import annotations

import re

import pytest

import threetowers as tt
from threetowers.cli import main
from threetowers.config import load_experiment_config

DEEP = 20_000  # Python's recursion limit is 1000


def bomb(levels: int, width: int = 10) -> str:
    """Nested anchors, each aliased ``width`` times: ``width ** levels`` values when expanded."""
    value = "&l0 [" + ", ".join(["1"] * width) + "]"
    for level in range(1, levels):
        value = f"&l{level} [{value}" + f", *l{level - 1}" * (width - 1) + "]"
    return value


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


# A list the config validates item by item: unguarded, the expanded bomb reaches pydantic and the
# error message, which at 10^7 values already takes seconds and hundreds of megabytes.
@pytest.mark.parametrize("levels", [7, 10])
def test_alias_bomb_is_refused_before_it_expands(tmp_path, levels):
    path = write(tmp_path, f"train:\n  steps: 20\npretrain:\n  cnn_widths: {bomb(levels)}\n")
    with pytest.raises(tt.ConfigError) as error:
        tt.load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 4: this value holds over 100,000 values")
    assert "aliases" in message and "\n" not in message and len(message) < 300


def test_modest_anchors_and_merge_keys_still_load(tmp_path):
    path = write(
        tmp_path,
        "pretrain:\n"
        "  vit: &vit {width: 96, heads: 4, depth: 2}\n"
        "  crop_scale: &crop [0.5, 1.0]\n"
        "data: {crop_scale: *crop}\n"
        "model:\n"
        "  mode: clip\n"
        "  image:\n"
        "    <<: *vit\n"
        "    depth: 3\n",
    )
    cfg = load_experiment_config(path)
    assert (cfg.model.image.width, cfg.model.image.heads, cfg.model.image.depth) == (96, 4, 3)
    assert cfg.data.crop_scale == cfg.pretrain.crop_scale == (0.5, 1.0)


@pytest.mark.parametrize(
    "value",
    [
        "[" * DEEP + "]" * DEEP,
        "{a: " * DEEP + "1" + "}" * DEEP,
        "".join(f"\n{'  ' * (level + 2)}- " for level in range(80)) + "1",
    ],
    ids=["flow-lists", "flow-mappings", "block-lists"],
)
def test_deep_nesting_is_refused_not_a_recursion_error(tmp_path, value):
    path = write(tmp_path, f"pretrain:\n  cnn_widths: {value}\n")
    with pytest.raises(
        tt.ConfigError, match=rf"^{re.escape(str(path))}, line \d+: nested more than 64 levels"
    ):
        tt.load_config(path)


def test_aliases_cannot_nest_deeper_or_contain_themselves(tmp_path):
    nest = "[" * 40 + "{}" + "]" * 40
    text = f"pretrain:\n  cnn_widths: &a {nest.format(1)}\n  vit: {{depth: {nest.format('*a')}}}\n"
    path = write(tmp_path, text)
    with pytest.raises(tt.ConfigError, match=r"line 3: nested more than 64 levels"):
        tt.load_config(path)
    path = write(tmp_path, "pretrain:\n  cnn_widths: &a [1, *a]\n")
    with pytest.raises(tt.ConfigError, match=r"line 2: alias \*a is inside its own value"):
        tt.load_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  steps: 20\nmodel:\n  mode: clip\ntrain:\n  lr: 0.1\n",
            r"line 5: key 'train' is given twice \(first on line 1\)",
        ),
        (
            "train:\n  steps: 20\n  lr: 0.1\n  steps: 30\n",
            r"line 4: key 'steps' is given twice \(first on line 2\)",
        ),
        (
            "model:\n  image: {width: 96, heads: 4, width: 128}\n",
            r"line 2: key 'width' is given twice \(first on line 2\)",
        ),
    ],
    ids=["section", "key", "flow-key"],
)
def test_a_key_given_twice_is_refused_naming_it_and_its_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(tt.ConfigError, match=rf"^{re.escape(str(path))}, {message}; keep one"):
        tt.load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.cnn_widths=" + "[" * DEEP + "]" * DEEP, "nested more than 64 levels"),
        (f"pretrain.cnn_widths={bomb(10)}", "this value holds over 100,000 values"),
        ("model.image={width: 96, width: 128}", "key 'width' is given twice"),
    ],
    ids=["deep", "bomb", "repeated-key"],
)
def test_overrides_get_the_same_guards(override, message):
    key = override.partition("=")[0]
    with pytest.raises(tt.ConfigError, match=rf"^override {key}, line 1: {message}"):
        tt.load_config("tiny", [override])


@pytest.mark.parametrize(
    "text",
    [
        f"pretrain:\n  cnn_widths: {bomb(10)}\n",
        "pretrain:\n  cnn_widths: " + "[" * DEEP + "]" * DEEP + "\n",
        "train:\n  steps: 20\ntrain:\n  lr: 0.1\n",
    ],
    ids=["bomb", "deep", "repeated-section"],
)
def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, capsys, text):
    path = write(tmp_path, text)
    assert main(["config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"threetowers config: error: {path}, line ") and err.count("\n") == 1
