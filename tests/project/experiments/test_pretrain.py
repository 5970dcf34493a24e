"""Pretraining on images decoded once gives the classifier of decoding them every epoch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors import safe_open

from tests.helpers.images import noise
from threetowers.config import load_experiment_config
from threetowers.project.experiments.pretrain import pretrain

CLASSES, PER_CLASS = 3, 12


def labelled_folders(root):
    """train/ and val/ class folders of noise images of several sizes, one corrupt in each."""
    for split in ("train", "val"):
        for label in range(CLASSES):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True)
            for index in range(PER_CLASS):
                seed = 1000 * (split == "val") + 100 * label + index
                image = noise(20 + index % 5 * 3, 18 + label * 4, seed)
                image.save(folder / f"{index:03d}.png")
    (root / "train" / "class_1" / "004.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    (root / "val" / "class_2" / "007.png").write_bytes(b"")
    return root


def classifier(path):
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        return tensors, handle.metadata(), json.loads(path.with_suffix(".json").read_text())


def test_pretraining_from_decoded_images_gives_the_same_classifier(tmp_path):
    data = labelled_folders(tmp_path / "labels")

    def run(name: str, *overrides: str):
        settings = [
            f"pretrain.data={data}",
            f"pretrain.out={tmp_path / name}.safetensors",
            f"data.cache_dir={tmp_path / 'cache'}",
            "pretrain.cnn_widths=[8,16]",
            "pretrain.image_size=16",
            "pretrain.steps=6",  # three epochs of two batches
            "pretrain.batch_size=16",
            "pretrain.warmup_steps=1",
            "data.max_bad_fraction=0.1",
        ]
        cfg = load_experiment_config("tiny", settings + list(overrides))
        return classifier(pretrain(cfg, False))

    live = run("live", "data.preload=false", "pretrain.num_workers=0")
    assert live[2]["skipped_images"]["val"] == 1 and live[2]["skipped_images"]["train"] > 0
    assert not (tmp_path / "cache").exists()
    for name, workers in (("built", 1), ("cached", 0)):  # decoded once, then read back
        tensors, metadata, report = run(
            name, "data.preload=true", f"pretrain.num_workers={workers}"
        )
        assert tensors.keys() == live[0].keys()
        assert all(torch.equal(tensors[key], live[0][key]) for key in tensors)
        assert metadata == live[1] and report == live[2]
    assert len(list((tmp_path / "cache").glob("images-*.u8"))) == 2  # train and val


# The gradient of pretraining's backbone against float64, in a subprocess because a wrong
# memory layout can kill the process (one thread) as well as corrupt the gradient (two).
NARROW_GRADIENT = """
import sys, torch
from threetowers.config import PretrainConfig
from threetowers.project.experiments.pretrain import untrained_backbone
torch.set_num_threads(int(sys.argv[1]))
torch.manual_seed(0)
backbone, _ = untrained_backbone(PretrainConfig(cnn_widths=[4, 8]))
reference = untrained_backbone(PretrainConfig(cnn_widths=[4, 8]))[0].double()
reference.load_state_dict(backbone.state_dict())
images = torch.randn(16, 3, 32, 32)
backbone(images).square().sum().backward()
reference(images.double()).square().sum().backward()
errors = [
    float((p.grad.double() - q.grad).abs().max() / q.grad.abs().max())
    for p, q in zip(backbone.parameters(), reference.parameters())
]
print(max(errors))
"""


def test_narrow_cnn_trains_with_exact_gradients():
    for threads in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", NARROW_GRADIENT, threads],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert float(done.stdout.split()[-1]) < 1e-4, done.stdout
