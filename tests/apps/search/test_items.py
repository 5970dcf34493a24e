"""apps/search/items.py: what ``threetowers index`` reads, listed without decoding: an image
folder (ids its relative paths, no captions), a Karpathy JSON's split (each image with its
captions), a table (ids its keys) or shards (ids SHARD/KEY); each item decodes on ``load``
or raises the BadSample saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.helpers.bad_data import encoded, rgb
from tests.helpers.shards import write_shards
from threetowers.apps.search.items import index_source
from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.sources.fields import Fields
from threetowers.errors import UserError


def red(image: Image.Image) -> int:
    return int(np.asarray(image)[0, 0, 0])


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, value in (("b.png", 2), ("a.jpg", 1), ("sub/c.PNG", 3)):
        (tmp_path / name).write_bytes(encoded(rgb(value), "PNG"))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "broken.png").write_bytes(b"\x89PNG broken")
    return tmp_path


def test_an_image_folder_lists_every_image_by_relative_path_without_decoding(folder):
    source = index_source(images=folder)
    items = list(source.items())
    assert source.size == 4 and source.description == f"images under {folder.resolve()}"
    assert [item.id for item in items] == ["a.jpg", "b.png", "sub/broken.png", "sub/c.PNG"]
    assert [item.location for item in items] == [str(folder / item.id) for item in items]
    loaded = [items[i].load() for i in (0, 1, 3)]
    assert [(red(image), captions) for image, captions in loaded] == [(1, []), (2, []), (3, [])]
    with pytest.raises(BadSample) as caught:
        items[2].load()
    assert caught.value.reason == "undecodable_image"


def test_a_karpathy_split_gives_its_images_with_their_captions(folder):
    entries = [
        {"filename": "a.jpg", "split": "test", "sentences": [{"raw": " one "}, {"raw": "two"}]},
        {"filename": "b.png", "split": "train", "sentences": [{"raw": "not in test"}]},
        {"filepath": "sub", "filename": "c.PNG", "split": "test", "sentences": [{"raw": "c"}]},
    ]
    path = folder / "dataset.json"
    path.write_text(json.dumps({"images": entries}))
    source = index_source(data=path)
    items = list(source.items())
    assert source.size == 2 and source.description == f"test split of {path.resolve()}"
    assert [item.id for item in items] == ["a.jpg", "sub/c.PNG"]
    assert [item.load()[1] for item in items] == [["one", "two"], ["c"]]
    assert red(items[1].load()[0]) == 3
    (train,) = list(index_source(data=path, split="train").items())
    assert train.id == "b.png" and train.load()[1] == ["not in test"]


def test_a_table_gives_its_keys_and_bad_rows_raise_when_loaded(folder):
    table = folder / "pairs.csv"
    table.write_text("image,caption,key\nb.png,bee,k1\nmissing.png,gone,k2\n../x.png,out,k3\n")
    source = index_source(data=table)
    items = list(source.items())
    assert source.size == 3 and [item.id for item in items] == ["k1", "k2", "k3"]
    image, captions = items[0].load()
    assert red(image) == 2 and captions == ["bee"]
    reasons = []
    for item in items[1:]:
        with pytest.raises(BadSample) as caught:
            item.load()
        reasons.append(caught.value.reason)
    assert reasons == ["missing_file", "path_outside_root"]


def test_shards_give_shard_and_key_ids_read_by_the_runs_fields(tmp_path):
    shards = write_shards(tmp_path / "s", [2, 1])
    source = index_source(data=shards)
    items = list(source.items())
    first = sorted(shards.glob("*.tar"))[0]
    assert source.size == 3 and items[0].id == items[0].location == f"{first}/k0000"
    assert [red(item.load()[0]) for item in items] == [0, 1, 2]
    assert items[2].load()[1] == ["caption 2"]
    other = list(index_source(data=shards, fields=Fields(caption="title")).items())
    with pytest.raises(BadSample):  # no .title member nor .json field: read as the run reads
        other[0].load()


def test_exactly_one_source_is_asked_for(folder):
    for given in ({}, {"images": folder, "data": folder / "x.csv"}):
        with pytest.raises(UserError, match="give exactly one of --images DIR or --data SOURCE"):
            index_source(**given)
