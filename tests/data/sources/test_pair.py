"""data/sources/pair.py: a Pair's id (its key unless given) and caption, and the random
numbers of a (seed, epoch): one visit's rng depends on the seed, the epoch and the sample's
key alone, is the same in every process, and the streams of different uses are distinct."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import threetowers
from threetowers.data.sources import pair as pair_module
from threetowers.data.sources.pair import Pair, check_seed, sample_rng
from threetowers.errors import UserError


def draws(seed: int, epoch: int, key: str) -> list[float]:
    return sample_rng(seed, epoch, key).random(4).tolist()


def test_an_id_defaults_to_the_key_and_the_caption_is_the_first():
    image = Image.new("RGB", (2, 2))
    table_row = Pair("k7", image, ["one", "two"])
    assert table_row.id == "k7" and table_row.caption == "one" and table_row.row == -1
    member = Pair("k7", image, ["only"], id="shard-3.tar/k7", row=12)
    assert member.id == "shard-3.tar/k7" and member.key == "k7" and member.row == 12


def test_a_visit_is_reproducible_and_each_of_seed_epoch_key_changes_it():
    first = draws(0, 0, "sample-1")
    assert draws(0, 0, "sample-1") == first
    others = [draws(1, 0, "sample-1"), draws(0, 1, "sample-1"), draws(0, 0, "sample-2")]
    assert all(other != first for other in others)
    assert len({tuple(d) for d in others}) == 3


def test_keys_that_differ_in_a_non_ascii_character_get_their_own_streams():
    assert draws(0, 0, "café") != draws(0, 0, "cafe")
    assert draws(0, 0, "画像/1") != draws(0, 0, "画像/2")


def test_the_visit_rng_is_the_same_in_another_process_whatever_its_hash_seed():
    """Workers and resumed runs draw the same numbers: nothing depends on Python's hash()."""
    # the package's own module, without the package's __init__ (which loads torch)
    code = (
        "import sys, types; package = types.ModuleType('threetowers');"
        f"package.__path__ = [{str(Path(threetowers.__file__).parent)!r}];"
        "sys.modules['threetowers'] = package;"
        "from threetowers.data.sources.pair import sample_rng;"
        "print(sample_rng(3, 2, 'shard/k-é').random(4).tolist())"
    )
    for hash_seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": hash_seed, "PATH": ""},
            check=True,
            timeout=120,
        )
        assert done.stdout.strip() == str(draws(3, 2, "shard/k-é"))


def test_the_streams_of_each_use_are_distinct():
    streams = [
        pair_module.ORDER_STREAM,
        pair_module.SHARD_STREAM,
        pair_module.BUFFER_STREAM,
        pair_module.SAMPLE_STREAM,
        pair_module.RESAMPLE_STREAM,
    ]
    assert len(set(streams)) == len(streams)
    # the sample order of (seed, epoch) shares no numbers with a sample's visit
    order = np.random.default_rng([0, 0, pair_module.ORDER_STREAM]).random(4).tolist()
    assert order != draws(0, 0, "")


@pytest.mark.parametrize("seed,epoch", [(-1, 0), (0, -1)])
def test_negative_seeds_and_epochs_are_refused(seed, epoch):
    with pytest.raises(UserError, match=f"got seed={seed} epoch={epoch}"):
        check_seed(seed, epoch)
    check_seed(0, 0)
