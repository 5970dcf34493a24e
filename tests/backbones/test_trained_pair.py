"""A frozen pair trained here: a run's f + W_f and g + W_g (what its evaluation embeds, the
main term's scale), and the same pair read natively from its ``export --format open_clip``
folder, for both poolings the export writes. That OpenCLIP itself gives these embeddings is
tests/interop's check."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from tests.helpers.runs import tiny_run_config
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.backbones.trained_pair import (
    OPEN_CLIP_CONFIG,
    OPEN_CLIP_WEIGHTS,
    TrainedPairError,
    TrainedText,
    load_open_clip_pair,
    load_run_pair,
    pair_kind,
)
from threetowers.cli import main
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.data.transforms import eval_transform
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.model.trained import load_trained
from threetowers.trainer.loop import train

EXPORTABLE = ["model.text.causal=true", "model.text.pool=eot"]
POOLINGS = {  # the two ViT poolings the export writes (OpenCLIP's tok and avg)
    "cls": ["model.image.pool=cls"],
    "gap": ["model.image.pool=gap", "model.image.class_token=true"],
}
CAPTIONS = [
    "a red star",
    "Two big GREEN squares, near the tower!",
    "x",
    "a " + "very " * 40 + "long caption about a purple moon",  # beyond the 32-token context
    "three small circles left of a blue ring and a yellow cross",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny clip runs (two steps) of each exportable pooling, their exports, and a lit run."""
    root = tmp_path_factory.mktemp("trained_pair")
    made = {}
    for name, pooling in POOLINGS.items():
        cfg = tiny_run_config(
            root / "world",
            root / "cache",
            "train.steps=2",
            "model.mode=clip",
            *EXPORTABLE,
            *pooling,
        )
        run_dir = train(cfg, root / name, progress=False)
        export = root / f"{name}-open_clip"
        assert main(["export", str(run_dir), "--format", "open_clip", "--out", str(export)]) == 0
        made[name] = (run_dir, export)
    # lit's refusal reads its config: the frozen tower live at 32 px keeps its run short
    lit = tiny_run_config(
        root / "world",
        root / "cache",
        "train.steps=1",
        "model.mode=lit",
        "data.cache=false",
        "model.frozen.0.image_size=32",
    )
    made["lit"] = train(lit, root / "lit", progress=False)
    made["world"] = root / "world"
    return made


def _pixels(world, preprocessing) -> tuple[list, torch.Tensor]:
    """Six of the world's images and their view through ``preprocessing`` (eval's)."""
    paths = sorted((world / "retrieval").rglob("*.png"))[:6]
    assert len(paths) == 6
    view = eval_transform(preprocessing)
    return paths, torch.stack([view(Image.open(path)) for path in paths])


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_a_runs_pair_is_its_f_and_g_with_their_heads_as_evaluation_embeds_them(runs, pooling):
    run_dir, _ = runs[pooling]
    pair = load_run_pair(run_dir)
    run = load_trained(run_dir)
    model = run.model
    assert isinstance(pair.text, FrozenTextEncoder)
    assert pair.image.preprocessing == model.image_preprocessing
    assert pair.image.feature_dim == pair.text.feature_dim == model.embed_dim
    assert pair.scale == pytest.approx(model.loss_fn.scale("f_g").item(), rel=1e-7)
    assert pair.scale != pytest.approx(10.0)  # learned: two steps moved it off its start

    # Unnormalised: the towers and heads themselves, on ids of the run's own tokenizer file.
    tokenizer = CaptionTokenizer.load(run_dir / "tokenizer.json", run.cfg.model.text.context_length)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = model.heads["g"](model.text_tower(tokenizer.encode(CAPTIONS)))
        image = model.heads["f"](model.image_tower(pixels))
    torch.testing.assert_close(pair.text(CAPTIONS), text, rtol=0, atol=1e-5)
    torch.testing.assert_close(pair.image(pixels), image, rtol=0, atol=1e-5)
    # Normalised, they are evaluation's z_f of image files through the pair's own view, and
    # its z_g of the captions.
    z_g = embed_texts(model, run.tokenizer, CAPTIONS)["z_g"]
    torch.testing.assert_close(F.normalize(pair.text(CAPTIONS), dim=-1), z_g, rtol=0, atol=1e-5)
    paths, views = _pixels(runs["world"], pair.image.preprocessing)
    z_f = embed_images(model, paths)["z_f"]
    torch.testing.assert_close(F.normalize(pair.image(views), dim=-1), z_f, rtol=0, atol=1e-5)


def test_a_checkpoint_directory_names_its_own_weights(runs):
    run_dir, _ = runs["cls"]
    (checkpoint,) = sorted((run_dir / "checkpoints").glob("step_*"))
    assert pair_kind(checkpoint) == "run"
    assert load_run_pair(checkpoint).image.digest() == load_run_pair(run_dir).image.digest()


@pytest.mark.parametrize("pooling", sorted(POOLINGS))
def test_the_open_clip_folder_gives_the_runs_pair(runs, pooling):
    run_dir, export = runs[pooling]
    assert (pair_kind(run_dir), pair_kind(export)) == ("run", "open_clip")
    theirs, ours = load_open_clip_pair(export), load_run_pair(run_dir)
    assert isinstance(theirs.text, FrozenTextEncoder)
    assert theirs.image.preprocessing == ours.image.preprocessing
    assert theirs.scale == pytest.approx(ours.scale, rel=1e-6)
    _, pixels = _pixels(runs["world"], theirs.image.preprocessing)
    noise = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for images in (pixels, noise):
        torch.testing.assert_close(theirs.image(images), ours.image(images), rtol=0, atol=1e-5)
    torch.testing.assert_close(theirs.text(CAPTIONS), ours.text(CAPTIONS), rtol=0, atol=1e-5)
    # the folder's tokenizer gives the run's ids, the long caption cut with [EOS] kept
    ids = theirs.text.tokenize(CAPTIONS)["input_ids"]
    expected = load_trained(run_dir).tokenizer.encode(CAPTIONS)
    assert ids.shape[1] == 32 and ids[3, -1] == CaptionTokenizer.eos_id
    assert torch.equal(ids, expected[:, : ids.shape[1]])


def test_each_sides_digest_follows_its_weights(runs, tmp_path):
    run_dir, export = runs["cls"]
    first, again = load_open_clip_pair(export), load_open_clip_pair(export)
    assert first.image.digest() == again.image.digest()
    assert first.text.digest() == again.text.digest()
    assert first.image.digest() != first.text.digest()
    assert load_run_pair(run_dir).text.digest() == load_run_pair(run_dir).text.digest()

    changed = tmp_path / "changed"
    shutil.copytree(export, changed)
    weights = load_file(changed / OPEN_CLIP_WEIGHTS)
    weights["visual.ln_post.weight"] = weights["visual.ln_post.weight"] * 1.01
    weights["ln_final.weight"] = weights["ln_final.weight"] * 1.01
    save_file(weights, changed / OPEN_CLIP_WEIGHTS)
    other = load_open_clip_pair(changed)
    assert other.image.digest() != first.image.digest()
    assert other.text.digest() != first.text.digest()
    # g's attention is no weight: a bidirectional twin of the same weights is named apart
    twin = load_open_clip_pair(export).text
    twin.model.tower.causal = False
    assert twin.digest() != first.text.digest()
    assert isinstance(twin, TrainedText)


def test_a_lit_run_and_a_folder_of_neither_kind_are_refused(runs, tmp_path):
    lit = runs["lit"]
    assert pair_kind(lit) == "run"
    with pytest.raises(TrainedPairError) as refused:
        load_run_pair(lit)
    message = str(refused.value)
    assert f"{lit} is a lit run (model.mode lit in {lit / 'config.yaml'})" in message
    assert "name a clip or 3t run" in message
    apart = tmp_path / "apart"  # a run whose main term had no weight (its config edited)
    shutil.copytree(runs["cls"][0], apart)
    config = yaml.safe_load((apart / "config.yaml").read_text())
    config["loss"]["weights"]["f_g"] = 0.0
    (apart / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(TrainedPairError, match=r"trained f and g apart \(loss.weights.f_g 0 in"):
        load_run_pair(apart)
    (tmp_path / "notes.txt").write_text("not a model")
    assert pair_kind(tmp_path) is None
    with pytest.raises(TrainedPairError, match="is not a run directory .* nor a checkpoint"):
        load_run_pair(tmp_path)
    with pytest.raises(TrainedPairError, match=f"has no {OPEN_CLIP_CONFIG}; give a folder"):
        load_open_clip_pair(tmp_path)


def test_an_open_clip_folder_the_export_did_not_write_is_refused_with_every_reason(runs, tmp_path):
    _, export = runs["cls"]
    folder = tmp_path / "edited"
    shutil.copytree(export, folder)
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    config["model_cfg"]["vision_cfg"]["no_ln_pre"] = False
    config["model_cfg"]["text_cfg"]["pool_type"] = "argmax"
    config["model_cfg"]["text_cfg"]["ls_init_value"] = 0.1
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config))
    with pytest.raises(TrainedPairError) as refused:
        load_open_clip_pair(folder)
    message = str(refused.value)
    assert "is not what `threetowers export --format open_clip` writes" in message
    assert "text_cfg sets ls_init_value, which the export never writes" in message
    assert "transformers CLIP folder" in message

    del config["model_cfg"]["text_cfg"]["ls_init_value"]
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(config))
    with pytest.raises(TrainedPairError) as refused:
        load_open_clip_pair(folder)
    message = str(refused.value)
    assert "vision_cfg.no_ln_pre is False; the export writes True" in message
    assert "text_cfg.pool_type is 'argmax'; the export writes 'eos'" in message

    shutil.copy(export / OPEN_CLIP_CONFIG, folder / OPEN_CLIP_CONFIG)
    weights = load_file(folder / OPEN_CLIP_WEIGHTS)
    weights["visual.ln_pre.weight"] = weights.pop("visual.ln_post.weight")
    save_file(weights, folder / OPEN_CLIP_WEIGHTS)
    with pytest.raises(TrainedPairError, match=r"missing \['visual.ln_post.weight'\], unexpected"):
        load_open_clip_pair(folder)
