"""Several sources joined, and shards drawn with replacement in proportion to their weights."""

from __future__ import annotations

import pytest

import threetowers as tt
from tests.helpers.shards import assert_same, check_consistent, run, write_shards
from threetowers.config import ConfigError
from threetowers.data.sources.loader import Resampled, num_batches
from threetowers.data.sources.mix import open_sources
from threetowers.data.sources.pairs import open_pairs
from threetowers.errors import UserError


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    small = write_shards(root / "small", [6, 6])  # keys k0000..k0011
    big = root / "big"
    write_shards(big, [10, 10, 10])  # keys k0000..k0029: the same keys, other shards
    return str(small), str(big)


def joined(two_sources, weights=(1.0, 3.0)):
    sources = [(n, path, w) for n, path, w in zip(("a", "b"), two_sources, weights, strict=True)]
    return open_sources(sources, open_pairs)


def test_sources_join_as_shards_and_each_sample_names_its_source(two_sources):
    pairs, mix = joined(two_sources)
    assert len(pairs.shards) == 5 and len(pairs) == 42
    batches = run(pairs, drop_last=False)  # no resampling: every sample once
    names = [mix.name_of(sample_id) for batch in batches for sample_id in batch["ids"]]
    assert names.count("a") == 12 and names.count("b") == 30
    check_consistent(batches)


@pytest.mark.parametrize("weights", [(1.0, 3.0), (1.0, 1.0)])
def test_resampled_sources_are_drawn_in_proportion_to_their_weights(two_sources, weights):
    pairs, mix = joined(two_sources, weights)
    resampled = mix.resampled(pairs)
    # each sample of a source alike: a shard's weight is its source's over its samples
    total = sum(weights)
    assert resampled.weights == pytest.approx(
        (weights[0] / 12, weights[0] / 12, weights[1] / 30, weights[1] / 30, weights[1] / 30)
    )
    names = []
    for epoch in range(40):
        for batch in run(pairs, epoch=epoch, num_workers=2, resampled=resampled):
            names += [mix.name_of(sample_id) for sample_id in batch["ids"]]
    share = names.count("b") / len(names)
    # the whole shards drawn make the share move in steps of 10 samples: within 5 points
    assert share == pytest.approx(weights[1] / total, abs=0.05), share


def test_a_resampled_epoch_resumes_exactly_and_is_one_pass_long(two_sources):
    pairs, mix = joined(two_sources)
    resampled = mix.resampled(pairs)
    options = dict(num_workers=2, shuffle_buffer=8, resampled=resampled)
    full = run(pairs, **options)
    assert_same(full, run(pairs, **options))
    for start in range(1, len(full) + 1):
        assert_same(run(pairs, start_batch=start, **options), full[start:])
    planned = num_batches(pairs, batch_size=4, seed=3, epoch=0, num_workers=2, resampled=resampled)
    assert len(full) == planned
    whole = run(pairs, drop_last=False, **options)
    samples = sum(len(batch["ids"]) + len(batch["skipped"]) for batch in whole)
    assert 42 <= samples < 42 + 2 * 10  # each worker's half of one pass, in whole shards
    assert run(pairs, epoch=1, **options)[0]["ids"] != full[0]["ids"]


def test_a_shard_is_drawn_only_from_resampling_not_repeated_across_sources(two_sources):
    with pytest.raises(ValueError, match="listed more than once"):
        open_sources([("a", two_sources[0], 1.0), ("b", two_sources[0], 1.0)], open_pairs)
    with pytest.raises(ValueError, match="one non-negative weight per shard"):
        pairs, _ = joined(two_sources)
        run(pairs, resampled=Resampled((1.0,)))


def test_the_config_forms_of_several_sources(tmp_path):
    cfg = tt.load_config(
        "tiny", ["data.train=a.tar::b.tar", "data.train_weights=1::3", "data.resampled=true"]
    )
    assert [(s.name, s.source, s.weight) for s in cfg.data.train_sources()] == [
        ("0", "a.tar", 1.0),
        ("1", "b.tar", 3.0),
    ]
    listed = tt.load_config(
        "tiny",
        ["data.train=[{source: a, weight: 2, name: cc3m}, {source: b}]", "data.resampled=true"],
    )
    assert [(s.name, s.weight) for s in listed.data.train_sources()] == [("cc3m", 2.0), ("1", 1.0)]
    with pytest.raises(ConfigError, match="set data.resampled=true"):
        tt.load_config("tiny", ["data.train=a.tar::b.tar", "data.train_weights=1::3"])
    with pytest.raises(ConfigError, match="2 positive numbers"):
        tt.load_config("tiny", ["data.train=a.tar::b.tar", "data.train_weights=1"])
    with pytest.raises(ConfigError, match="source names must differ"):
        tt.load_config("tiny", ["data.train=[{source: a, name: x}, {source: b, name: x}]"])


def test_a_table_among_several_sources_is_a_user_error(two_sources, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\na.png,one\n")
    with pytest.raises(UserError, match="several sources must each be .tar or .parquet shards"):
        open_sources([("a", two_sources[0], 1.0), ("b", str(table), 1.0)], open_pairs)
    with pytest.raises(UserError, match="listed more than once"):
        open_sources([("a", two_sources[0], 1.0), ("b", two_sources[0], 1.0)], open_pairs)
