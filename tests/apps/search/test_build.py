"""threetowers index: what it stores, the mixed scores it answers (a frozen pair's part by the
pair's own score), resuming, bad images, sources, the fingerprint, and the FAISS index's
measured recall."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.helpers.pair_models import CAPTIONS
from tests.helpers.pair_parts import own_embeddings, pair_model, square_images
from threetowers.apps.search import ann, build, index_files
from threetowers.apps.search.build import build_index
from threetowers.apps.search.engine import Query, QueryEncoder, SearchIndex
from threetowers.apps.search.index_files import IndexMismatch
from threetowers.apps.search.items import index_source
from threetowers.data.benchmarks import load_karpathy
from threetowers.evaluation.embedding import embed_images, embed_texts
from threetowers.files.atomic import TMP_MARK, ForeignFolderError, NoSpaceError, temporary_path
from threetowers.files.locks import LockedError
from threetowers.model.objective import Z_F, Z_G
from threetowers.model.trained import TrainedRun


def reference_parts(run, retrieval):
    """The run's embeddings of the indexed images and captions, by the evaluation's code."""
    data = load_karpathy(retrieval)
    model = run.model
    images = embed_images(model, data.image_paths)
    texts = embed_texts(model, run.tokenizer, data.captions)
    (h,) = model.structure.aligned
    z_h, z_gh = model.structure.pair(h)
    return data, {"f": images[Z_F], "h": images[z_h]}, {"f": texts[Z_G], "h": texts[z_gh]}


def test_index_rows_are_the_runs_embeddings(indexed):
    data, images, texts = reference_parts(indexed.run, indexed.retrieval)
    stored = np.load(indexed.index_dir / "images.npy")
    assert stored.dtype == np.float16
    expected = torch.cat([images["f"], images["h"]], dim=1).numpy()
    np.testing.assert_array_equal(stored, expected.astype(np.float16))
    table = pq.read_table(indexed.index_dir / "images.parquet").to_pydict()
    root = indexed.retrieval.parent
    assert table["id"] == [str(p.relative_to(root)) for p in data.image_paths]
    first = [data.captions[int(np.flatnonzero(data.image_of_caption == i)[0])] for i in range(40)]
    assert table["caption"] == first
    captions = pq.read_table(indexed.index_dir / "captions.parquet").to_pydict()
    assert captions["caption"] == data.captions
    assert captions["image_row"] == data.image_of_caption.tolist()
    stored_captions = np.load(indexed.index_dir / "captions.npy")
    expected = torch.cat([texts["f"], texts["h"]], dim=1).numpy().astype(np.float16)
    np.testing.assert_array_equal(stored_captions, expected)


@pytest.mark.parametrize("alpha", [1.0, 0.7, 0.3, 0.0])
def test_search_scores_are_the_convex_combination(indexed, alpha):
    """Scores and order of a text query equal α⟨z_f, z_g⟩ + (1−α)⟨z_h, z_gh⟩ in float64 on
    the stored (float16) image embeddings."""
    _, images, _ = reference_parts(indexed.run, indexed.retrieval)
    encoder, index = QueryEncoder(indexed.run), SearchIndex(indexed.index_dir)
    text = "a large red star in the upper left on sand"
    query = embed_texts(indexed.run.model, indexed.run.tokenizer, [text])
    (h,) = indexed.run.model.structure.aligned
    g, gh = query[Z_G].double()[0], query[indexed.run.model.structure.pair(h)[1]].double()[0]
    f16 = {part: value.half().double() for part, value in images.items()}
    expected = alpha * (f16["f"] @ g) + (1 - alpha) * (f16["h"] @ gh)
    hits = index.search(encoder.text(text), encoder.weights(alpha), k=40)
    ids = index.ids
    got = torch.tensor([hit.score for hit in hits], dtype=torch.float64)
    want = expected[[ids.index(hit.id) for hit in hits]]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.all(got[:-1] >= got[1:] - 1e-6)
    assert sorted(hit.id for hit in hits) == sorted(ids)  # k = everything: each once


def test_an_image_finds_itself_first_at_every_alpha(indexed):
    encoder, index = QueryEncoder(indexed.run), SearchIndex(indexed.index_dir)
    path = indexed.retrieval.parent / "images" / "r000003.png"
    query = encoder.image(Image.open(path))
    for alpha in (1.0, 0.5, 0.0):
        best = index.search(query, encoder.weights(alpha), k=3)[0]
        assert best.id == "images/r000003.png"
        assert best.score == pytest.approx(1.0, abs=2e-3)  # float16 rows, unit parts


def test_image_to_caption_search_returns_captions_with_their_image(indexed):
    encoder, index = QueryEncoder(indexed.run), SearchIndex(indexed.index_dir)
    query = encoder.image(Image.open(indexed.retrieval.parent / "images" / "r000003.png"))
    hits = index.search(query, encoder.weights(0.5), k=200, target="captions")
    data = load_karpathy(indexed.retrieval)
    root = indexed.retrieval.parent
    owner = {
        c: str(data.image_paths[i].relative_to(root))
        for c, i in zip(data.captions, data.image_of_caption.tolist(), strict=True)
    }
    assert len(hits) == 200 and all(owner[hit.caption] == hit.id for hit in hits)


def test_thumbnails_are_the_images(indexed):
    index = SearchIndex(indexed.index_dir)
    original = np.asarray(Image.open(indexed.retrieval.parent / "images" / "r000005.png"))
    import io

    thumb = np.asarray(Image.open(io.BytesIO(index.thumbnail("images/r000005.png"))))
    assert thumb.shape == original.shape  # 64 px: under the 256 px side, kept
    assert np.abs(thumb.astype(int) - original).mean() < 6  # JPEG at quality 90
    assert index.thumbnail("images/none.png") is None
    assert index.thumbnail("../manifest.json") is None


def test_float32_index_and_float16_recall(indexed, tmp_path):
    manifest = json.loads((indexed.index_dir / "manifest.json").read_text())
    assert 0.9 <= manifest["float16_recall_at_10"] <= 1.0
    out = build_index(
        indexed.run,
        index_source(data=indexed.retrieval),
        tmp_path / "f32",
        "float32",
        progress=False,
    )
    assert out["float16_recall_at_10"] is None
    f32 = np.load(tmp_path / "f32" / "images.npy")
    np.testing.assert_array_equal(np.load(indexed.index_dir / "images.npy"), f32.astype(np.float16))


def test_an_interrupted_build_resumes_at_its_last_chunk(indexed, tmp_path, monkeypatch):
    source = index_source(data=indexed.retrieval)
    whole = tmp_path / "whole"
    build_index(indexed.run, source, whole, chunk_size=16, progress=False)
    calls = []
    real = build._embed_chunk

    def crash_on_second(*args):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(build, "_embed_chunk", crash_on_second)
    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_index(indexed.run, source, resumed, chunk_size=16, progress=False)
    assert not (resumed / "manifest.json").exists()
    calls.clear()
    monkeypatch.setattr(build, "_embed_chunk", lambda *args: calls.append(1) or real(*args))
    build_index(indexed.run, source, resumed, chunk_size=16, progress=False)
    assert len(calls) == 2  # chunks 2 and 3 of 3 (40 images in 16s)
    for name in ("images.npy", "captions.npy", "thumbnails.bin", "images.parquet"):
        assert (resumed / name).read_bytes() == (whole / name).read_bytes(), name
    assert not (resumed / "partial").exists()
    calls.clear()
    build_index(indexed.run, source, resumed, chunk_size=16, progress=False)  # complete: no work
    assert calls == []


def test_bad_images_are_skipped_counted_and_named(indexed, tmp_path, caplog):
    folder = tmp_path / "images"
    shutil.copytree(indexed.retrieval.parent / "images", folder)
    (folder / "r000001.png").write_bytes(b"not a png")
    data = (folder / "r000002.png").read_bytes()
    (folder / "r000002.png").write_bytes(data[: len(data) // 3])
    (folder / "nested").mkdir()
    shutil.copy(folder / "r000004.png", folder / "nested" / "r000004.png")
    source = index_source(images=folder)
    manifest = build_index(
        indexed.run, source, tmp_path / "i", max_bad_fraction=0.1, progress=False
    )
    total = len(list(folder.rglob("*.png")))
    assert manifest["images"] == total - 2 and manifest["captions"] == 0
    assert manifest["bad_samples"]["data/bad_samples/undecodable_image"] == 2
    assert sorted(s[0] for s in manifest["skipped_examples"]) == ["r000001.png", "r000002.png"]
    index = SearchIndex(tmp_path / "i")
    assert "r000001.png" not in index.row_of and "nested/r000004.png" in index.row_of
    assert "skipped 2 bad" in caplog.text


def test_too_many_bad_images_stop_the_build(indexed, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad"):
        build_index(indexed.run, index_source(images=folder), tmp_path / "i", progress=False)


def test_shards_and_tables_as_sources(indexed, tmp_path):
    shard = indexed.root / "world" / "pairs" / "val-000000.tar"
    manifest = build_index(indexed.run, index_source(data=shard), tmp_path / "s", progress=False)
    index = SearchIndex(tmp_path / "s")
    assert manifest["images"] == 32 and manifest["captions"] > 32
    assert all(i.startswith(f"{shard}/") for i in index.ids)  # SHARD/KEY: never confused
    images = sorted((indexed.retrieval.parent / "images").glob("*.png"))[:6]
    table = tmp_path / "pairs.jsonl"
    rows = [
        {"key": f"k{i}", "image": str(p), "caption": f"caption {i}"} for i, p in enumerate(images)
    ]
    rows.append({"key": "k0", "image": str(images[1]), "caption": "the same key again"})
    table.write_text("\n".join(json.dumps(r) for r in rows))
    source = index_source(data=table, allow_absolute_paths=True)
    manifest = build_index(indexed.run, source, tmp_path / "t", max_bad_fraction=0.5)
    assert SearchIndex(tmp_path / "t").ids == [f"k{i}" for i in range(6)]
    assert manifest["captions"] == 6  # the second k0 is a bad row, not a second image k0
    assert manifest["bad_samples"]["data/bad_samples/malformed_row"] == 1


def test_an_id_met_twice_is_skipped(indexed, tmp_path):
    data = json.loads(indexed.retrieval.read_text())
    data["images"] = [image for image in data["images"] if image["split"] == "test"][:3]
    data["images"].append(dict(data["images"][0]))
    (tmp_path / "images").symlink_to(indexed.retrieval.parent / "images")
    (tmp_path / "twice.json").write_text(json.dumps(data))
    source = index_source(data=tmp_path / "twice.json")
    manifest = build_index(indexed.run, source, tmp_path / "i", max_bad_fraction=0.5)
    assert manifest["images"] == 3
    assert manifest["bad_samples"]["data/bad_samples/malformed_row"] == 1


def test_the_fingerprint_keeps_runs_and_indexes_apart(indexed, tmp_path):
    index = SearchIndex(indexed.index_dir)
    stranger = Query(np.zeros(64, np.float32), "0123456789abcdef")
    with pytest.raises(IndexMismatch, match="search an index with the run that built it"):
        index.search(stranger, {"f": 1.0}, 5)
    other = json.loads((indexed.index_dir / "manifest.json").read_text())
    shutil.copytree(indexed.index_dir, tmp_path / "copy")
    other["fingerprint"] = "another-run"
    (tmp_path / "copy" / "manifest.json").write_text(json.dumps(other))
    with pytest.raises(IndexMismatch, match="another run or source"):
        build_index(indexed.run, index_source(data=indexed.retrieval), tmp_path / "copy")
    from threetowers.apps.search.server import create_app

    with pytest.raises(IndexMismatch, match="trained further or replaced"):
        create_app(SearchIndex(tmp_path / "copy"), QueryEncoder(indexed.run))


def test_not_an_index_says_how_to_build_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="threetowers index"):
        SearchIndex(tmp_path)


def clustered(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((32, dim))
    x = centres[rng.integers(0, 32, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_reach_their_measured_recall(kind):
    vectors, queries = clustered(4000), clustered(100, seed=1)
    index, record = ann.build_ann(vectors, queries, kind, recall_target=0.95)
    assert record.kind == kind and record.sample_queries == 100
    _, found = ann.ann_search(index, record, queries, 10)
    assert record.recall_at_10 == ann.recall(found, ann.exact_top(vectors, queries, 10))
    assert record.recall_at_10 >= 0.95
    # fresh queries: the tuned parameter generalises (the manifest's claim)
    fresh = clustered(100, seed=2)
    _, found = ann.ann_search(index, record, fresh, 10)
    assert ann.recall(found, ann.exact_top(vectors, fresh, 10)) >= 0.9


def test_exact_search_and_the_size_rule():
    vectors, queries = clustered(500), clustered(20, seed=1)
    index, record = ann.build_ann(vectors, queries, "exact")
    scores, rows = ann.ann_search(index, record, queries, 5)
    direct = queries.astype(np.float64) @ vectors.T.astype(np.float64)
    np.testing.assert_array_equal(rows, np.argsort(-direct, axis=1)[:, :5])
    np.testing.assert_allclose(scores, np.sort(direct, axis=1)[:, ::-1][:, :5], atol=1e-5)
    assert ann.choose_kind(49_999) == "exact" and ann.choose_kind(50_000) == "ivf"
    assert ann.choose_kind(100, exact_below=10) == "ivf"
    assert ann.recall(np.array([[1, 2, 3]]), np.array([[3, 4, 1]])) == pytest.approx(2 / 3)


def test_index_command_builds_reports_and_finds_it_complete(indexed, tmp_path, capsys):
    from threetowers.cli import main

    args = ["index", str(indexed.root / "run"), "--data", str(indexed.retrieval)]
    args += ["--out", str(tmp_path / "i"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "40 images and 200 captions" in out and "exact FAISS index" in out
    assert f"threetowers serve {tmp_path / 'i'}" in out
    assert main(args) == 0  # complete: reported again, nothing rebuilt
    assert main(["index", str(indexed.root / "run"), "--out", str(tmp_path / "j")]) == 2
    assert "exactly one of --images DIR or --data SOURCE" in capsys.readouterr().err


def test_an_out_folder_of_the_users_own_files_is_refused_never_cleared(indexed, tmp_path):
    out = tmp_path / "mine"
    (out / "partial").mkdir(parents=True)
    (out / "partial" / "draft.txt").write_text("the user's notes")
    with pytest.raises(ForeignFolderError, match=r"--out=.*mine is not empty \(partial\)"):
        build_index(indexed.run, index_source(data=indexed.retrieval), out, progress=False)
    assert (out / "partial" / "draft.txt").read_text() == "the user's notes"
    assert [p.name for p in out.iterdir()] == ["partial"]


def test_a_finished_build_removes_only_its_own_partial_files(indexed, tmp_path, monkeypatch):
    out = tmp_path / "i"
    real = build._embed_chunk

    def leave_a_user_file(*args):  # the user drops a file in partial/ while it builds
        (out / "partial" / "notes.txt").write_text("mine")
        return real(*args)

    monkeypatch.setattr(build, "_embed_chunk", leave_a_user_file)
    build_index(indexed.run, index_source(data=indexed.retrieval), out, progress=False)
    assert [p.name for p in (out / "partial").iterdir()] == ["notes.txt"]


def test_a_second_build_of_one_out_is_refused_and_writes_nothing(indexed, tmp_path):
    out = tmp_path / "i"
    out.mkdir()
    # Another process holding the --out's lock as `threetowers index` does (a lock of this
    # process would not exclude its own second one).
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        with pytest.raises(LockedError) as refused:
            build_index(indexed.run, index_source(data=indexed.retrieval), out, progress=False)
        assert str(refused.value) == (
            f"{out} is in use: another threetowers process (pid {holder.pid}) is writing this "
            "index; wait for it to finish or pass another --out"
        )
        assert [path.name for path in out.iterdir()] == [".lock"]  # nothing written
    finally:
        holder.communicate(b"")  # it lets go as it exits
    manifest = build_index(indexed.run, index_source(data=indexed.retrieval), out, progress=False)
    assert manifest["images"] == 40


HOLD_LOCK = """
import sys
from threetowers.files.locks import exclusive
with exclusive(sys.argv[1], "index", ""):
    print("held", flush=True)
    sys.stdin.read()
"""


def no_space(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def faiss_full_disk(real):
    """faiss.write_index on a full disk: part of the file written, then its RuntimeError."""

    def write_index(index, target):
        if not isinstance(target, str):  # a writer object: counting the bytes, not a file
            return real(index, target)
        Path(target).write_bytes(b"IxFI" + b"\0" * 4047)
        raise RuntimeError(
            "Error in void faiss::write_index(const Index*, IOWriter*, int) at "
            "/project/faiss/impl/index_write.cpp:499: Error: 'ret == (size * 4)' failed: "
            f"write error in {target}: 4051 != 512000 (No space left on device)"
        )

    return write_index


def half_then_full(target):
    """A writer that puts a few bytes into ``target`` (a file or a path), then fails."""

    def write(*args, **kwargs):
        destination = next(a for a in args if isinstance(a, (str, Path)) or hasattr(a, "write"))
        if isinstance(destination, (str, Path)):
            Path(destination).write_bytes(b"PAR1\x15\x04")
        else:
            destination.write(b"\x93NUMPY\x01\x00")
        raise no_space(target)

    return write


@pytest.mark.parametrize("failing", ["faiss", "npy", "parquet", "thumbnails", "chunk"])
def test_a_full_disk_stops_the_build_in_one_message_and_a_rerun_finishes(
    indexed, tmp_path, monkeypatch, failing
):
    out, source = tmp_path / "i", index_source(data=indexed.retrieval)
    real_write_atomic = index_files.write_atomic

    def thumbnails_fail(path, data):
        if path.name != "thumbnails.bin":
            return real_write_atomic(path, data)
        half_then_full(path)(temporary_path(path))

    fault, folder, final = {
        "faiss": (faiss_full_disk(ann.faiss.write_index), out, "images.faiss"),
        "npy": (half_then_full(out / "images.npy"), out, "images.npy"),
        "parquet": (half_then_full(out / "images.parquet"), out, "images.parquet"),
        "thumbnails": (thumbnails_fail, out, "thumbnails.bin"),
        "chunk": (half_then_full(out / "partial"), out / "partial", "partial/chunk_000000.npz"),
    }[failing]
    target = {
        "faiss": (ann.faiss, "write_index"),
        "npy": (np, "save"),
        "parquet": (index_files.pq, "write_table"),
        "thumbnails": (index_files, "write_atomic"),
        "chunk": (np, "savez"),
    }[failing]
    monkeypatch.setattr(*target, fault)
    with pytest.raises(NoSpaceError) as stopped:
        build_index(indexed.run, source, out, progress=False)
    message = str(stopped.value)
    assert message.startswith(f"not enough disk space in {folder} for ")
    assert re.search(r"it needs about [\d,]+\.\d MiB, [\d,]+\.\d MiB are free", message)
    assert message.endswith("free some space and re-run the same command (finished work is kept)")
    assert not (out / final).exists()  # never a half-written file under its own name
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob(f"*{TMP_MARK}*"))
    monkeypatch.undo()
    build_index(indexed.run, source, out, progress=False)
    assert SearchIndex(out).ids == SearchIndex(indexed.index_dir).ids


def test_a_full_disk_is_one_line_from_the_index_command(indexed, tmp_path, monkeypatch, capsys):
    from threetowers.cli import main

    args = ["index", str(indexed.root / "run"), "--data", str(indexed.retrieval)]
    args += ["--out", str(tmp_path / "i"), "--quiet"]
    monkeypatch.setattr(ann.faiss, "write_index", faiss_full_disk(ann.faiss.write_index))
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.count("error:") == 1
    assert error.splitlines()[-1].startswith(
        f"threetowers index: error: not enough disk space in {tmp_path / 'i'} for "
    )
    monkeypatch.undo()
    assert main(args) == 0


@pytest.fixture(scope="module")
def pair_index(tmp_path_factory):
    """An index of a model with a frozen pair t (its part 8 wide beside 16-wide ones)."""
    root = tmp_path_factory.mktemp("pair_index")
    built = pair_model(root / "clip")
    run = TrainedRun(root / "run", built.cfg, built.model, built.tokenizer, 0, "pair-run")
    paths = square_images(root / "images", 12)
    source = index_source(images=root / "images")
    manifest = build_index(run, source, root / "index", "float32", progress=False)
    return built, run, paths, root / "index", manifest


@pytest.mark.parametrize(
    "weights", [{"t": 1.0}, {"f": 0.4, "h": 0.1, "t": 0.5}], ids=["pair alone", "mixed"]
)
def test_a_pairs_part_scores_by_its_own_similarities(pair_index, weights):
    built, run, paths, directory, manifest = pair_index
    assert manifest["parts"] == ["f", "h", "timg", "ttxt", "t"]
    assert manifest["part_dim"] == 16 and manifest["part_dims"] == [16, 16, 16, 16, 8]
    index, encoder = SearchIndex(directory), QueryEncoder(run)
    own_images, own_texts = own_embeddings(built, paths, CAPTIONS)
    images = embed_images(built.model, paths)
    texts = embed_texts(built.model, built.tokenizer, CAPTIONS)
    expected = (
        weights.get("f", 0.0) * texts[Z_G] @ images[Z_F].T
        + weights.get("h", 0.0) * texts["z_gh"] @ images["z_h"].T
        + weights["t"] * own_texts @ own_images.T
    )
    for text, scores in zip(CAPTIONS, expected, strict=True):
        hits = index.search(encoder.text(text), weights, k=len(paths))
        assert [hit.id for hit in hits] == [paths[i].name for i in scores.argsort(descending=True)]
        got = torch.tensor([hit.score for hit in hits])
        torch.testing.assert_close(got, scores.sort(descending=True).values, atol=1e-5, rtol=0)
