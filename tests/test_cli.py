"""The command line on a tiny embedded world: pretrain, train, eval, embed, cache, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open

from tests.test_train import TINY_WORLD, tiny_run_config
from threetowers.classifier import load_classifier
from threetowers.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3T run trained through the CLI, and its config file."""
    root = tmp_path_factory.mktemp("cli")
    cfg = tiny_run_config(
        root / "world",
        root / "cache",
        "train.steps=3",
        "pretrain.steps=3",
        "pretrain.batch_size=16",
        "pretrain.num_workers=0",
        f"pretrain.out={root / 'objects.safetensors'}",
    )
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["train", str(config), "--run-dir", str(root / "run"), "--quiet"]) == 0
    return root, config


def test_train_prints_results_next_to_chance(trained, capsys):
    root, config = trained
    assert main(["train", str(config), "--run-dir", str(root / "run"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "i2t_R@1" in out and "zeroshot_top1" in out and "chance" in out


def test_pretrain_writes_a_classifier_usable_as_third_tower(trained, tmp_path):
    root, config = trained
    assert main(["pretrain", str(config), "--quiet"]) == 0
    classifier = load_classifier(root / "objects.safetensors")
    assert len(classifier.class_names) == 12 and classifier.architecture == "cnn"
    report = json.loads((root / "objects.json").read_text())
    assert 0 <= report["val_top1"] <= 100 and report["train_images"] == 12 * 10
    run = tmp_path / "with_checkpoint"
    args = [
        "train",
        str(config),
        "model.third.backbone=checkpoint",
        f"model.third.path={root / 'objects.safetensors'}",
        "model.third.image_size=null",
        "train.steps=2",
        "--run-dir",
        str(run),
        "--quiet",
    ]
    assert main(args) == 0
    assert (run / "eval.json").exists()


def test_eval_writes_eval_json_and_refuses_model_overrides(trained, tmp_path, capsys):
    root, _ = trained
    assert main(["eval", str(root / "run"), "eval.fewshot_shots=1", "--out", str(tmp_path)]) == 0
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["fewshot_shots"] == 1 and len(scores["alpha_sweep"]) == 11
    assert main(["eval", str(root / "run"), "model.mode=clip"]) == 2
    assert "eval.* overrides only" in capsys.readouterr().err


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_embed_texts_and_images(trained, tmp_path, alpha):
    root, _ = trained
    texts = tmp_path / "captions.txt"
    texts.write_text("a red circle\n\na blue star on snow\n")
    out = tmp_path / "texts.safetensors"
    assert (
        main(
            [
                "embed",
                str(root / "run"),
                "--texts",
                str(texts),
                "--alpha",
                str(alpha),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with safe_open(str(out), framework="pt") as handle:
        vectors = handle.get_tensor("embeddings")
        assert json.loads(handle.metadata()["keys"]) == ["a red circle", "a blue star on snow"]
    assert vectors.shape == (2, 32 if alpha == 1.0 else 64)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(2))
    images = root / "world" / "zeroshot_places" / "val"
    assert (
        main(
            [
                "embed",
                str(root / "run"),
                "--images",
                str(images),
                "--alpha",
                str(alpha),
                "--out",
                str(tmp_path / "images.npy"),
            ]
        )
        == 0
    )
    keys = json.loads((tmp_path / "images.keys.json").read_text())
    assert len(keys) == 9 * TINY_WORLD["zeroshot_val_per_class"]


def test_cache_command_fills_the_cache(trained, tmp_path, capsys):
    _, config = trained
    assert main(["cache", str(config), f"data.cache_dir={tmp_path}"]) == 0
    assert "256 feature vectors of dim 1280" in capsys.readouterr().out
    assert len(list(tmp_path.glob("efficientnet_lite0-*.safetensors"))) == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.yaml"], "neither a file nor a preset"),
        (["eval", "/nonexistent/run"], "neither a run directory nor a checkpoint"),
        (["embed", "/nonexistent/run", "--out", "x.npy"], "neither a run directory"),
        (["cache", "tiny", "model.mode=clip"], "has no third tower to cache"),
        (["config", "tiny", "model.image.widht=3"], "did you mean 'width'"),
    ],
)
def test_user_errors_end_in_one_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_overrides_may_follow_options(capsys):
    assert main(["config", "tiny", "model.embed_dim=24"]) == 0
    assert "embed_dim: 24" in capsys.readouterr().out
    # options between the config and its overrides: the overrides still apply
    assert main(["train", "tiny", "--quiet", "model.image.widht=3"]) == 2
    assert "did you mean 'width'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "tiny", "--bogus", "model.embed_dim=24"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
