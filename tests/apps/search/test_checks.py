"""A damaged or tampered index is refused when it is opened, in one message naming the file,
never served: with the checksums its manifest records, and by its shapes alone for an index
written before manifests recorded them."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from threetowers.apps.search.checks import DamagedIndexError
from threetowers.apps.search.engine import QueryEncoder, SearchIndex
from threetowers.cli import main


def edit_manifest(index: Path, change) -> None:
    path = index / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps(change(manifest)))


def without_checksums(index: Path) -> None:
    """The index as the previous threetowers wrote it: no sha256 in its manifest."""
    edit_manifest(index, lambda manifest: {k: v for k, v in manifest.items() if k != "sha256"})


def faiss_of(rows: int, dim: int) -> Callable[[Path], None]:
    def write(index: Path) -> None:
        flat = faiss.IndexFlatIP(dim)
        flat.add(np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32))
        faiss.write_index(flat, str(index / "images.faiss"))

    return write


def without_part_dims(manifest: dict) -> dict:
    """The manifest as threetowers wrote it before frozen pairs: every part part_dim wide."""
    return {k: v for k, v in manifest.items() if k != "part_dims"}


def set_manifest(**fields) -> Callable[[Path], None]:
    return lambda index: edit_manifest(index, lambda manifest: manifest | fields)


def truncate(name: str, keep: int) -> Callable[[Path], None]:
    def cut(index: Path) -> None:
        path = index / name
        path.write_bytes(path.read_bytes()[: keep if keep >= 0 else path.stat().st_size + keep])

    return cut


def offsets(change) -> Callable[[Path], None]:
    def write(index: Path) -> None:
        np.save(index / "thumbnails.npy", change(np.load(index / "thumbnails.npy")))

    return write


def table_rows(name: str, change) -> Callable[[Path], None]:
    def write(index: Path) -> None:
        pq.write_table(change(pq.read_table(index / name)), index / name)

    return write


def swapped_image_rows(table: pa.Table) -> pa.Table:
    rows = np.asarray(table["image_row"]).copy()
    rows[0] = 40
    return table.set_column(1, "image_row", pa.array(rows))


# (tampering, the file it changes, what the refusal says without checksums)
CASES = {
    "manifest of another width": (
        set_manifest(part_dim=16, part_dims=[16, 16]),
        None,
        "images.npy is damaged (shape (40, 64); the manifest says (40, 32))",
    ),
    "older manifest of another width": (
        lambda i: edit_manifest(i, lambda m: without_part_dims(m) | {"part_dim": 16}),
        None,
        "images.npy is damaged (shape (40, 64); the manifest says (40, 32))",
    ),
    "part_dims of another count": (
        set_manifest(part_dims=[32]),
        None,
        "manifest.json is damaged (part_dims: not one positive width for each of the 2 parts)",
    ),
    "part_dims of no width": (
        set_manifest(part_dims=[32, 0]),
        None,
        "part_dims: not one positive width for each of the 2 parts",
    ),
    "part_dims not starting at part_dim": (
        set_manifest(part_dims=[16, 48]),
        None,
        "part_dims starts with 16, not part_dim 32 (the main pair's width)",
    ),
    "manifest of more images": (set_manifest(images=41), None, "the manifest says (41, 64)"),
    "manifest without its ann": (
        lambda i: edit_manifest(i, lambda m: {k: v for k, v in m.items() if k != "ann"}),
        None,
        "ann: missing or not a JSON dict",
    ),
    "manifest of another dtype": (set_manifest(dtype="float64"), None, "dtype is not one of"),
    "a FAISS file of 10 rows": (faiss_of(10, 64), "images.faiss", "10 rows; the manifest says 40"),
    "a FAISS file of another width": (faiss_of(40, 192), "images.faiss", "192 dimensions"),
    "a garbage FAISS file": (
        lambda i: (i / "images.faiss").write_bytes(b"garbage" * 100),
        "images.faiss",
        'unreadable: RuntimeError: Index type 0x62726167 ("garb") not recognized',
    ),
    "a truncated FAISS file": (truncate("images.faiss", 1000), "images.faiss", "read error"),
    "offsets of another shape": (
        offsets(lambda o: o[:-1]),
        "thumbnails.npy",
        "int64 values of shape (40,); should be 41 integers",
    ),
    "offsets going back": (
        offsets(lambda o: np.concatenate([o[:5], o[4:5] - 1, o[6:]])),
        "thumbnails.npy",
        "not increasing from 0",
    ),
    "a truncated thumbnail file": (
        truncate("thumbnails.bin", -100),
        "thumbnails.bin",
        "thumbnails.bin is damaged (",
    ),
    "an id table of 39 rows": (
        table_rows("images.parquet", lambda t: t.slice(0, 39)),
        "images.parquet",
        "39 rows; the manifest says 40 images",
    ),
    "a caption of no image": (
        table_rows("captions.parquet", swapped_image_rows),
        "captions.parquet",
        "image_row should hold rows 0..39",
    ),
    "vectors of another shape": (
        lambda i: np.save(i / "images.npy", np.zeros((40, 192), np.float16)),
        "images.npy",
        "shape (40, 192); the manifest says (40, 64)",
    ),
    "a missing caption index": (
        lambda i: (i / "captions.faiss").unlink(),
        "captions.faiss",
        "captions.faiss is damaged (missing)",
    ),
}


@pytest.fixture
def copy(indexed, tmp_path) -> Path:
    shutil.copytree(indexed.index_dir, tmp_path / "index")
    return tmp_path / "index"


def refusal(index: Path) -> str:
    with pytest.raises(DamagedIndexError) as refused:
        SearchIndex(index)
    message = str(refused.value)
    assert f"delete {index} and rebuild it with `threetowers index RUN" in message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_index_is_refused_when_opened(copy, case, checksums):
    tamper, changed, message = CASES[case]
    if not checksums:
        without_checksums(copy)
    tamper(copy)
    refused = refusal(copy)
    if checksums and changed and (copy / changed).exists():
        # its digest gives the file away before it is parsed
        assert refused.startswith(f"{copy / changed} is damaged (its sha256 is not the one")
    else:
        assert message in refused
        assert refused.startswith(f"{copy / (changed or '')}")


def test_a_changed_byte_in_same_shaped_vectors_is_caught_by_the_checksum(copy):
    data = bytearray((copy / "images.npy").read_bytes())
    data[-1] ^= 0xFF
    (copy / "images.npy").write_bytes(bytes(data))
    assert "images.npy is damaged (its sha256" in refusal(copy)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2, 3]", "is damaged (a JSON list, not an object)"),
        ('{"version": 1, "images": ', "is damaged (not JSON: "),
        ('{"version": 1}', "manifest.json is damaged (fingerprint: missing or not a JSON str)"),
    ],
)
def test_a_damaged_manifest_is_refused_in_one_message(copy, content, message):
    (copy / "manifest.json").write_text(content)
    assert message in refusal(copy)


def test_an_index_from_before_checksums_still_opens_and_answers_alike(indexed, copy):
    without_checksums(copy)
    older, current = SearchIndex(copy), SearchIndex(indexed.index_dir)
    assert "sha256" not in older.manifest and "sha256" in current.manifest
    encoder = QueryEncoder(indexed.run)
    query, weights = encoder.text("a small blue circle"), encoder.weights(0.5)
    for target in ("images", "captions"):
        assert older.search(query, weights, 10, target) == current.search(
            query, weights, 10, target
        )
    assert older.thumbnail(older.ids[7]) == current.thumbnail(current.ids[7])


def test_an_index_from_before_part_dims_still_opens_and_answers_alike(indexed, copy):
    edit_manifest(copy, without_part_dims)
    older, current = SearchIndex(copy), SearchIndex(indexed.index_dir)
    assert "part_dims" not in older.manifest and current.manifest["part_dims"] == [32, 32]
    assert older.part_dims == current.part_dims == [32, 32]
    encoder = QueryEncoder(indexed.run)
    query = encoder.text("a small blue circle")
    for alpha in (1.0, 0.4, 0.0):
        for target in ("images", "captions"):
            weights = encoder.weights(alpha)
            assert older.search(query, weights, 10, target) == current.search(
                query, weights, 10, target
            )


def test_the_manifest_records_every_files_sha256(indexed):
    manifest = json.loads((indexed.index_dir / "manifest.json").read_text())
    files = {
        p.name for p in indexed.index_dir.iterdir() if p.name not in ("manifest.json", ".lock")
    }
    assert set(manifest["sha256"]) == files


@pytest.mark.parametrize("case", ["a truncated thumbnail file", "a garbage FAISS file"])
def test_serve_refuses_a_tampered_index_in_one_line(copy, capsys, case):
    CASES[case][0](copy)
    assert main(["serve", str(copy)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"threetowers serve: error: {copy / CASES[case][1]} is damaged")
    assert error.count("\n") == 1 and "Traceback" not in error
