"""model/trained.py: what a training run produced, loaded back. A run directory gives its
latest checkpoint, a checkpoint directory that one; the model is the checkpoint's weights in
eval mode with the run's tokenizer (another tokenizer is refused); the fingerprint names the
exact weights; what is not a run says so."""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import threetowers as tt
from threetowers.data.tokenizer import CaptionTokenizer
from threetowers.errors import UserError
from threetowers.model.trained import find_checkpoint, load_trained
from threetowers.trainer.loop import train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two steps of a tiny CLIP on a table of 16 images, a checkpoint after each."""
    root = tmp_path_factory.mktemp("trained")
    (root / "img").mkdir()
    lines = ["image,caption"]
    for i in range(16):
        Image.new("RGB", (32, 32), (i * 10, 50, 100)).save(root / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,picture {i} of a square")
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    overrides = [
        "model.mode=clip",
        "model.frozen=null",
        "model.text.vocab_size=100",
        f"data.train={root / 'pairs.csv'}",
        f"data.cache_dir={root / 'cache'}",
        "data.batch_size=8",
        "data.num_workers=0",
        "train.steps=2",
        "train.warmup_steps=1",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=2",
    ]
    return train(tt.load_config("tiny", overrides), root / "run", progress=False)


def steps(run) -> list:
    return sorted((run / "checkpoints").glob("step_*"))


def test_a_run_directory_loads_its_latest_checkpoint_in_eval_mode(run):
    trained = load_trained(run)
    assert trained.run_dir == run and trained.step == 2
    assert not trained.model.training
    saved = load_file(str(steps(run)[-1] / "model.safetensors"))
    state = trained.model.state_dict()
    assert saved and all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    tokenizer = CaptionTokenizer.load(run / "tokenizer.json", trained.cfg.model.text.context_length)
    assert trained.tokenizer.digest() == tokenizer.digest()


def test_a_checkpoint_directory_loads_that_checkpoint_of_its_run(run):
    first, last = steps(run)
    assert find_checkpoint(first)[0] == run and find_checkpoint(first)[1].step == 1
    earlier = load_trained(first)
    assert earlier.run_dir == run and earlier.step == 1
    assert load_trained(last).fingerprint == load_trained(run).fingerprint
    assert earlier.fingerprint != load_trained(run).fingerprint  # other weights


def test_the_fingerprint_follows_the_weights_not_the_folder(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "elsewhere")
    assert load_trained(copy).fingerprint == load_trained(run).fingerprint
    assert len(load_trained(run).fingerprint) == 16


def test_another_tokenizer_is_refused(run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "copy")
    other = CaptionTokenizer.train(["an entirely different vocabulary"] * 3, 60, 16)
    other.save(copy / "tokenizer.json")
    with pytest.raises(UserError, match="is not the tokenizer that checkpoint step 2"):
        load_trained(copy)


def test_what_is_not_a_trained_run_says_so(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a checkpoint"):
        find_checkpoint(tmp_path)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    shutil.copy(run / "config.yaml", fresh / "config.yaml")
    with pytest.raises(FileNotFoundError, match="has no readable checkpoint yet; train it first"):
        find_checkpoint(fresh)
