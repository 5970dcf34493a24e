"""``threetowers export --format open_clip`` in the project's own environment: its refusals,
the bias fold and what the folder holds (its tokenizer folder: test_tokenizer_folder.py).
That OpenCLIP itself computes our embeddings from it is tests/interop's job."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config
from tests.helpers.runs import tiny_run_config
from threetowers.apps.export.open_clip import ExportError, _folded_bias, refusals
from threetowers.backbones.trained_pair import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS
from threetowers.cli import main
from threetowers.trainer.loop import train

EXPORTABLE = ["model.image.pool=cls", "model.text.causal=true", "model.text.pool=eot"]


def test_an_exportable_config_has_no_refusals():
    assert refusals(tiny_config("3t", *EXPORTABLE)) == []
    gap = ["model.image.pool=gap", "model.image.class_token=true", *EXPORTABLE[1:]]
    assert refusals(tiny_config("clip", *gap)) == []


@pytest.mark.parametrize(
    "overrides, key, nearest",
    [
        (["model.image.pool=gap"], "model.image.pool gap", "model.image.class_token true"),
        (["model.image.pool=map"], "model.image.pool map", "model.image.pool cls"),
        (["model.text.pool=mean"], "model.text.pool mean", "model.text.pool eot"),
        (["model.text.causal=false"], "model.text.causal false", "model.text.causal true"),
        (["model.head=mlp"], "model.head mlp", "model.head linear"),
        (["model.embed_dim=96"], "model.embed_dim 96 > model.image.width 64", "<= 64"),
        (["model.image.mlp_ratio=2.51"], "model.image.mlp_ratio 2.51", "integer width"),
        (["loss.weights.f_g=0"], "loss.weights.f_g 0", "positive weight"),
    ],
)
def test_each_refusal_names_its_key_and_the_nearest_exportable_setting(overrides, key, nearest):
    cfg = tiny_config("3t", *EXPORTABLE, *overrides)
    reasons = refusals(cfg)
    assert len(reasons) == 1, reasons
    assert key in reasons[0] and nearest in reasons[0]


def test_lit_and_an_alpha_mix_are_refused():
    (reason,) = refusals(tiny_config("lit", *EXPORTABLE))
    assert "model.mode lit" in reason and "clip or 3t" in reason
    (reason,) = refusals(tiny_config("3t", *EXPORTABLE), alpha=0.5)
    assert "--alpha 0.5" in reason and "threetowers embed RUN --alpha 0.5" in reason
    assert refusals(tiny_config("3t", *EXPORTABLE), alpha=1.0) == []


def test_the_head_bias_folds_into_the_final_layernorm_exactly():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 32).double()
    norm = torch.nn.LayerNorm(64).double()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    tokens = torch.randn(5, 7, 64, dtype=torch.float64)
    delta = _folded_bias(head).double()
    for pooled, folded in [
        (norm(tokens).mean(dim=1), (norm(tokens) + delta).mean(dim=1)),  # avg
        (norm(tokens)[:, 0], (norm(tokens) + delta)[:, 0]),  # tok
    ]:
        torch.testing.assert_close(folded @ head.weight.T, head(pooled), rtol=0, atol=1e-6)


def test_a_bias_outside_the_heads_span_is_refused():
    head = torch.nn.Linear(8, 4)
    with torch.no_grad():
        head.weight[2:] = 0  # rank 2: a bias with parts in rows 2, 3 cannot be reached
        head.bias.fill_(1.0)
    with pytest.raises(ExportError, match="not in the span"):
        _folded_bias(head)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_run_config(root / "world", root / "cache", "train.steps=3", "model.mode=clip")
    default = train(cfg, root / "default", progress=False)
    cfg = tiny_run_config(
        root / "world", root / "cache", "train.steps=3", "model.mode=3t", *EXPORTABLE
    )
    return default, train(cfg, root / "exportable", progress=False)


def test_the_command_refuses_before_writing_anything(trained, tmp_path, capsys):
    default, _ = trained
    out = tmp_path / "out"
    assert main(["export", str(default), "--format", "open_clip", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "cannot be exported to OpenCLIP exactly" in error
    for key in ("model.image.pool gap", "model.text.pool mean", "model.text.causal false"):
        assert key in error
    assert not out.exists()


def test_the_folder_holds_f_g_their_heads_and_the_learned_scale(trained, tmp_path, capsys):
    from threetowers.model.trained import load_trained

    _, run_dir = trained
    out = tmp_path / "out"
    assert main(["export", str(run_dir), "--format", "open_clip", "--out", str(out)]) == 0
    assert "not held: the frozen towers ['efficientnet_lite0']" in capsys.readouterr().out
    config = json.loads((out / OPEN_CLIP_CONFIG).read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    assert (vision["pool_type"], vision["no_ln_pre"], vision["head_width"]) == ("tok", True, 32)
    assert (text["pool_type"], text["eos_id"], text["context_length"]) == ("eos", 2, 32)
    assert config["preprocess_cfg"]["size"] == 32 and config["preprocess_cfg"]["mean"] == [0.5] * 3
    weights = load_file(out / OPEN_CLIP_WEIGHTS)
    run = load_trained(run_dir)
    assert not any("efficientnet" in key or "frozen" in key for key in weights)
    assert weights["logit_scale"].item() == pytest.approx(
        run.model.loss_fn.scale("f_g").log().item()
    )
    torch.testing.assert_close(weights["text_projection.weight"], run.model.heads["g"].weight)
    torch.testing.assert_close(weights["visual.proj"], run.model.heads["f"].weight.T)
    blocks = {k.split(".")[3] for k in weights if k.startswith("visual.transformer.resblocks")}
    assert blocks == {"0", "1"}
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def test_an_out_folder_with_other_files_is_refused_and_an_export_is_written_over(
    trained, tmp_path, capsys
):
    _, run_dir = trained
    out = tmp_path / "clip-folder"
    out.mkdir()
    (out / "config.json").write_text("{}")  # e.g. a transformers CLIP folder
    (out / "tokenizer.json").write_text("theirs")
    argv = ["export", str(run_dir), "--format", "open_clip", "--out", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(
        f"--out={out} holds files an OpenCLIP export does not write (config.json); writing it "
        "there would mix two models' files. Give --out a new or empty folder"
    ), error
    assert (out / "tokenizer.json").read_text() == "theirs"  # nothing written over
    (out / "config.json").unlink()  # a folder of an export's files only, half written
    (out / ".open_clip_model.safetensors.tmp-123").write_bytes(b"partial")  # a killed one's
    assert main(argv) == 0
    assert json.loads((out / OPEN_CLIP_CONFIG).read_text())["model_cfg"]["embed_dim"] == 32
    assert (out / "tokenizer.json").read_text() != "theirs"
    assert main(argv) == 0  # and again, over itself
    file = tmp_path / "a-file"
    file.write_text("")
    assert main(["export", str(run_dir), "--format", "open_clip", "--out", str(file)]) == 2
    assert f"--out={file} is a file; give --out a new or empty folder" in capsys.readouterr().err
