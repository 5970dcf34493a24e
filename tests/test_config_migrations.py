"""Keys that moved in issue 39 are read in their new place, with a warning naming the new key:
files and run directories written before (tests/fixtures/configs_before_issue_39), and the
old dotted overrides in any combination with presets in the new form."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

import threetowers as tt
from threetowers.config import ConfigMigrationWarning, load_experiment_config
from threetowers.model.trained import load_trained
from threetowers.trainer.run_dir import config_to_train, same_config

BEFORE = Path(__file__).parent / "fixtures" / "configs_before_issue_39"


def loaded(source, overrides=()) -> tuple[tt.Config, str]:
    """The config, and every warning's text joined."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = tt.load_config(source, list(overrides))
    return cfg, " ".join(str(w.message) for w in caught)


def quiet(source, overrides=()) -> tt.Config:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigMigrationWarning)  # today's form: nothing moved
        return tt.load_config(source, list(overrides))


def test_the_old_presets_are_todays_presets():
    old, said = loaded(BEFORE / "tiny_preset.yaml")
    assert old == quiet("tiny")
    assert "model.third is model.frozen: [{name: h, ...}]" in said
    old, said = loaded(BEFORE / "reproduce_preset.yaml")
    assert old == quiet("reproduce")
    assert old.model.frozen[0].f_weight == old.model.frozen[0].g_weight == 0.25
    assert "loss.weights.fh_h is model.frozen.N.f_weight" in said
    assert "loss.weights.gh_h is model.frozen.N.g_weight" in said
    assert "pretrain and reproduce sections are read by `threetowers pretrain`" in said


def test_a_recorded_run_config_equals_the_config_that_made_it(tmp_path):
    """An old run directory resumes: its config.yaml, migrated, is the start's config."""
    cfg = quiet(
        "reproduce", ["model.frozen.0.backbone=efficientnet_lite0", "train.run_dir=runs/old"]
    )
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text((BEFORE / "recorded_reproduce.yaml").read_text())
    with pytest.warns(ConfigMigrationWarning):
        assert same_config(cfg, run_dir)
        assert config_to_train(cfg, run_dir, checkpoint_step=4) == cfg
    other = quiet("reproduce", ["model.frozen.0.f_weight=1", "train.run_dir=runs/old"])
    assert not same_config(other, run_dir)  # the weight moved, and still counts


def test_tower_weights_and_the_loss_level_ones_combine_as_before():
    """Before: a tower's own weight won over loss.weights.fh_h / gh_h."""
    old, said = loaded(BEFORE / "recorded_two_towers.yaml")
    weights = [(t.name, t.f_weight, t.g_weight) for t in old.model.frozen]
    assert weights == [("a", 2.0, 2.0), ("b", 1.0, 0.5)]
    assert "model.frozen.0.weight is model.frozen.0.f_weight and model.frozen.0.g_weight" in said
    assert "model.third" in said  # third: null beside the list
    again = quiet(
        "tiny",
        [
            "model.frozen=[{name: a, f_weight: 2, g_weight: 2}, {name: b, g_weight: 0.5}]",
            "train.precision=fp32",  # recorded before auto was the default
        ],
    )
    assert old == again


@pytest.mark.parametrize(
    ("overrides", "expected", "named"),
    [
        (
            ["model.third.backbone=checkpoint", "model.third.path=x.safetensors"],
            {"backbone": "checkpoint", "path": "x.safetensors"},
            "model.frozen.0.path",
        ),
        (["model.third.image_size=64"], {"image_size": 64}, "model.frozen.0.image_size"),
        (["model.third.weight=0.5"], {"f_weight": 0.5, "g_weight": 0.5}, "f_weight"),
        (["loss.weights.fh_h=0.5"], {"f_weight": 0.5, "g_weight": 1.0}, "model.frozen.N.f_weight"),
        (["loss.weights.gh_h=0.5"], {"g_weight": 0.5}, "model.frozen.N.g_weight"),
        (["model.third={backbone: minilm}"], {"backbone": "minilm"}, "model.frozen.0"),
    ],
)
def test_old_overrides_on_a_new_preset(overrides, expected, named):
    cfg, said = loaded("tiny", overrides)
    (tower,) = cfg.model.frozen
    assert {key: getattr(tower, key) for key in expected} == expected
    assert named in said and "read as that" in said


def test_old_overrides_on_a_preset_whose_tower_sets_its_weights():
    """demo.yaml's tower weighs its terms 0.25: an old override still sets them, as before."""
    cfg, said = loaded("configs/demo.yaml", ["loss.weights.fh_h=0.5"])
    assert (cfg.model.frozen[0].f_weight, cfg.model.frozen[0].g_weight) == (0.5, 0.25)
    cfg, said = loaded("configs/demo.yaml", ["model.third.weight=2"])
    assert (cfg.model.frozen[0].f_weight, cfg.model.frozen[0].g_weight) == (2.0, 2.0)
    assert "model.third.weight is model.frozen.0.f_weight and g_weight" in said
    with pytest.raises(tt.ConfigError, match="model.frozen is not a list of towers"):
        loaded("tiny", ["model.frozen=3", "model.third.path=x"])


def test_model_third_null_removes_the_tower_and_a_later_key_adds_it_back():
    cfg, said = loaded("tiny", ["model.mode=clip", "model.third=null"])
    assert cfg.model.frozen == [] and "model.frozen (the tower removed)" in said
    cfg, _ = loaded("tiny", ["model.mode=clip", "model.third=null", "model.third.head=mlp"])
    assert [(t.name, t.head, t.backbone) for t in cfg.model.frozen] == [
        ("h", "mlp", "efficientnet_lite0")
    ]
    with pytest.raises(tt.ConfigError, match="mode '3t' needs a frozen tower"):
        loaded("tiny", ["model.third=null"])


@pytest.mark.parametrize("order", [1, -1])
def test_loss_level_weights_reach_towers_listed_before_or_after(order):
    overrides = ["model.frozen=[{name: a}, {name: b, g_weight: 2}]", "loss.weights.gh_h=0.3"]
    cfg, said = loaded("tiny", overrides[::order])
    # as an override it is every tower's (a later override wins), or the default of towers
    # listed later without their own
    got = [(t.name, t.f_weight, t.g_weight) for t in cfg.model.frozen]
    assert got == [("a", 1.0, 0.3), ("b", 1.0, 0.3 if order == 1 else 2.0)]
    assert "model.frozen.N.g_weight" in said


def test_old_keys_of_several_towers_in_a_file(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(
        "model:\n  third: {backbone: efficientnet_lite1}\n"  # the list replaces the shorthand
        "  frozen: [{name: a, weight: 3}, {name: b}]\n"
        "loss: {weights: {f_g: 2, fh_h: 0.5}}\n"
    )
    cfg, said = loaded(path)
    assert [(t.name, t.backbone, t.f_weight, t.g_weight) for t in cfg.model.frozen] == [
        ("a", "efficientnet_lite0", 3.0, 3.0),
        ("b", "efficientnet_lite0", 0.5, 1.0),
    ]
    assert cfg.loss.weights.f_g == 2.0 and str(path) in said


def test_train_drops_the_grid_sections_the_grid_commands_read_them(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("pretrain: {steps: 7}\nreproduce: {seeds: 2}\ntrain: {steps: 9}\n")
    cfg, said = loaded(path, ["reproduce.workers=1"])
    assert type(cfg) is tt.Config and cfg.train.steps == 9
    assert "other commands ignore them" in said
    assert set(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == {
        "model",
        "loss",
        "data",
        "train",
        "eval",
    }
    grid = load_experiment_config(path, ["reproduce.workers=1"])
    assert (grid.pretrain.steps, grid.reproduce.seeds, grid.reproduce.workers) == (7, 2, 1)
    assert grid.training_config() == cfg


def test_grid_sections_at_their_defaults_go_without_a_word(tmp_path):
    """A run directory's config.yaml written before holds both sections at their defaults."""
    defaults = load_experiment_config(None).model_dump(mode="json")
    path = tmp_path / "recorded.yaml"
    path.write_text(yaml.safe_dump(defaults))
    cfg, said = loaded(path)
    assert "ignore" not in said and cfg == tt.load_config(None)


def test_the_new_form_loads_without_a_warning():
    for name in tt.config.preset_names():
        quiet(name)
    quiet("configs/demo.yaml")


def test_an_old_run_keeps_the_fingerprint_its_search_indexes_hold():
    """The fingerprint hashes the model section as recorded: 79881ea6e768050d is what the code
    before issue 39 computed for this run, so its indexes still serve."""
    run = Path(__file__).parent / "fixtures" / "run_before_issue_39" / "run"
    with pytest.warns(ConfigMigrationWarning):
        assert load_trained(run).fingerprint == "79881ea6e768050d"
