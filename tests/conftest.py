"""Shared test helpers: tiny configs and a tiny frozen backbone with BatchNorm."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

import threetowers as tt
from threetowers.model.objective import structure


class TinyCNN(nn.Module):
    """A small conv net with BatchNorm and dropout, so freezing has something to get wrong."""

    feature_dim = 24

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 12, 3, stride=2, padding=1),
            nn.BatchNorm2d(12),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Conv2d(12, self.feature_dim, 3, stride=2, padding=1),
            nn.BatchNorm2d(self.feature_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        for module in self.net:
            if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def tiny_backbone(image_size: int = 24) -> tt.FrozenBackbone:
    torch.manual_seed(123)
    return tt.FrozenBackbone(TinyCNN(), tt.Preprocessing(image_size), name="tiny_cnn")


def tiny_config(mode: str = "3t", *overrides: str) -> tt.Config:
    return tt.load_config("tiny", [f"model.mode={mode}", "model.embed_dim=16", *overrides])


def tiny_model(mode: str = "3t", *overrides: str, seed: int = 0) -> tt.ThreeTowers:
    torch.manual_seed(seed)
    cfg = tiny_config(mode, *overrides)
    return tt.build_model(cfg, frozen=None if mode == "clip" else tiny_backbone())


def terms_of(mode: str):
    """The loss terms of ``mode`` with one frozen tower named h."""
    return structure(mode, () if mode == "clip" else ("h",)).terms


def tiny_batch(batch: int = 8, seed: int = 1, image_size: int = 32, context: int = 16):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    lengths = torch.randint(2, context + 1, (batch,), generator=generator)
    tokens = torch.randint(1, 512, (batch, context), generator=generator)
    tokens[torch.arange(context)[None, :] >= lengths[:, None]] = 0
    return images, tokens


@pytest.fixture
def backbone() -> tt.FrozenBackbone:
    return tiny_backbone()


@pytest.fixture(scope="session")
def tiny_text_encoder(tmp_path_factory):
    """A one-layer BERT with MiniLM's tokenizer, saved and loaded as a frozen text tower."""
    from threetowers.backbones.text_encoder import load_text_encoder

    pytest.importorskip("transformers")
    return load_text_encoder(save_tiny_bert(tmp_path_factory.mktemp("tiny_bert")))


def save_tiny_bert(folder: Path) -> Path:
    """A one-layer BERT with MiniLM's tokenizer, saved in ``folder`` (which it returns)."""
    import transformers

    from threetowers.backbones.text_encoder import minilm_path

    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(5)
    transformers.BertModel(config).save_pretrained(folder)
    shutil.copy(minilm_path() / "tokenizer.json", folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    """A folder for a tiny world, one per test module (the first run there writes it)."""
    return tmp_path_factory.mktemp("world")


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk(kib)``: a folder on a tmpfs of that size, a real full disk (ENOSPC, and
    SIGBUS for a mapped file written past it); ``small_disk.grow(folder, kib)`` frees space.
    Mounting needs root (CI runs as root); elsewhere the test is skipped, saying why."""
    mounted: list[Path] = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = _mount(["-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)])
        if done.returncode:
            pytest.skip(f"a small disk needs `mount -t tmpfs` (root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    def grow(folder: Path, kib: int) -> None:
        assert _mount(["-o", f"remount,size={kib}k", str(folder)]).returncode == 0

    mount.grow = grow
    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _mount(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
