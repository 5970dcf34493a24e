"""Bad data is skipped, counted and named, never fatal alone; odd-but-valid images are used."""

from __future__ import annotations

import json
import logging
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.bad_data import (
    BAD,
    JPEG,
    ODD_BUT_VALID,
    batches,
    encoded,
    rgb,
    small_shard,
    write_mixed_shards,
)
from tests.helpers.shards import key_of
from threetowers.backbones.frozen import Preprocessing
from threetowers.data.caches.preload import preload_pairs
from threetowers.data.pipeline import TrainingExample
from threetowers.data.sources.bad_samples import (
    REASONS,
    BadDataError,
    BadSample,
    BadSampleLog,
    Skipped,
)
from threetowers.data.sources.pairs import iter_captions, iter_pairs, open_pairs
from threetowers.data.sources.shards import count_shard_samples, decode_sample
from threetowers.data.sources.tar_samples import count_samples, read_samples
from threetowers.data.transforms import PixelEvalTransform, PixelTrainTransform

EXPECTED_BAD = {f"{name}0": reason for name, (_, _, reason) in BAD.items()} | {
    "no_image0": "no_image",
    "no_caption0": "no_caption",
}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_shards(tmp_path_factory.mktemp("bad") / "mixed")


def test_bad_samples_are_skipped_with_reasons_and_odd_images_used(mixed):
    out = batches(mixed)
    skipped = {key_of(bad.id): bad.reason for batch in out for bad in batch["skipped"]}
    assert skipped == EXPECTED_BAD
    used = {
        key_of(sample_id): (tuple(size.tolist()), mode)
        for batch in out
        for sample_id, size, mode in zip(batch["ids"], batch["size"], batch["mode"], strict=True)
    }
    assert set(used) == {f"{n}0" for n in ODD_BUT_VALID} | {f"good0_{i}" for i in range(6)}
    assert {mode for _, mode in used.values()} == {"RGB"}
    assert used["exif_rotated0"][0] == (9, 12)  # turned upright, not skipped
    bomb = next(b for batch in out for b in batch["skipped"] if key_of(b.id) == "bomb0")
    assert bomb.id == f"{mixed / 'mixed-0.tar'}/bomb0"  # named by its shard and its key
    assert "mixed-0.tar" in bomb.detail and "bomb0" in bomb.detail  # says where it is


@pytest.mark.parametrize("workers", [0, 2])
def test_skipped_samples_are_exact_with_workers_and_on_resume(mixed, workers):
    full = batches(mixed, num_workers=workers, shuffle_buffer=5)
    counted = sum(len(batch["skipped"]) for batch in full)
    assert counted == len(EXPECTED_BAD)
    for start in (1, 3):
        resumed = batches(mixed, num_workers=workers, shuffle_buffer=5, start_batch=start)
        assert [b["skipped"] for b in resumed] == [b["skipped"] for b in full[start:]]
        assert [b["ids"] for b in resumed] == [b["ids"] for b in full[start:]]


def test_pairs_and_captions_iterate_past_bad_samples(mixed):
    items = list(iter_pairs(mixed))
    assert {key_of(s.id): s.reason for s in items if isinstance(s, Skipped)} == EXPECTED_BAD
    captions = list(iter_captions(mixed))
    assert "fine 3" in captions and "" not in captions and not any("caf" in c for c in captions)


def test_truncated_shards_stream_exactly_what_their_headers_count(tmp_path):
    folder = write_mixed_shards(tmp_path / "whole")
    data = (folder / "mixed-0.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    reasons = set()
    for end in range(0, len(data), 997):  # cut points inside headers, data and padding
        cut.write_bytes(data[:end])
        samples = list(read_samples(cut))
        assert len(samples) == count_samples(cut)
        reasons |= {s["__bad__"][0] for s in samples if "__bad__" in s}
    assert reasons == {"truncated_shard"}
    cut.write_bytes(b"")  # unreadable from the start: one bad sample named after the shard
    (only,) = read_samples(cut)
    assert only["__key__"] == "cut.tar" and only["__bad__"][0] == "truncated_shard"
    assert count_shard_samples(cut) == 1


def test_a_shard_cut_anywhere_is_reported_once_and_the_whole_one_never(tmp_path):
    data, whole = small_shard(tmp_path / "whole.tar")
    assert len(data) > whole  # tar pads the archive: cuts in the padding keep it whole
    cut = tmp_path / "cut.tar"
    for end in range(0, len(data) + 1, 512):
        cut.write_bytes(data[:end])
        samples = list(read_samples(cut))
        assert len(samples) == count_samples(cut)  # the batch plan stays exact
        truncated = [s for s in samples if s.get("__bad__", ("",))[0] == "truncated_shard"]
        assert len(truncated) == (end < whole), end
        if truncated:
            assert str(cut) in truncated[0]["__bad__"][1] and truncated[0] is samples[-1]
    # counted and named by each pass that reads shards, with the plan's batches
    cut.write_bytes(data[: whole - 1024])  # cut exactly after the last sample: no data lost
    log = BadSampleLog(1.0, "training")
    for batch in batches([cut], batch_size=3):
        log.record(len(batch["ids"]), batch["skipped"])
    assert log.counts == {"truncated_shard": 1} and log.examples[0].id == f"{cut}/s3"
    assert log.seen == count_samples(cut) == 4


def test_a_key_that_comes_back_later_in_a_shard_is_malformed(tmp_path):
    shard = tmp_path / "split.tar"
    with wds.TarWriter(str(shard)) as sink:
        for key, caption in (("a", b"first a"), ("b", b"a b"), ("a", b"second a")):
            sink.write({"__key__": key, "png": encoded(rgb()), "txt": caption})
    out = batches(shard, batch_size=3)
    assert [key_of(i) for batch in out for i in batch["ids"]] == ["a", "b"]
    (bad,) = [bad for batch in out for bad in batch["skipped"]]
    assert bad.reason == "malformed_row" and "comes back" in bad.detail
    assert [batch["text"] for batch in out] == [["first a", "a b"]]


def test_a_truncated_shard_in_training_data_is_not_fatal(tmp_path):
    folder = write_mixed_shards(tmp_path / "data")
    shard = folder / "mixed-1.tar"
    with tarfile.open(shard) as archive:
        inside = archive.getmembers()[6].offset_data + 5  # in the data of the 4th sample
    shard.write_bytes(shard.read_bytes()[:inside])
    out = batches(folder, num_workers=2, shuffle_buffer=3)
    reasons = [bad.reason for batch in out for bad in batch["skipped"]]
    assert "truncated_shard" in reasons and len(reasons) == sum(open_pairs(folder).sizes) - sum(
        len(batch["ids"]) for batch in out
    )


def write_table(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def image_dir(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(encoded(rgb(i)))
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG broken")
    return tmp_path


def test_malformed_csv_rows_are_bad_rows(image_dir):
    outside = image_dir.parent / "outside.png"
    outside.write_bytes(encoded(rgb()))
    table = write_table(
        image_dir / "pairs.csv",
        [
            b"image,caption,key",
            b"img/0.png,fine,a",
            b"img/1.png,too,many,fields",
            b"img/2.png",
            b",no image,c",
            b"img/0.png,same key,a",
            b"img/1.png,caf\xe9,e",
            b"img/bad.png,corrupt,f",
            b"img/missing.png,missing,g",
            b"../outside.png,climbs out,h",
            str(outside).encode() + b",absolute,i",
            b"img/2.png,   ,j",
            b"img/2.png,fine again,k",
        ],
    )
    out = batches(table, batch_size=20)
    reasons = {bad.id: bad.reason for batch in out for bad in batch["skipped"]}
    assert reasons == {
        "many": "malformed_row",  # the key column holds "many"
        "000000002": "malformed_row",
        "c": "malformed_row",
        "a": "malformed_row",  # the duplicate; the first "a" is used
        "e": "caption_not_utf8",
        "f": "undecodable_image",
        "g": "missing_file",
        "h": "path_outside_root",
        "i": "path_outside_root",
        "j": "empty_caption",
    }
    assert sorted(key for batch in out for key in batch["ids"]) == ["a", "k"]
    allowed = open_pairs(table, allow_absolute_paths=True)
    assert allowed[8].key == "h" and allowed[9].key == "i"  # now used


def test_malformed_jsonl_rows_are_bad_rows(image_dir):
    table = write_table(
        image_dir / "pairs.jsonl",
        [
            json.dumps({"image": "img/0.png", "caption": "fine", "key": "a"}).encode(),
            b'{"image": "img/1.png", "caption": ',
            b"[1, 2, 3]",
            json.dumps({"image": "img/1.png", "captions": 7, "key": "d"}).encode(),
            json.dumps({"image": "img/1.png", "captions": [], "key": "e"}).encode(),
            json.dumps({"image": "img/1.png", "captions": ["", "kept"], "key": "f"}).encode(),
            b'{"image": "img/2.png", "caption": "caf\xe9", "key": "g"}',
            json.dumps({"image": "/etc/hostname", "caption": "absolute", "key": "h"}).encode(),
        ],
    )
    items = list(iter_pairs(table))
    reasons = {s.id: s.reason for s in items if isinstance(s, Skipped)}
    assert reasons == {
        "000000001": "malformed_row",
        "000000002": "malformed_row",
        "d": "malformed_row",
        "e": "no_caption",
        "g": "caption_not_utf8",
        "h": "path_outside_root",
    }
    used = {p.key: p.captions for p in items if not isinstance(p, Skipped)}
    assert used == {"a": ["fine"], "f": ["kept"]}


def test_the_log_counts_names_the_first_few_and_stops_above_the_fraction(caplog):
    log = BadSampleLog(max_fraction=0.1, what="training data", size=100)
    bad = [
        Skipped(f"k{i}", "undecodable_image", f"sample k{i} of s.tar: broken") for i in range(12)
    ]
    with caplog.at_level(logging.WARNING, logger="threetowers.data.sources.bad_samples"):
        log.record(50, bad[:2])
        log.record(40, bad[2:5])
    assert log.metrics() == {
        "data/bad_samples": 5,
        "data/samples": 95,
        "data/bad_samples/undecodable_image": 5,
    }
    assert "skipped sample 'k0' (undecodable_image)" in caplog.text
    copy = BadSampleLog(max_fraction=0.1, what="training data", size=100)
    copy.load_state_dict(log.state_dict())
    assert copy.metrics() == log.metrics() and copy.examples == log.examples
    log.record(3, [])  # 98 seen, 5 bad: still judged after the whole pass
    with pytest.raises(BadDataError) as error:
        log.record(0, bad[5:12])
    message = str(error.value)
    assert "12 of 105 samples were bad" in message and "data.max_bad_fraction=0.1" in message
    assert "'k0': undecodable_image: sample k0 of s.tar" in message


def test_early_batches_do_not_stop_a_run_before_the_grace():
    log = BadSampleLog(max_fraction=0.01, what="training data")
    log.record(30, [Skipped("k", "no_caption", "x")] * 2)  # 6% of the first 32
    paths = BadSampleLog(max_fraction=0.01, what="table")
    with pytest.raises(BadDataError, match="data.allow_absolute_paths=true"):
        for _ in range(100):
            paths.record(0, [Skipped("k", "path_outside_root", "x")] * 32)


# --------------------------------------------------------------------------- random inputs

VALID_IMAGES = [
    encoded(rgb(), "PNG"),
    JPEG,
    encoded(rgb(), "GIF"),
    encoded(rgb(), "BMP"),
    encoded(rgb(), "WEBP"),
    encoded(rgb(), "TIFF"),
    *ODD_BUT_VALID.values(),
]
VIEW = Preprocessing(8, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_fraction=1.0)
EXAMPLE = TrainingExample(PixelEvalTransform(VIEW), PixelTrainTransform(VIEW), None)


@st.composite
def damaged(draw, originals=VALID_IMAGES, max_flips=8):
    """A valid file cut short, with bytes overwritten, or random bytes altogether."""
    if draw(st.booleans()) and draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(originals)))
    data = data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data
    for _ in range(draw(st.integers(0, max_flips)) if data else 0):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@settings(deadline=None, max_examples=150)
@given(image=damaged(), caption=st.one_of(st.binary(max_size=40), st.text(max_size=40)))
def test_random_corrupt_images_and_captions_are_used_or_skipped(image, caption):
    caption = caption.encode("utf-8", "surrogatepass") if isinstance(caption, str) else caption
    sample = {"__key__": "fuzz", "__url__": "fuzz.tar", "png": image, "txt": caption}
    try:
        pair = decode_sample(sample)
    except BadSample as bad:
        assert bad.reason in REASONS and "fuzz" in bad.detail
        return
    assert pair.image.mode == "RGB" and pair.caption.strip()
    out = EXAMPLE(pair, np.random.default_rng(0))  # a used sample must also transform
    assert out["images"].shape == (3, 8, 8) and out["images"].dtype == torch.uint8


@settings(deadline=None, max_examples=60)
@given(data=st.data())
def test_random_damage_to_a_shard_streams_what_its_headers_count(tmp_path_factory, data):
    folder = tmp_path_factory.getbasetemp() / "fuzz_shard"
    if not folder.exists():
        write_mixed_shards(folder)
    shard = (folder / "mixed-0.tar").read_bytes()
    damaged_shard = data.draw(damaged(originals=[shard], max_flips=30))
    path = folder / "damaged.tar"
    path.write_bytes(damaged_shard)
    samples = list(read_samples(path))
    assert len(samples) == count_samples(path)
    for sample in samples:
        try:
            decode_sample(sample)
        except BadSample:
            pass


def test_preloaded_pairs_keep_bad_rows_as_bad(mixed, tmp_path):
    view = PixelEvalTransform(VIEW)
    table = preload_pairs(mixed, view, tmp_path, progress=False)
    reasons = {}
    for index in range(len(table)):
        try:
            table[index]
        except BadSample as bad:
            reasons[key_of(table.ids[index])] = bad.reason
    assert reasons == EXPECTED_BAD
    again = preload_pairs(mixed, view, tmp_path, progress=False)  # read back from the cache
    assert again.bad.keys() == table.bad.keys() and again.ids == table.ids
    skipped = [b.id for batch in batches(again, example=Probe()) for b in batch["skipped"]]
    assert sorted(map(key_of, skipped)) == sorted(EXPECTED_BAD)


class Probe:
    """A picklable example for preloaded rows (already pixels)."""

    def __call__(self, pair, rng):
        return {"pixels": pair.image}
