"""Parquet files as a training source, as Hugging Face ``datasets`` writes them: each file a
shard of the shard machinery (plans, workers, resume, caches), streamed a row group at a time."""

from __future__ import annotations

import io
import json
import weakref
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import tiny_backbone
from tests.helpers.feature_caches import build, live
from tests.helpers.shards import assert_same, check_consistent, png, run, skipped_of
from threetowers.data.caches.identity import dataset_digest
from threetowers.data.caches.units import ShardUnit, dataset_units
from threetowers.data.sources import parquet_samples
from threetowers.data.sources.bad_samples import BadSample, Skipped
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.loader import num_batches
from threetowers.data.sources.pairs import epoch_size, iter_captions, iter_pairs, open_pairs
from threetowers.data.sources.shards import ShardPairs

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image()
ROWS = [9, 7, 11]  # per file of the folder
ROW_GROUP = 3


def write(path: Path, columns: dict, types: dict | None = None, row_group_size=ROW_GROUP):
    """A parquet file as ``datasets`` writes it: its features in the schema's metadata."""
    types = types or {}
    arrays = {name: pa.array(values, types.get(name)) for name, values in columns.items()}
    table = pa.table(arrays)
    features = {"image": {"_type": "Image"}, "caption": {"dtype": "string", "_type": "Value"}}
    meta = {"huggingface": json.dumps({"info": {"features": features}})}
    table = table.replace_schema_metadata(meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def noise_image(seed: int, kind: str) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind)
    return buffer.getvalue()


def pil_decode(data: bytes) -> Image.Image:
    """The reference: PIL's own decode of the same bytes."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def same_pixels(left: Image.Image, right: Image.Image) -> bool:
    return left.size == right.size and left.mode == right.mode and left.tobytes() == right.tobytes()


def ids_of(batches):
    return [sample_id for batch in batches for sample_id in batch["ids"]]


def indices_of(batches):
    """Which image each batch row holds (Probe: the red channel is the sample's index)."""
    return [int(i) for batch in batches if batch["ids"] for i in batch["image"]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Hugging Face's layout: data/train-0000N-of-00003.parquet, several row groups each; the
    first file names its samples (a ``key`` column), the others by row; an unused column."""
    root = tmp_path_factory.mktemp("hf") / "data"
    index = 0
    for number, rows in enumerate(ROWS):
        indices = range(index, index + rows)
        columns = {
            "image": [{"bytes": png(i), "path": f"{i}.png"} for i in indices],
            "caption": [f"caption {i}" for i in indices],
            "unused": [b"\0" * 512 for _ in indices],
        }
        if number == 0:
            columns["key"] = [f"k{i:04d}" for i in indices]
        write(root / f"train-{number:05d}-of-00003.parquet", columns, {"image": IMAGE})
        index += rows
    return root


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("form", ["struct", "struct_path", "binary", "path"])
def test_each_image_form_decodes_as_pil_decodes_the_bytes(tmp_path, monkeypatch, form):
    images = [noise_image(i, "PNG" if i % 2 else "JPEG") for i in range(4)]
    (tmp_path / "images").mkdir()
    for i, data in enumerate(images):
        (tmp_path / "images" / f"{i}.img").write_bytes(data)
    if form == "struct":  # bytes preferred: the path names nothing
        column = [{"bytes": data, "path": f"gone/{i}.jpg"} for i, data in enumerate(images)]
    elif form == "struct_path":  # bytes null: the path, relative to the file
        column = [{"bytes": None, "path": f"images/{i}.img"} for i in range(4)]
    elif form == "binary":
        column = images
    else:
        column = [f"images/{i}.img" for i in range(4)]
    types = {"image": IMAGE} if form.startswith("struct") else {}
    path = write(tmp_path / "pairs.parquet", {"image": column, "caption": list("abcd")}, types)
    monkeypatch.chdir(tmp_path / "images")  # paths are the file's, not the working directory's
    pairs = list(iter_pairs(str(path)))
    assert [pair.key for pair in pairs] == [f"{i:09d}" for i in range(4)]  # named by row
    assert [pair.id for pair in pairs] == [f"{path}/{i:09d}" for i in range(4)]
    assert [pair.captions for pair in pairs] == [["a"], ["b"], ["c"], ["d"]]
    assert [pair.row for pair in pairs] == [0, 1, 2, 3]
    for pair, data in zip(pairs, images, strict=True):
        assert same_pixels(pair.image, pil_decode(data))


def test_captions_as_strings_and_as_lists(tmp_path):
    lists = [["one"], ["two", "  three  "], [None, "four"], ["  ", "five"]]
    path = write(tmp_path / "lists.parquet", {"image": [png(i) for i in range(4)], "text": lists})
    pairs = list(iter_pairs(open_pairs(path, fields=Fields(caption="text"))))
    assert [pair.captions for pair in pairs] == [["one"], ["two", "three"], ["four"], ["five"]]
    strings = write(tmp_path / "s.parquet", {"image": [png(1)], "caption": ["  a string  "]})
    assert [pair.captions for pair in iter_pairs(strings)] == [["a string"]]
    assert list(iter_captions(strings)) == ["a string"]
    assert list(iter_captions(open_pairs(path, fields=Fields(caption="text")))) == [
        "one",
        "two",
        "three",
        "four",
        "five",
    ]


def test_bad_rows_are_skipped_counted_and_named(tmp_path):
    good = png(7)
    (tmp_path / "here.png").write_bytes(good)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(good)
    rows = [  # (key, image path or bytes, caption, why it is bad)
        ("ok-bytes", good, "caption 7", None),
        ("junk", b"\x89PNG\r\n\x1a\n but no more", "caption 7", "undecodable_image"),
        ("null-image", None, "caption 7", "no_image"),
        ("null-caption", good, None, "no_caption"),
        ("blank-caption", good, "   ", "empty_caption"),
        ("ok-path", "here.png", "caption 7", None),
        ("climbs-out", f"../{outside.name}", "caption 7", "path_outside_root"),
        ("absolute", str(outside), "caption 7", "path_outside_root"),
        ("missing", "nowhere.png", "caption 7", "missing_file"),
        ("ok-bytes", good, "caption 7 2", "malformed_row"),
    ]
    images = [{"bytes": r[1], "path": None} if isinstance(r[1], bytes) else r[1] for r in rows]
    images = [{"bytes": None, "path": i} if isinstance(i, str) else i for i in images]
    path = write(
        tmp_path / "mixed.parquet",
        {"key": [r[0] for r in rows], "image": images, "caption": [r[2] for r in rows]},
        {"image": IMAGE},
    )
    assert epoch_size(path) == len(rows)
    items = list(iter_pairs(path))
    assert [item.id for item in items] == [f"{path}/{r[0]}" for r in rows]
    reasons = [item.reason if isinstance(item, Skipped) else None for item in items]
    assert reasons == [r[3] for r in rows]
    assert "nowhere.png" in items[8].detail and f"{path}" in items[1].detail
    assert same_pixels(items[0].image, pil_decode(good))
    assert same_pixels(items[5].image, pil_decode(good))
    # the loader skips them, names them in their batch and uses the rest
    batches = run(path, batch_size=3, drop_last=False, num_workers=0)
    assert sorted(skipped_of(batches)) == sorted((r[0], r[3]) for r in rows if r[3])
    assert sorted(ids_of(batches)) == [f"{path}/ok-bytes", f"{path}/ok-path"]
    # absolute paths and '..' are the owner's choice: allowed, they are read
    allowed = list(iter_pairs(open_pairs(path, allow_absolute_paths=True)))
    assert not isinstance(allowed[6], Skipped) and not isinstance(allowed[7], Skipped)
    assert same_pixels(allowed[7].image, pil_decode(good))


def test_a_missing_or_unreadable_column_is_one_error_at_open(tmp_path, folder):
    path = write(tmp_path / "x.parquet", {"img": [png(0)], "text": ["a"], "url": ["u"]})
    with pytest.raises(ValueError) as error:
        open_pairs(path)
    assert str(error.value) == (
        f"{path}: no image column 'image' (data.image_key); no caption column 'caption' "
        "(data.caption_key). Its columns are ['img', 'text', 'url']: name the image column "
        "with data.image_key=COLUMN and the caption column with data.caption_key=COLUMN"
    )
    assert len(open_pairs(path, fields=Fields("img", "text"))) == 1
    numbers = write(tmp_path / "n.parquet", {"image": [png(0)], "caption": [3]})
    with pytest.raises(ValueError, match="the caption column 'caption' .* holds int64, not str"):
        open_pairs(numbers)
    with pytest.raises(ValueError, match="train-00000-of-00003.parquet: no caption column 'txt'"):
        open_pairs(folder, fields=Fields(caption="txt"))


# --------------------------------------------------------------------------- as shards


def test_parquet_sources_open_in_every_spelling(folder, tmp_path):
    files = sorted(folder.glob("*.parquet"))
    pattern = str(folder / "train-{00000..00002}-of-00003.parquet")
    for spelling in (folder, str(folder), pattern, [str(f) for f in files]):
        source = open_pairs(spelling)
        assert isinstance(source, ShardPairs) and source.shards == files
        assert source.sizes == ROWS and len(source) == sum(ROWS)
    assert open_pairs(files[1]).shards == [files[1]]
    with pytest.raises(FileNotFoundError, match=r"its data/ folder has some"):
        open_pairs(folder.parent)  # a dataset's root, not its data/ folder
    # train and test files side by side: never both
    split = tmp_path / "split"
    split.mkdir()
    for name in ("train-00000-of-00002", "train-00001-of-00002", "test-00000-of-00001"):
        (split / f"{name}.parquet").write_bytes(files[0].read_bytes())
    with pytest.raises(ValueError, match="several splits \\(test, train\\)") as error:
        open_pairs(split)
    assert f"'{split}/train-{{00000..00001}}-of-00002.parquet'" in str(error.value)
    assert len(open_pairs(f"{split}/train-{{00000..00001}}-of-00002.parquet")) == 2 * ROWS[0]
    # one kind per source
    (split / "a.tar").write_bytes(b"")
    with pytest.raises(ValueError, match="both .tar shards and .parquet files"):
        open_pairs(split)
    with pytest.raises(ValueError, match="either webdataset shards or parquet files"):
        open_pairs([split / "a.tar", files[0]])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_folder_streams_every_sample_once_deterministically_and_resumes_exactly(folder):
    files = sorted(folder.glob("*.parquet"))
    full = run(folder, num_workers=2, drop_last=False, shuffle_buffer=8)
    assert sorted(indices_of(full)) == list(range(sum(ROWS)))  # each sample exactly once
    ids = ids_of(full)
    assert len(set(ids)) == len(ids) == sum(ROWS)
    assert {i.rsplit("/", 1)[0] for i in ids} == {str(f) for f in files}  # FILE/KEY
    assert f"{files[0]}/k0003" in ids and f"{files[2]}/000000010" in ids
    check_consistent(full)
    assert skipped_of(full) == []
    assert len(full) == num_batches(
        folder, batch_size=4, seed=3, epoch=0, num_workers=2, drop_last=False
    )
    again = run(folder, num_workers=2, drop_last=False, shuffle_buffer=8)
    assert_same(again, full)
    for start in (1, 3, len(full) - 1):  # a resume from mid-epoch: the rest, bit for bit
        resumed = run(folder, num_workers=2, drop_last=False, shuffle_buffer=8, start_batch=start)
        assert_same(resumed, full[start:])
    other = run(folder, num_workers=2, drop_last=False, shuffle_buffer=8, epoch=1)
    assert ids_of(other) != ids and sorted(ids_of(other)) == sorted(ids)


def test_streaming_holds_one_row_group_at_a_time(folder, monkeypatch):
    """Every read is one row group (never the file), of the columns decoding needs, and the
    previous row group is gone when the next is read; counting reads none."""
    opened, reads, alive = {}, [], []
    real_init, real_read = pq.ParquetFile.__init__, pq.ParquetFile.read_row_group

    def init(self, source, *args, **kwargs):
        opened[id(self)] = Path(source).name
        real_init(self, source, *args, **kwargs)

    def read_row_group(self, index, columns=None, **kwargs):
        assert all(table() is None for table in alive), "two row groups in memory at once"
        table = real_read(self, index, columns=columns, **kwargs)
        assert table.num_rows == self.metadata.row_group(index).num_rows <= ROW_GROUP
        reads.append((opened[id(self)], index, tuple(table.column_names)))
        alive.append(weakref.ref(table))
        return table

    def whole(*args, **kwargs):
        raise AssertionError("a read of more than one row group")

    monkeypatch.setattr(pq.ParquetFile, "__init__", init)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    for name in ("read", "read_row_groups", "iter_batches", "scan_contents"):
        monkeypatch.setattr(pq.ParquetFile, name, whole)
    monkeypatch.setattr(pq, "read_table", whole)
    monkeypatch.setattr(parquet_samples, "_FOOTERS", {})

    source = open_pairs(str(folder))
    assert len(source) == sum(ROWS) and reads == []  # counted from the footers
    batches = run(source, num_workers=0, drop_last=False)
    assert sorted(indices_of(batches)) == list(range(sum(ROWS)))
    groups = []
    for f, rows in zip(source.shards, ROWS, strict=True):
        assert pq.ParquetFile(f).metadata.num_row_groups == -(-rows // ROW_GROUP) > 1
        groups += [(f.name, group) for group in range(-(-rows // ROW_GROUP))]
    assert sorted((name, index) for name, index, _ in reads) == sorted(groups)
    # only what decoding reads: the image, the caption and the key, never "unused"
    assert {columns for _, _, columns in reads} == {
        ("image", "caption", "key"),
        ("image", "caption"),
    }
    reads.clear()
    assert len(list(iter_captions(source))) == sum(ROWS)  # a tokenizer's pass: no image read
    assert {columns for _, _, columns in reads} == {("caption", "key"), ("caption",)}


def test_a_row_group_that_cannot_be_read_streams_its_planned_rows_as_bad(folder, monkeypatch):
    real_read = pq.ParquetFile.read_row_group
    damaged = folder / "train-00001-of-00003.parquet"

    def read_row_group(self, index, *args, **kwargs):
        if self.metadata.num_rows == ROWS[1] and index == 1:  # the middle file's 2nd group
            raise OSError("Corrupt snappy compressed data.")
        return real_read(self, index, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", read_row_group)
    items = list(iter_pairs(folder))
    assert len(items) == epoch_size(folder) == sum(ROWS)  # as planned
    bad = [item for item in items if isinstance(item, Skipped)]
    assert [item.id for item in bad] == [f"{damaged}/{row:09d}" for row in (3, 4, 5)]
    assert {item.reason for item in bad} == {"truncated_shard"}
    assert "row group 1 of" in bad[0].detail and "Corrupt snappy" in bad[0].detail
    batches = run(folder, num_workers=0, drop_last=False)  # the loader's count check holds
    assert len(skipped_of(batches)) == 3


@pytest.mark.parametrize("content", ["text", "cut"])
def test_a_file_that_is_not_parquet_is_one_bad_sample(folder, tmp_path, content):
    files = sorted(folder.glob("*.parquet"))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in files:
        (mixed / f.name).write_bytes(f.read_bytes())
    broken = mixed / "train-00003-of-00004.parquet"
    whole = files[0].read_bytes()
    broken.write_bytes(b"not parquet at all\n" if content == "text" else whole[: len(whole) // 2])
    source = open_pairs(mixed)
    assert source.sizes == [*ROWS, 1]
    batches = run(mixed, num_workers=2, drop_last=False)  # planned 1, streamed 1
    assert skipped_of(batches) == [(broken.name, "truncated_shard")]
    (skipped,) = [bad for batch in batches for bad in batch["skipped"]]
    assert skipped.id == f"{broken}/{broken.name}"
    assert "is not a readable parquet file" in skipped.detail
    assert sorted(indices_of(batches)) == list(range(sum(ROWS)))


# --------------------------------------------------------------------------- caches


def test_feature_cache_units_are_one_per_file(folder, tmp_path):
    files = sorted(folder.glob("*.parquet"))
    units = dataset_units(folder)
    assert units == [
        ShardUnit(str(f), start, rows, Fields())
        for f, start, rows in zip(files, np.cumsum([0, *ROWS[:-1]]).tolist(), ROWS, strict=True)
    ]
    first = list(units[1].samples())
    assert [key for key, _ in first] == [f"{row:09d}" for row in range(ROWS[1])]
    assert same_pixels(first[2][1], pil_decode(png(ROWS[0] + 2)))
    assert list(units[1].captions()) == [[f"caption {ROWS[0] + i}"] for i in range(ROWS[1])]
    # the path rule is part of what the samples depend on
    allowed = open_pairs(folder, allow_absolute_paths=True)
    assert dataset_units(allowed)[0].identity() != units[0].identity()
    assert dataset_digest(allowed) != dataset_digest(folder)
    # built: a row per sample in its file's unit, h of its own image (keys repeat across
    # the files that name samples by row)
    h = tiny_backbone()
    cache = build(h, folder, tmp_path / "cache")["h"]
    assert len(cache.units) == 3 and len(cache) == sum(ROWS)
    for pair in iter_pairs(folder):
        got = cache.features(pair.row, pair.key)
        torch.testing.assert_close(got, live(h, pair.image), rtol=1e-5, atol=1e-6)


def test_index_reads_parquet_by_the_runs_fields_and_path_rule(tmp_path):
    """``index`` streams shards by path alone and decodes with the source's fields: the
    columns and the path rule still hold (search/items.py is unchanged)."""
    from threetowers.apps.search.items import index_source

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "far.png").write_bytes(png(5))
    images = [{"bytes": png(4), "path": None}, {"bytes": None, "path": str(elsewhere / "far.png")}]
    columns = {"img": images, "text": [["caption 4"], ["caption 5"]]}
    path = write(tmp_path / "data" / "pairs.parquet", columns, {"img": IMAGE})
    fields = Fields("img", "text")
    for allowed in (False, True):
        source = index_source(data=path, fields=fields, allow_absolute_paths=allowed)
        items = list(source.items())
        assert source.size == 2 and [item.id for item in items] == [
            f"{path}/000000000",
            f"{path}/000000001",
        ]
        image, captions = items[0].load()
        assert captions == ["caption 4"] and same_pixels(image, pil_decode(png(4)))
        if allowed:
            assert same_pixels(items[1].load()[0], pil_decode(png(5)))
        else:
            with pytest.raises(BadSample, match="path_outside_root"):
                items[1].load()
