"""Every mistake ends in one message and exit status 2: property-based over random configs and
command lines, and by example for missing paths."""

from __future__ import annotations

import json
import string
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.bad_data import write_mixed_shards
from threetowers.cli import main
from threetowers.config import Config, Section, load_config

BASE = load_config("tiny", ["model.mode=clip"]).model_dump(mode="json")


def key_paths(tree: dict, prefix: tuple = ()) -> list[tuple[str, ...]]:
    """Every section and key of the config, as paths."""
    paths = []
    for key, value in tree.items():
        paths.append((*prefix, key))
        if isinstance(value, dict):
            paths += key_paths(value, (*prefix, key))
    return paths


KNOWN = key_paths(Config().model_dump(mode="json"))
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["clip", "lit", "3t", "softmax", "sigmoid", "gap", "map", "eot", "cls"]),
    st.lists(st.integers(-3, 300), max_size=3),
    st.dictionaries(st.text(string.ascii_lowercase, max_size=6), st.integers(-3, 9), max_size=2),
)
CHOICES = ["clip", "lit", "3t", "sigmoid", "softmax", "map", "cls", "eot", "first", "mean"]
CHOICES += ["mlp", "identity", "linear", "l2", "contrastive", "checkpoint", "hf"]


def default_at(path: tuple[str, ...]):
    node = Config().model_dump(mode="json")
    for part in path:
        node = node[part]
    return node


def literal_choices(path: tuple[str, ...]) -> list[str]:
    """The allowed strings of a Literal-typed config key (none for free strings)."""
    section = Config
    for part in path:
        annotation = section.model_fields[part].annotation
        options = [a for a in typing.get_args(annotation) if isinstance(a, type)] or [annotation]
        section = next((o for o in options if isinstance(o, type) and issubclass(o, Section)), None)
    if typing.get_origin(annotation) is typing.Literal:
        return list(typing.get_args(annotation))
    return []


def model_value(path: tuple[str, ...]) -> st.SearchStrategy:
    """Mostly values of the key's own type, small (absurd sizes are valid, just slow to
    build), so that many mutated configs pass validation and reach the model builder."""
    default = default_at(path)
    if isinstance(default, bool):
        typed = st.booleans()
    elif isinstance(default, int):
        typed = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32]), st.integers(-2, 48))
    elif isinstance(default, float):
        typed = st.floats(min_value=-1.0, max_value=300.0)
    else:
        typed = st.sampled_from(literal_choices(path) or CHOICES)
    return st.one_of(*[typed] * 6, st.none(), st.sampled_from(CHOICES))


MODEL_KEYS = [p for p in KNOWN if p[0] in ("model", "loss") and not isinstance(default_at(p), dict)]
MODEL_MUTATION = st.sampled_from(MODEL_KEYS).flatmap(
    lambda path: st.tuples(st.just(path), model_value(path))
)
PATHS = st.one_of(
    st.sampled_from(KNOWN),
    st.lists(
        st.text(string.ascii_letters + "._", min_size=1, max_size=8), min_size=1, max_size=3
    ).map(tuple),
)


def mutated(base: dict, mutations: list[tuple[tuple[str, ...], object]]) -> dict:
    raw = json.loads(json.dumps(base))
    for path, value in mutations:
        node = raw
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[path[-1]] = value
    return raw


def assert_clean(code: int, err: str) -> None:
    """Success, or exit 2 with one ``threetowers ...: error: ...`` message (argparse's comes
    after its usage lines)."""
    assert code in (0, 2)
    assert "Traceback" not in err
    if code == 2:
        assert err.count("error:") == 1
        assert err[err.index("error:") - 2 :].startswith(": ") and "threetowers" in err


SETTINGS = settings(
    deadline=None,
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@SETTINGS
@given(st.lists(st.tuples(PATHS, VALUES), min_size=1, max_size=4))
def test_random_config_mutations_end_in_a_config_or_one_message(tmp_path, capsys, mutations):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(mutated(BASE, mutations)))
    code = main(["config", str(path)])
    assert_clean(code, capsys.readouterr().err)


@settings(SETTINGS, max_examples=60)
@given(st.lists(MODEL_MUTATION, min_size=1, max_size=3))
def test_random_valid_looking_configs_build_or_end_in_one_message(tmp_path, capsys, mutations):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(mutated(BASE, mutations)))
    code = main(["summary", str(path)])  # builds the model (on the meta device)
    assert_clean(code, capsys.readouterr().err)


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=16), min_size=1, max_size=3))
def test_random_overrides_on_the_command_line(capsys, overrides):
    try:
        code = main(["config", "tiny", *overrides])
    except SystemExit as stop:  # argparse: usage and one message
        code = stop.code
    assert_clean(code, capsys.readouterr().err)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_mixed_shards(tmp_path_factory.mktemp("errors") / "shards")


def test_too_much_bad_data_stops_training_naming_examples(shards, tmp_path, capsys):
    argv = ["train", "tiny", "model.mode=clip", f"data.train={shards}", "data.batch_size=4"]
    argv += ["train.steps=2", "data.num_workers=0", "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error: training data:" in err and "more than data.max_bad_fraction=0.01" in err
    assert "First examples:" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train=/nowhere/pairs.csv"], "data.train: pairs file not found"),
        (["data.train=/nowhere/shards"], "data.train: pairs source not found"),
        (["data.tokenizer=/nowhere/tokenizer.json"], "data.tokenizer: tokenizer file not found"),
        (
            ["model.mode=lit", "model.third.backbone=checkpoint", "model.third.path=/nowhere.st"],
            "classifier checkpoint /nowhere.st not found",
        ),
        (["eval.retrieval=/nowhere/dataset.json"], "eval.retrieval: Karpathy split file not"),
        (["eval.zeroshot.imagenet=/nowhere"], "eval.zeroshot.imagenet: class folder root not"),
        (["data.max_bad_fraction=2"], "data.max_bad_fraction: Input should be less than"),
        (["train.lr=inf"], "train.lr: Input should be a finite number"),
        (["train.max_bad_steps=0"], "train.max_bad_steps: Input should be greater than 0"),
    ],
)
def test_missing_paths_and_bad_values_are_named(shards, tmp_path, capsys, overrides, message):
    settings = {"model.mode": "clip", "data.train": shards, "data.batch_size": 4}
    settings |= {"train.steps": 1, "data.max_bad_fraction": 0.5}
    settings |= dict(item.split("=", 1) for item in overrides)  # a key is given once
    argv = ["train", "tiny", *(f"{key}={value}" for key, value in settings.items())]
    assert main([*argv, "--run-dir", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
