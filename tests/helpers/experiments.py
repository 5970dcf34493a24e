"""Overrides for a --quick ``threetowers reproduce`` experiment on a tiny world."""

from __future__ import annotations

from tests.helpers.runs import TINY_WORLD


def tiny_experiment(tmp_path) -> list[str]:
    """Overrides for a --quick experiment in seconds: tiny towers on a tiny world."""
    return [
        "model.embed_dim=16",
        "model.image.image_size=32",
        "model.image.patch_size=16",
        "model.image.width=32",
        "model.image.depth=1",
        "model.image.heads=2",
        "model.text.vocab_size=300",
        "model.text.context_length=32",
        "model.text.width=32",
        "model.text.depth=1",
        "model.text.heads=2",
        f"data.world.dir={tmp_path / 'world'}",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.batch_size=32",
        "data.num_workers=0",
        "reproduce.quick_steps=2",
        "eval.fewshot_shots=1",
    ] + [f"data.world.{k}={v}" for k, v in TINY_WORLD.items()]
