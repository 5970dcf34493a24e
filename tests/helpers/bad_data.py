"""Bad and odd-but-valid image files (corrupt, bombs, EXIF), and shards that mix them in."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from threetowers.data.sources.loader import pair_batches


class Size:
    """A picklable example: the decoded image's size and mode, so tests see what was used."""

    def __call__(self, pair, rng):
        return {
            "size": torch.tensor(pair.image.size),
            "mode": pair.image.mode,
            "text": pair.caption,
        }


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def rgb(index: int = 0) -> Image.Image:
    return Image.new("RGB", (12, 9), (index % 256, 40, 90))


def bomb_png(side: int = 30000) -> bytes:
    """A PNG whose header claims side x side pixels: refused before any pixel is decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    """A 12 x 9 JPEG whose EXIF says: rotate 90 degrees (it shows as 9 x 12)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(rgb(), "JPEG", exif=exif)


JPEG = encoded(rgb(), "JPEG")
ODD_BUT_VALID = {
    "grey": encoded(Image.new("L", (12, 9), 100)),
    "palette": encoded(rgb().convert("P")),
    "rgba": encoded(Image.new("RGBA", (12, 9), (10, 20, 30, 0))),
    "sixteen_bit": encoded(Image.fromarray(np.full((9, 12), 40000, dtype=np.uint16))),
    "cmyk": encoded(Image.new("CMYK", (12, 9), (0, 50, 100, 0)), "JPEG"),
    "exif_rotated": exif_rotated(),
}
# name -> (image bytes, caption bytes, expected reason)
BAD = {
    "truncated_jpeg": (JPEG[: len(JPEG) // 2], b"a cut jpeg", "undecodable_image"),
    "zero_bytes": (b"", b"an empty file", "undecodable_image"),
    "garbage": (b"this is not an image at all", b"garbage", "undecodable_image"),
    "bomb": (bomb_png(), b"a decompression bomb", "oversized_image"),
    "empty_caption": (encoded(rgb()), b"", "empty_caption"),
    "blank_caption": (encoded(rgb()), b" \t\n ", "empty_caption"),
    "overlong_caption": (encoded(rgb()), b"word " * 1000, "overlong_caption"),
    "latin1_caption": (encoded(rgb()), "caf\u00e9".encode("latin-1"), "caption_not_utf8"),
}


def write_mixed_shards(folder, copies: int = 1):
    """Two shards: every odd-but-valid image, every bad kind, a caption without an image, an
    image without a caption, and plain good samples between them."""
    folder.mkdir()
    samples = []
    for copy in range(copies):
        for name, image in ODD_BUT_VALID.items():
            samples.append({"__key__": f"{name}{copy}", "png": image, "txt": b"odd but fine"})
        for name, (image, caption, _) in BAD.items():
            samples.append({"__key__": f"{name}{copy}", "png": image, "txt": caption})
        samples.append({"__key__": f"no_image{copy}", "txt": b"where is the picture"})
        samples.append({"__key__": f"no_caption{copy}", "png": encoded(rgb())})
        samples += [
            {"__key__": f"good{copy}_{i}", "png": encoded(rgb(i)), "txt": f"fine {i}".encode()}
            for i in range(6)
        ]
    half = len(samples) // 2
    for number, part in enumerate((samples[:half], samples[half:])):
        with wds.TarWriter(str(folder / f"mixed-{number}.tar")) as sink:
            for sample in part:
                sink.write(sample)
    return folder


def batches(source, **options):
    settings = dict(example=Size(), batch_size=4, seed=1, epoch=0, drop_last=False)
    return list(pair_batches(source, **settings | options))


def small_shard(path, samples: int = 4):
    """A shard of tiny samples (each an image, a caption and metadata): many 512-byte blocks
    are member headers, so cuts fall on header, member and sample boundaries alike."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(samples):
            sink.write({"__key__": f"s{i}", "png": encoded(rgb(i)), "txt": b"c", "json": b"{}"})
    with tarfile.open(path) as archive:
        last = archive.getmembers()[-1]
    whole = last.offset_data + -(-last.size // 512) * 512 + 1024  # with its two zero blocks
    return path.read_bytes(), whole
