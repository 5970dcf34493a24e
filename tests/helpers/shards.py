"""Small webdataset shards of pairs, and reading them back through a probe."""

from __future__ import annotations

import io

import torch
import webdataset as wds
from PIL import Image

from threetowers.data.sources.loader import pair_batches

SHARD_SIZES = [5, 7, 6, 8, 4, 9]


def png(index: int) -> bytes:
    # The red channel carries the sample index, so a batch can prove image and caption match.
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (index, 17, 200)).save(buffer, "PNG")
    return buffer.getvalue()


class Probe:
    """A picklable ``example``: which image, which caption, and one draw of the rng."""

    def __call__(self, pair, rng):
        return {
            "image": torch.tensor(pair.image.getpixel((0, 0))[0]),
            "caption": torch.tensor([int(part) for part in pair.caption.split()[1:]] + [-1])[:2],
            "draw": torch.tensor(rng.random()),
        }


def write_shards(folder, sizes, captions_per_sample=1, stray=False):
    folder.mkdir()
    index = 0
    for number, size in enumerate(sizes):
        with wds.TarWriter(str(folder / f"train-{number:06d}.tar")) as sink:
            for _ in range(size):
                sample = {"__key__": f"k{index:04d}", "png": png(index)}
                if captions_per_sample == 1:
                    sample["txt"] = f"caption {index}"
                else:
                    sample["txt"] = "ignored when the json lists captions"
                    captions = [f"caption {index} {j}" for j in range(captions_per_sample)]
                    sample["json"] = {"captions": captions, "url": "http://example.com"}
                sink.write(sample)
                index += 1
            if stray and number == 1:
                sink.write({"__key__": "orphan", "txt": "a caption without an image"})
    return folder


def run(source, **kwargs):
    options = dict(example=Probe(), batch_size=4, seed=3, epoch=0)
    options.update(kwargs)
    return list(pair_batches(source, **options))


def key_of(sample_id: str) -> str:
    """A sample's key from its id: ``SHARD/KEY`` for shards, the key itself for tables."""
    return sample_id.rsplit("/", 1)[-1]


def keys_of(batches):
    return [key_of(sample_id) for batch in batches for sample_id in batch["ids"]]


def skipped_of(batches):
    return [(key_of(bad.id), bad.reason) for batch in batches for bad in batch["skipped"]]


def assert_same(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a["ids"] == b["ids"]
        for name in ("image", "caption", "draw"):
            assert torch.equal(a[name], b[name])


def check_consistent(batches):
    for batch in batches:
        assert torch.equal(batch["image"], batch["caption"][:, 0])
