"""The embedded world as a run's default data: made on first use, then read from its manifest.

The library's data layer knows nothing of the world; whoever starts a run (the trainer, the
`cache` command, the experiments) hands it the manifest when the config trains on the world.
"""

from __future__ import annotations

from threetowers.config import Config, WorldConfig
from threetowers.files.readback import read_json
from threetowers.project.world.generate import benchmark_files, write_world
from threetowers.project.world.spec import WorldSpec


def ensure_world(world: WorldConfig) -> dict:
    """Generate the embedded world on first use; return its manifest (with its root and its
    own benchmark sets, which evaluation uses where eval.retrieval and eval.zeroshot are unset)."""
    manifest_path = write_world(world.dir, WorldSpec(**world.model_dump(exclude={"dir"})))
    root = manifest_path.parent
    return read_json(manifest_path) | {"root": str(root), "benchmarks": benchmark_files(root)}


def default_world(cfg: Config) -> dict | None:
    """The world's manifest when ``cfg`` trains on it (``data.train`` unset), else None."""
    return ensure_world(cfg.data.world) if cfg.data.train is None else None
