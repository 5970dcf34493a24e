"""data.image_key and data.caption_key: the columns, keys and members people's data uses."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
import webdataset as wds
from PIL import Image

from tests.helpers.shards import png
from threetowers.data.caches.identity import SAMPLE_IDS, dataset_digest, files_digest
from threetowers.data.caches.units import dataset_units
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.fields import Fields
from threetowers.data.sources.pairs import iter_pairs, open_pairs
from threetowers.data.sources.shards import decode_sample


def image_bytes(colour: int, kind: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (colour, 17, 200)).save(buffer, kind)
    return buffer.getvalue()


def test_open_clips_tab_separated_csv_loads_by_its_keys(tmp_path):
    (tmp_path / "images").mkdir()
    lines = ["filepath\ttitle"]
    for i in range(4):
        (tmp_path / "images" / f"{i}.png").write_bytes(png(i))
        lines.append(f'images/{i}.png\ta "quoted", comma-holding title {i}')
    table = tmp_path / "train.csv"  # OpenCLIP names them .csv; the header has tabs
    table.write_text("\n".join(lines) + "\n")
    pairs = open_pairs(table, fields=Fields("filepath", "title"))
    assert [pairs[i].captions for i in range(4)] == [
        [f'a "quoted", comma-holding title {i}'] for i in range(4)
    ]
    assert pairs[2].image.getpixel((0, 0))[0] == 2
    with pytest.raises(ValueError) as error:  # the keys unset: the message names them
        open_pairs(table)
    assert str(error.value) == (
        f"{table}: no column 'image'; the header has ['filepath', 'title'] (name the image "
        "column with data.image_key=COLUMN)"
    )


def test_jsonl_by_its_keys(tmp_path):
    (tmp_path / "a.png").write_bytes(png(3))
    table = tmp_path / "pairs.jsonl"
    records = [{"url": "a.png", "text": "one"}, {"url": "a.png", "text": ["two", "three"]}]
    table.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = open_pairs(table, fields=Fields("url", "text"))
    assert [pairs[i].captions for i in range(2)] == [["one"], ["two", "three"]]
    assert open_pairs(table).bad[0].detail.endswith("not an object with an 'image' string")


def shard(path, samples: list[dict]) -> str:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def test_shards_read_img2dataset_json_captions_caption_members_and_more_image_kinds(tmp_path):
    samples = [
        {"__key__": "a", "jpg": image_bytes(1, "JPEG"), "json": {"caption": "from the json"}},
        {"__key__": "b", "tif": image_bytes(2, "TIFF"), "caption": b"a .caption member"},
        {"__key__": "c", "gif": image_bytes(3, "GIF"), "txt": b"text", "json": {"caption": "j"}},
        {"__key__": "d", "png": png(4), "json": {"captions": ["x", "y"], "caption": "z"}},
    ]
    pairs = list(iter_pairs(shard(tmp_path / "s.tar", samples)))
    assert [p.captions for p in pairs] == [
        ["from the json"],
        ["a .caption member"],
        ["text"],  # .txt before the .json's caption string (img2dataset writes both alike)
        ["x", "y"],  # a captions list first, as before
    ]
    assert [p.image.size for p in pairs] == [(6, 5)] * 4


def test_a_caption_key_names_a_member_or_a_json_field_and_an_image_key_members(tmp_path):
    samples = [
        {"__key__": "a", "webp": png(1), "png": png(9), "json": {"title": "t", "caption": "c"}},
        {"__key__": "b", "png": png(2), "title": b"member title", "txt": b"not this"},
        {"__key__": "c", "jpg": image_bytes(3, "JPEG"), "txt": b"no title anywhere"},
    ]
    path = shard(tmp_path / "s.tar", samples)
    pairs = open_pairs(path, fields=Fields("png;jpg", "title"))
    read = list(iter_pairs(pairs))
    assert read[0].captions == ["t"] and read[0].image.getpixel((0, 0))[0] == 9
    assert read[1].captions == ["member title"]
    assert read[2].reason == "no_caption"
    assert read[2].detail.endswith(
        "no .title member and no 'title' in its .json (data.caption_key)"
    )
    raw = {"__key__": "x", "__url__": path, "jpg": image_bytes(1, "JPEG"), "txt": b"t"}
    with pytest.raises(BadSample, match=r"no \.png/\.webp member"):
        decode_sample(raw, Fields("png;webp"))


def test_caches_of_other_fields_are_other_caches_and_the_defaults_keep_their_names(tmp_path):
    path = shard(tmp_path / "s.tar", [{"__key__": "a", "png": png(1), "txt": b"t"}])
    default = open_pairs(path)
    before = hashlib.sha256(  # how dataset_digest named a dataset before the keys existed
        f"{files_digest([path])}|{json.dumps([SAMPLE_IDS, path])}".encode()
    ).hexdigest()
    assert dataset_digest(default) == before
    assert dataset_units(default)[0].identity() == {
        "shard": files_digest([path]),
        "ids": [SAMPLE_IDS, path],
    }
    other = open_pairs(path, fields=Fields(caption="title"))
    assert dataset_digest(other) != before
    assert dataset_units(other)[0].identity() != dataset_units(default)[0].identity()
