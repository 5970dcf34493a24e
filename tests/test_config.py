"""Configs: presets, YAML, overrides, and one clear message per mistake."""

from __future__ import annotations

import pytest
import torch

import threetowers as tt
from threetowers.config import load_experiment_config, preset_names


def test_presets_and_overrides_load_typed_values(tmp_path):
    assert {"tiny", "b16", "l16", "g14"} <= set(preset_names())
    cfg = tt.load_config(
        "tiny",
        [
            "model.mode=lit",
            "loss.kind=sigmoid",
            "model.text.causal=true",
            "model.text.pool=eot",
            "model.frozen.0.f_weight=0.5",
        ],
    )
    assert cfg.model.mode == "lit" and cfg.loss.kind == "sigmoid"
    assert cfg.model.text.causal is True and cfg.model.frozen[0].f_weight == 0.5
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  mode: clip\n  image: {width: 96, heads: 4}\n")
    cfg = tt.load_config(path, ["model.embed_dim=48"])
    assert (cfg.model.mode, cfg.model.image.width, cfg.model.embed_dim) == ("clip", 96, 48)
    assert tt.load_config().model.mode == "3t"  # defaults


def test_override_can_create_a_section_left_null_and_a_list_item():
    cfg = tt.load_config(
        "tiny", ["model.mode=clip", "model.frozen=null", "model.frozen.0.head=mlp"]
    )
    (tower,) = cfg.model.frozen
    assert tower.head == "mlp" and tower.backbone == "efficientnet_lite0" and tower.name == "h"
    cfg = tt.load_config("tiny", ["model.frozen.1={name: b}", "model.frozen.1.path=x"])
    assert [(t.name, t.path) for t in cfg.model.frozen] == [("h", None), ("b", "x")]
    with pytest.raises(tt.ConfigError, match=r"model.frozen is a list of 1; give a position"):
        tt.load_config("tiny", ["model.frozen.3.path=x"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.image.widht=3"], r"model.image.widht: unknown key; did you mean 'width'\?"),
        (["loss.kinds=softmax"], r"loss.kinds: unknown key; did you mean 'kind'\?"),
        (["model.image.width=wide"], r"model.image.width: .*integer.*\(got 'wide'\)"),
        (["model.mode=siglip"], r"model.mode: Input should be 'clip', 'lit' or '3t'"),
        (["model.mode=3t", "model.frozen=[]"], r"mode '3t' needs a frozen tower"),
        (["model.mode=lit", "model.frozen=[]"], r"mode 'lit' needs a frozen tower"),
        (
            ["model.frozen=[{name: a}, {name: b}]", "model.mode=lit"],
            r"mode 'lit' locks one frozen tower .*\['a', 'b'\]",
        ),
        (["model.frozen=[{name: h}, {name: fh}]"], r"clash: \['fh'\]"),
        (["model.frozen=[{name: g}]"], r"clash: \['g'\]"),
        (["model.frozen=[{name: Big}]"], r"model.frozen.0.name: String should match pattern"),
        (["model.frozen=[{name: a, f_wieght: 2}]"], r"f_wieght: unknown key; did you mean 'f_w"),
        (["model.frozen.0.backbone=resnet50"], r"unknown backbone 'resnet50'; choose one of"),
        (["model.frozen.0.backbone=hf"], r"backbone 'hf' needs a path"),
        (["model.frozen.0.backbone=minilm", "model.frozen.0.image_size=64"], r"reads captions"),
        (["model.frozen.0.distill_weight=2"], r"distill_weight is a frozen pair's \(backbone"),
        (["model.frozen.0.backbone=pair"], r"backbone 'pair' needs a path"),
        (
            [
                "model.frozen.0.backbone=pair",
                "model.frozen.0.path=x",
                "model.frozen.0.image_size=8",
            ],
            r"a pair's image side reads its own input size",
        ),
        (
            ["model.mode=lit", "model.frozen.0.backbone=pair", "model.frozen.0.path=x"],
            r"mode 'lit' locks one frozen tower .* is a frozen pair \(two towers\); use mode '3t'",
        ),
        (["model.image.pool=map", "model.image.class_token=true"], r"does not go with pool"),
        (["model.text.pad_id=512"], r"pad_id 512 is outside the vocabulary \(size 512\)"),
        (["model.image.patch_size=5"], r"image_size 32 is not divisible by patch_size 5"),
        (["model.text.heads=3"], r"width 64 is not divisible by heads 3"),
        (["model.text.causal=true", "model.text.pool=first"], r"pool 'first' with causal"),
        (
            ["loss.weights.f_g=0", "model.frozen.0.f_weight=0", "model.frozen.0.g_weight=0"],
            r"every loss term \(f_g, fh_h, gh_h\) has weight 0",
        ),
        (["loss.init_scale=200"], r"init_scale 200.0 exceeds max_scale 100.0"),
        (["model.embed_dim=-4"], r"model.embed_dim: Input should be greater than 0"),
        (["model.image.width"], r"not of the form key=value"),
        (["model.mode.x=1"], r"model.mode is a value, not a section"),
    ],
)
def test_mistakes_give_one_clear_message(overrides, message):
    with pytest.raises(tt.ConfigError, match=message) as error:
        tt.load_config("tiny", overrides)
    assert "Traceback" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["reproduce.scaling_axes=[towers, towers]"],
            r"scaling_axes must be distinct and not empty, got \['towers', 'towers'\]",
        ),
        (["reproduce.scaling_axes=[tower]"], r"reproduce.scaling_axes.0: Input should be 'pairs'"),
        (["reproduce.seed=2"], r"reproduce.seed: unknown key; did you mean 'seeds'\?"),
    ],
)
def test_experiment_mistakes_give_one_clear_message(overrides, message):
    with pytest.raises(tt.ConfigError, match=message):
        load_experiment_config("reproduce", overrides)


def test_missing_file_and_bad_yaml_are_named(tmp_path):
    with pytest.raises(tt.ConfigError, match="neither a file nor a preset; presets:"):
        tt.load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(tt.ConfigError, match="not valid YAML"):
        tt.load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(tt.ConfigError, match="top level must be a mapping"):
        tt.load_config(bad)


def test_identity_head_checked_against_a_loaded_backbone(backbone):
    cfg = tt.load_config(
        "tiny",
        [
            "model.frozen.0.backbone=checkpoint",
            "model.frozen.0.path=x",
            "model.frozen.0.head=identity",
            "model.embed_dim=16",
        ],
    )
    with pytest.raises(tt.ConfigError, match=r"feature dim \(24\), got embed_dim 16"):
        tt.build_model(cfg, frozen=backbone)
    ok = tt.load_config(
        "tiny",
        [
            "model.frozen.0.backbone=checkpoint",
            "model.frozen.0.path=x",
            "model.frozen.0.head=identity",
            "model.embed_dim=24",
        ],
    )
    model = tt.build_model(ok, frozen=backbone)
    assert isinstance(model.heads["h"], torch.nn.Identity)
