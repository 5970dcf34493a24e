"""A tiny world spec, small enough to write in a test."""

from __future__ import annotations

from threetowers.project.world.spec import WorldSpec

TINY = WorldSpec(
    train_pairs=40,
    val_pairs=8,
    retrieval_test=6,
    retrieval_val=4,
    zeroshot_per_class=2,
    zeroshot_val_per_class=1,
    pretrain_objects_per_class=2,
    pretrain_scenes_per_class=2,
    pretrain_val_fraction=0.5,
    shard_size=16,
)
