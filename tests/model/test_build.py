"""model/build.py: from a config to a model, its heads, its loss terms and their weights."""

from __future__ import annotations

import pytest
import torch

import threetowers as tt
from tests.conftest import tiny_backbone, tiny_config, tiny_model
from threetowers.config import LossConfig, ModelConfig
from threetowers.files.checkpoints import Checkpoint, restore_model
from threetowers.model.build import build_frozen_towers, build_loss, structure_of
from threetowers.model.legacy_keys import renamed_legacy_keys
from threetowers.trainer.checkpoint import load_matching


def test_each_tower_weighs_its_own_terms():
    cfg = tiny_config(
        "3t",
        "model.frozen=[{name: a, f_weight: 0.5, g_weight: 0}, {name: b}]",
        "loss.weights.f_g=2",
    )
    loss = build_loss(cfg.model, cfg.loss)
    assert loss.weights == {"f_g": 2.0, "fa_a": 0.5, "fb_b": 1.0, "gb_b": 1.0}  # ga_a dropped
    assert "ga_a" not in loss.log_scale and set(loss.log_scale) == set(loss.weights)


@pytest.mark.parametrize(
    ("mode", "heads", "terms"),
    [
        ("clip", ["g", "f"], ["f_g"]),
        ("lit", ["g", "h"], ["h_g"]),
        ("3t", ["g", "f", "h", "fh", "gh"], ["f_g", "fh_h", "gh_h"]),
    ],
)
def test_each_mode_builds_its_heads_and_terms(mode, heads, terms):
    model = tiny_model(mode)
    assert list(model.heads) == heads
    assert [t.name for t in model.loss_fn.terms] == terms
    assert structure_of(tiny_config(mode).model).mode == mode
    assert (model.image_tower is None) == (mode == "lit") and not (mode == "clip" and model.frozen)


def test_a_module_from_python_gets_the_configs_messages():
    with pytest.raises(tt.ConfigError, match="frozen tower 'h' must be a FrozenBackbone"):
        build_frozen_towers(tiny_config().model, {"h": torch.nn.Linear(2, 2)})
    with pytest.raises(tt.ConfigError, match=r"one FrozenBackbone given for 2 frozen towers"):
        build_frozen_towers(
            tiny_config("3t", "model.frozen=[{name: a}, {name: b}]").model, tiny_backbone()
        )
    cfg = tiny_config("3t", "model.frozen.0.head=identity")
    with pytest.raises(tt.ConfigError, match=r"model.frozen.0.head 'identity' needs embed_dim"):
        tt.build_model(cfg, frozen=tiny_backbone())
    model = tt.build_model(ModelConfig(mode="clip"))  # a ModelConfig alone: the default loss
    assert model.loss_fn.kind == LossConfig().kind


def test_checkpoints_with_the_old_loss_name_load_resume_and_start_runs():
    """Before issue 39 the loss module was ``objective``: its parameters were objective.*."""
    model = tiny_model("3t", seed=0)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("frozen.")}
    old = {key.replace("loss_fn.", "objective.", 1): value for key, value in state.items()}
    assert any(key.startswith("objective.log_scale.") for key in old)
    assert renamed_legacy_keys(old).keys() == state.keys()
    for key in old:
        if key.startswith("objective."):
            old[key] = old[key] + 1.0
    fresh = tiny_model("3t", seed=1)
    restore_model(fresh, Checkpoint(step=4, model=dict(old), state={}, meta={}))  # resume, eval
    assert torch.equal(fresh.loss_fn.log_scale["fh_h"], old["objective.log_scale.fh_h"])
    started = tiny_model("3t", seed=2)
    missing, unused = load_matching(started, dict(old))  # train.init_from
    assert not unused and not [key for key in missing if key.startswith("loss_fn.")]
    assert torch.equal(started.loss_fn.log_scale["f_g"], old["objective.log_scale.f_g"])
