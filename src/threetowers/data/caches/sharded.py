"""A dataset's frozen-tower caches built by every rank of a torchrun job at once: unit i on
rank i mod world size, each unit computed once, by one rank.

A cache folder has one writer at a time (``features.py``: another process waits for its
lock). In a job that writer is the job: rank 0 takes the folders' locks (another job waits for
it, as it would for one process), the ranks meet, each computes the missing units of its share
(image and text towers alike) without locking, and they meet again when every share is done;
rank 0 then lets the folders go. Both meetings are :func:`threetowers.distributed.meet`, whose
timeout is days, not a training collective's: the first costs nothing when rank 0 finds the
folders free, the second waits for the slowest share.

A unit's files are the same whichever rank computes them (a unit is computed alone, in the
same batches), so every rank then opens the whole cache as one process does: each unit
checked against its checksum, the fingerprints made from the units' names. Where
``data.cache_dir`` is not one folder for every rank (a disk per machine), that check finds the
other machines' units missing and computes them here too, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from threetowers import distributed
from threetowers.backbones.frozen import FrozenBackbone
from threetowers.backbones.text_encoder import FrozenTextEncoder
from threetowers.data.caches.captions import CaptionFeatures, build_caption_caches
from threetowers.data.caches.features import build_caches
from threetowers.data.caches.layout import CacheSpec, unit_files
from threetowers.data.caches.streamed_features import StreamedFeatures
from threetowers.data.caches.units import Unit
from threetowers.files import locks

log = logging.getLogger(__name__)


def build_dataset_caches(
    images: Mapping[str, FrozenBackbone],
    texts: Mapping[str, FrozenTextEncoder],
    units: Sequence[Unit],
    spec: CacheSpec,
    batch_size: int,
    num_workers: int = 0,
    progress: bool = True,
    max_bad_fraction: float = 1.0,
) -> tuple[dict[str, StreamedFeatures], dict[str, CaptionFeatures]]:
    """The image towers' and text towers' caches of ``units``; under torchrun every rank
    calls this and computes its share."""
    options = {"batch_size": batch_size, "progress": progress}
    image_options = options | {"num_workers": num_workers, "max_bad_fraction": max_bad_fraction}
    world = distributed.world_size()
    if world > 1:
        share = units[distributed.rank() :: world]
        folders = sorted({spec.folder(tower)[0] for tower in [*images.values(), *texts.values()]})
        with contextlib.ExitStack() as held:
            if distributed.is_main():  # in sorted order, as build_caches: no deadlock
                for folder in folders:
                    held.enter_context(locks.waiting(folder, "feature cache"))
            distributed.meet()  # the folders are this job's
            build_caches(images, share, spec, lock=False, **image_options)
            build_caption_caches(texts, share, spec, lock=False, **options)
            distributed.meet()  # every share is built
        _say_if_not_shared(folders, units)
    caches = build_caches(images, units, spec, **image_options)
    return caches, build_caption_caches(texts, units, spec, **options)


def _say_if_not_shared(folders: Sequence[Path], units: Sequence[Unit]) -> None:
    """A warning where units the other ranks built are absent here: their folder is another."""
    for folder in folders:
        absent = sum(not unit_files(folder, unit)[1].exists() for unit in units)
        if absent:
            log.warning(
                "%s: %d of its %d units, built by the other ranks, are absent here, so "
                "data.cache_dir is not one folder for every rank (a disk per machine?); "
                "computing them here too. Put data.cache_dir on a filesystem every machine "
                "shares to compute each unit once.",
                folder,
                absent,
                len(units),
            )
