"""Hand-built tar members and shards, hostile ones included (huge sizes, sparse files)."""

from __future__ import annotations

import io
import tarfile
import tracemalloc

from PIL import Image

from threetowers.data.sources.tar_archive import IMAGE_LIMIT, TEXT_LIMIT
from threetowers.data.sources.tar_samples import read_samples

GIB = 1 << 30
MIB = 1 << 20


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def header(name: str, size: int, **fields) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    for field, value in fields.items():
        setattr(info, field, value)
    return info.tobuf(tarfile.PAX_FORMAT)


def member(name: str, data: bytes) -> bytes:
    return header(name, len(data)) + data + bytes(-len(data) % 512)


def good(key: str) -> bytes:
    return member(f"{key}.png", png()) + member(f"{key}.txt", f"fine {key}".encode())


def write_shard(path, *parts: bytes | int):
    """A tar of ``parts``: bytes as they are, an int as a hole of that many bytes in the file
    (reads as zeros, but takes no disk), then the end-of-archive blocks."""
    with open(path, "wb") as file:
        for part in parts:
            if isinstance(part, int):
                file.seek(part, io.SEEK_CUR)
            else:
                file.write(part)
        file.write(bytes(1024))
    return path


def sparse_caption(key: str, size: int) -> bytes:
    """A GNU sparse member (pax format 0.1) of ``size`` bytes, none of them stored."""
    pax = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.name": f"{key}.txt",
        "GNU.sparse.size": str(size),
        "GNU.sparse.map": "0,0",
    }
    return header(f"{key}.txt", 0, pax_headers=pax)


def peak_bytes(path) -> tuple[list[dict], int]:
    """The samples of a shard and the most memory Python held while reading them."""
    tracemalloc.start()
    try:
        samples = list(read_samples(path))
        return samples, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def hostile(kind: str) -> list[bytes | int]:
    """The parts of sample ``big``: one member too large for its kind, with holes for data."""
    image, caption = member("big.png", png()), member("big.txt", b"a caption")
    if kind == "caption":
        return [image, header("big.txt", GIB), GIB]
    if kind == "json":
        return [image, caption, header("big.json", TEXT_LIMIT + 1), TEXT_LIMIT + 512]
    return [header("big.png", IMAGE_LIMIT + 1), IMAGE_LIMIT + 512, caption]
