"""The command line on a tiny embedded world: pretrain, train, eval, embed, cache, errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from tests.helpers.runs import TINY_WORLD, tiny_run_config
from threetowers.backbones.classifier import load_classifier
from threetowers.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3T run trained through the CLI, and its config file."""
    root = tmp_path_factory.mktemp("cli")
    cfg = tiny_run_config(root / "world", root / "cache", "train.steps=3")
    # train ignores the pretrain section, `threetowers pretrain` reads it
    pretrain = {"steps": 3, "batch_size": 16, "num_workers": 0}
    pretrain["out"] = str(root / "objects.safetensors")
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json") | {"pretrain": pretrain}))
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
    for foreign in ("model.mode=clip", "data.batch_size=8", "data.train=x.csv"):
        assert main(["eval", str(root / "run"), foreign]) == 2
        err = capsys.readouterr().err
        assert f"got ['{foreign}']" in err and "eval.* overrides and the data-reading keys" in err
        assert "data.max_bad_fraction, data.num_workers, data.cache_dir" in err


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
    assert "256 feature vectors of dim 1280 (float16)" in capsys.readouterr().out
    (folder,) = tmp_path.glob("efficientnet_lite0-*")
    units = sorted(folder.glob("*.json"))
    assert len(units) == len(list(folder.glob("*.npy"))) > 1  # one per shard of the world
    stamps = [unit.stat().st_mtime_ns for unit in units]
    assert main(["cache", str(config), f"data.cache_dir={tmp_path}"]) == 0  # checked, kept
    assert [unit.stat().st_mtime_ns for unit in units] == stamps


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "missing.yaml"], "neither a file nor a preset"),
        (["eval", "/nonexistent/run"], "neither a run directory nor a checkpoint"),
        (["embed", "/nonexistent/run", "--out", "x.npy"], "neither a run directory"),
        (["cache", "tiny", "model.mode=clip"], "has no frozen tower to cache"),
        (["config", "tiny", "model.image.widht=3"], "did you mean 'width'"),
    ],
)
def test_user_errors_end_in_one_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_only_rank_zero_reports_a_config_error(monkeypatch, capsys):
    argv = ["config", "tiny", "model.image.widht=3"]
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    assert capsys.readouterr().err == ""
    assert main(["eval", "/nonexistent/run"]) == 2  # not a config error: every rank says it
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "0")
    assert main(argv) == 2
    assert "did you mean 'width'" in capsys.readouterr().err


def test_overrides_may_follow_options(capsys):
    assert main(["config", "tiny", "model.embed_dim=24"]) == 0
    assert "embed_dim: 24" in capsys.readouterr().out
    # options between the config and its overrides: the overrides still apply
    assert main(["train", "tiny", "--quiet", "model.image.widht=3"]) == 2
    assert "did you mean 'width'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["config", "tiny", "--bogus", "model.embed_dim=24"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_key_given_twice_on_the_command_line_is_refused(tmp_path, capsys):
    # what `data.train=/data/cc3m/{000000..000331}.tar`, unquoted, becomes in the shell
    shards = [f"data.train={tmp_path}/cc3m/{i:06d}.tar" for i in range(332)]
    run = tmp_path / "run"
    assert main(["train", "tiny", *shards, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"threetowers train: error: data.train is given 332 times on the command line "
        f"({shards[0]}, {shards[1]}, ...); give it once. An unquoted brace pattern is "
        "expanded by the shell into one argument per file: quote it, e.g. "
        "'data.train=/data/cc3m/{000000..000331}.tar'"
    ]
    assert not run.exists()  # refused before anything is written
    assert main(["config", "tiny", "train.steps=5", "train.steps=7"]) == 2
    assert "train.steps is given 2 times" in capsys.readouterr().err


def class_folders(root, classes=3, per_class=40, corrupt=()):
    """Class folders of small images, the given (class, index) files corrupt."""
    for label in range(classes):
        folder = root / "test" / f"class_{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            path = folder / f"{index:03d}.png"
            if (label, index) in corrupt:
                path.write_bytes(b"\x89PNG\r\n\x1a\n damaged")
            else:
                Image.new("RGB", (16, 16), (label * 80, index * 5, 0)).save(path)
    return root


def test_eval_and_embed_skip_unreadable_images_and_stop_above_the_fraction(
    trained, tmp_path, capsys
):
    root, _ = trained
    one_bad = class_folders(tmp_path / "one_bad", corrupt={(1, 7)})  # 1 of 120: under 1%
    args = ["eval", str(root / "run"), f"eval.zeroshot.mine={one_bad}", "eval.retrieval=null"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["skipped_images"] == 1
    assert "class_1/007.png" in capsys.readouterr().err  # named in the log

    many_bad = class_folders(tmp_path / "many_bad", corrupt={(0, i) for i in range(6)})
    args = ["eval", str(root / "run"), f"eval.zeroshot.mine={many_bad}", "eval.retrieval=null"]
    assert main([*args, "--out", str(tmp_path / "eval")]) == 2
    err = capsys.readouterr().err
    assert "evaluation images: 6 of " in err and "data.max_bad_fraction=0.01" in err
    assert "class_0/000.png" in err
    assert "Traceback" not in err
    relaxed = [*args, "data.max_bad_fraction=0.06", "--out", str(tmp_path / "relaxed")]
    scores = []
    for workers in (0, 2):  # reading in loader processes gives the same embeddings
        assert main([*relaxed, f"data.num_workers={workers}"]) == 0
        scores.append(json.loads((tmp_path / "relaxed" / "eval.json").read_text()))
    assert scores[0]["skipped_images"] == scores[1]["skipped_images"] == 6
    assert scores[0]["zeroshot_top1"] == scores[1]["zeroshot_top1"]

    out = tmp_path / "images.npy"
    args = ["embed", str(root / "run"), "--images", str(one_bad / "test"), "--out", str(out)]
    assert main(args) == 0
    keys = json.loads(out.with_suffix(".keys.json").read_text())
    assert len(keys) == 119 and "class_1/007.png" not in keys
    assert "skipped 1 bad of 120 samples" in capsys.readouterr().err


def test_embed_texts_skips_lines_that_are_not_utf8(trained, tmp_path, capsys):
    root, _ = trained
    texts = tmp_path / "captions.txt"
    lines = [f"caption number {i}".encode() for i in range(200)] + [b"caf\xe9 au lait"]
    texts.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "texts.npy"
    assert main(["embed", str(root / "run"), "--texts", str(texts), "--out", str(out)]) == 0
    assert len(json.loads(out.with_suffix(".keys.json").read_text())) == 200
    assert "line 201" in capsys.readouterr().err


def test_pretrain_skips_unreadable_images(trained, tmp_path):
    root, config = trained
    data = class_folders(tmp_path / "labels", per_class=60, corrupt={(2, 3)})
    (data / "train").symlink_to(data / "test")
    (data / "val").symlink_to(data / "test")
    out = tmp_path / "mine.safetensors"
    args = ["pretrain", str(config), f"pretrain.data={data}", f"pretrain.out={out}", "--quiet"]
    assert main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["skipped_images"]["val"] == 1  # train: as many as its few steps visited
