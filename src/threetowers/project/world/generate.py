"""The embedded world written to disk: ``write_world(out_dir, spec)`` writes webdataset shards
of pairs, a Karpathy-format retrieval set, zero-shot object and place folders, the two
labelled pretraining sets, and the retrieval and object sets again in words no training
caption uses (``heldout``), in worker processes; what each sample is: ``spec.py``.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from threetowers.errors import UserError
from threetowers.files.atomic import refuse_foreign, write_atomic
from threetowers.files.readback import read_json
from threetowers.project.world.heldout import (
    HELDOUT_CLASSNAMES,
    HELDOUT_TEMPLATES,
    heldout_captions,
)
from threetowers.project.world.render import COLOURS, OBJECT_CLASSES, PLACES, SCENES
from threetowers.project.world.spec import (
    LABELS,
    OBJECT_TEMPLATES,
    PLACE_TEMPLATES,
    SPLITS,
    VERSION,
    WorldSpec,
    render,
)

# The retrieval sets' Karpathy files, by set name: one set of images, two caption sets.
RETRIEVAL_FILES = {"world": "dataset_world.json", "heldout": "dataset_world_heldout.json"}


def benchmark_files(root: Path) -> dict[str, dict[str, str]]:
    """The world's own benchmark sets under ``root``, by kind and name: retrieval and
    zero-shot in its training words, and again in held-out words (``heldout.py``)."""
    return {
        "retrieval": {
            name: str(root / "retrieval" / file) for name, file in RETRIEVAL_FILES.items()
        },
        "zeroshot": {
            "objects": str(root / "zeroshot_objects"),
            "places": str(root / "zeroshot_places"),
            "heldout": str(root / "zeroshot_objects_heldout"),
        },
    }


class WorldSpecMismatch(UserError, ValueError):
    """``write_world`` found a complete world written with another spec or version."""


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # level 1: fast, still lossless
    return buffer.getvalue()


def _folder(index: int, name: str) -> str:
    """Class folder name; the zero-padded index makes folders sort in label order."""
    return f"{index:03d}_{name.replace(' ', '_')}"


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# ---------------------------------------------------------------- worker tasks
def _write_shard(spec: WorldSpec, split: str, start: int, stop: int, path: str) -> int:
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index in range(start, stop):
            image, meta = render(spec, split, index)
            key = f"{split}-{index:06d}"
            record = {k: meta[k] for k in ("captions", "place", "scene", "objects", "count")}
            members = {
                "png": _png(image),
                "txt": meta["captions"][0].encode(),
                "json": json.dumps(record).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible bytes
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return stop - start


def _write_folder(spec: WorldSpec, split: str, start: int, stop: int, root: str) -> int:
    names = LABELS[SPLITS[split][1]]
    for index in range(start, stop):
        image, meta = render(spec, split, index)
        label = meta["label"]
        image.save(Path(root, _folder(label, names[label]), f"{index:06d}.png"), compress_level=1)
    return stop - start


def _write_retrieval(spec: WorldSpec, split: str, start: int, stop: int, root: str, first: int):
    """Images ``r{imgid}.png``; returns the Karpathy entries (imgid = first + index) of the
    ordinary captions (``"world"``) and of the held-out ones (``"heldout"``)."""
    entries: dict[str, list[dict]] = {name: [] for name in RETRIEVAL_FILES}
    split_id = SPLITS[split][0]
    for index in range(start, stop):
        image, meta = render(spec, split, index)
        imgid = first + index
        filename = f"r{imgid:06d}.png"
        image.save(Path(root, filename), compress_level=1)
        n = len(meta["captions"])
        # Its own stream: the held-out captions leave every ordinary one as it was.
        seed = int(np.random.default_rng([spec.seed, split_id, index, 1]).integers(1 << 62))
        texts = {"world": meta["captions"], "heldout": heldout_captions(meta, seed, n)}
        for name, captions_of_name in texts.items():
            entries[name].append(_karpathy_entry(split, filename, imgid, captions_of_name))
    return entries


def _karpathy_entry(split: str, filename: str, imgid: int, texts: list[str]) -> dict:
    n = len(texts)
    sentids = list(range(imgid * n, imgid * n + n))
    return {
        "filename": filename,
        "filepath": "images",
        "split": split.removeprefix("retrieval_"),
        "imgid": imgid,
        "sentids": sentids,
        "sentences": [
            {"raw": raw, "tokens": _tokens(raw), "imgid": imgid, "sentid": sentid}
            for raw, sentid in zip(texts, sentids, strict=True)
        ],
    }


_TASKS = {"shard": _write_shard, "folder": _write_folder, "retrieval": _write_retrieval}


def _run(task):
    kind, *args = task
    return _TASKS[kind](*args)


# ------------------------------------------------------------------- writing
STARTED = ".generating.json"  # written first: the folder's partial outputs are ours to clear
_OUTPUTS = ("pairs", "retrieval", "zeroshot_objects", "zeroshot_places")
_OUTPUTS += ("pretrain_objects", "pretrain_scenes", "zeroshot_objects_heldout")
_CHUNK = 500  # images per task for the folder sets: small enough to balance two workers


def _plan(spec: WorldSpec, out: Path):
    """Create the directories; return (tasks, manifest counts and files)."""
    tasks, counts, files = [], {}, {}
    (out / "pairs").mkdir(parents=True)
    for split, total in (("train", spec.train_pairs), ("val", spec.val_pairs)):
        shards = []
        for number, start in enumerate(range(0, total, spec.shard_size)):
            name = f"pairs/{split}-{number:06d}.tar"
            shards.append(name)
            stop = min(total, start + spec.shard_size)
            tasks.append(("shard", spec, split, start, stop, str(out / name)))
        counts[f"pairs/{split}"], files[f"pairs/{split}"] = total, shards
        if len(shards) > 1:  # a brace pattern for webdataset; train and val share a folder
            files[f"pairs/{split}_pattern"] = f"pairs/{split}-{{000000..{len(shards) - 1:06d}}}.tar"

    images = out / "retrieval" / "images"
    images.mkdir(parents=True)
    first = 0
    for split, total in (
        ("retrieval_test", spec.retrieval_test),
        ("retrieval_val", spec.retrieval_val),
    ):
        for start in range(0, total, _CHUNK):
            stop = min(total, start + _CHUNK)
            tasks.append(("retrieval", spec, split, start, stop, str(images), first))
        counts[f"retrieval/{split.removeprefix('retrieval_')}"] = total
        first += total
    files["retrieval"] = [f"retrieval/{file}" for file in RETRIEVAL_FILES.values()]

    val_objects = round(spec.pretrain_objects_per_class * spec.pretrain_val_fraction)
    val_scenes = round(spec.pretrain_scenes_per_class * spec.pretrain_val_fraction)
    folder_sets = [
        ("zeroshot_objects", "test", spec.zeroshot_per_class),
        ("zeroshot_objects", "val", spec.zeroshot_val_per_class),
        ("zeroshot_places", "test", spec.zeroshot_per_class),
        ("zeroshot_places", "val", spec.zeroshot_val_per_class),
        ("pretrain_objects", "train", spec.pretrain_objects_per_class),
        ("pretrain_objects", "val", val_objects),
        ("pretrain_scenes", "train", spec.pretrain_scenes_per_class),
        ("pretrain_scenes", "val", val_scenes),
    ]
    for dataset, part, per_class in folder_sets:
        split = f"{dataset}_{part}"
        names = LABELS[SPLITS[split][1]]
        root = out / dataset / part
        for label, name in enumerate(names):
            (root / _folder(label, name)).mkdir(parents=True)
        # Labels cycle with the index (label = index % classes), so this is per_class each.
        total = per_class * len(names)
        for start in range(0, total, _CHUNK):
            stop = min(total, start + _CHUNK)
            tasks.append(("folder", spec, split, start, stop, str(root)))
        counts[f"{dataset}/{part}"] = total
        files[dataset] = [f"{dataset}/classnames.txt"]
        if dataset.startswith("zeroshot"):
            files[dataset].append(f"{dataset}/templates.txt")
        (out / dataset / "classnames.txt").write_text("\n".join(names) + "\n")
    templates = "\n".join(OBJECT_TEMPLATES) + "\n"
    (out / "zeroshot_objects" / "templates.txt").write_text(templates)
    (out / "zeroshot_places" / "templates.txt").write_text("\n".join(PLACE_TEMPLATES) + "\n")
    # The object images again, prompted in held-out words: links, not copies.
    heldout = out / "zeroshot_objects_heldout"
    heldout.mkdir()
    for part in ("val", "test"):
        (heldout / part).symlink_to(Path("..", "zeroshot_objects", part), target_is_directory=True)
    (heldout / "classnames.txt").write_text("\n".join(HELDOUT_CLASSNAMES) + "\n")
    (heldout / "templates.txt").write_text("\n".join(HELDOUT_TEMPLATES) + "\n")
    files["zeroshot_objects_heldout"] = [
        "zeroshot_objects_heldout/classnames.txt",
        "zeroshot_objects_heldout/templates.txt",
    ]
    return tasks, counts, files


def write_world(out_dir: str | os.PathLike, spec: WorldSpec | None = None) -> Path:
    """Write the world under ``out_dir``; return the path of its ``manifest.json``.

    Idempotent: a complete world (its manifest exists) with the same spec and version is
    returned as is; one with a different spec raises ``WorldSpecMismatch`` rather than
    deleting data (choose another directory). The manifest is written last and atomically, so
    an interrupted run leaves no manifest; the next call clears the partial outputs and
    starts again. Only a folder that is empty or marked by :data:`STARTED` is written: a
    folder of the user's own files is refused, never cleared.
    """
    spec = spec or WorldSpec()
    out = Path(out_dir)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        found = read_json(manifest_path)
        if found.get("version") == VERSION and found.get("spec") == spec.content():
            return manifest_path
        raise WorldSpecMismatch(
            f"{out} already holds a world with spec {found.get('spec')} (version "
            f"{found.get('version')}); asked for {spec.content()} (version {VERSION}). "
            "Use another directory, or delete this one to regenerate."
        )
    started = out / STARTED
    refuse_foreign(out, [manifest_path, started], "world", "data.world.dir")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(started, json.dumps({"version": VERSION, "spec": spec.content()}))
    for name in _OUTPUTS:  # leftovers of an interrupted run of ours (the marker says so)
        shutil.rmtree(out / name, ignore_errors=True)
    tasks, counts, files = _plan(spec, out)

    # Biggest tasks first, so the pool does not end waiting on one large shard.
    tasks.sort(key=lambda task: task[4] - task[3], reverse=True)
    entries: dict[str, list[dict]] = {name: [] for name in RETRIEVAL_FILES}
    if spec.workers > 1:
        # spawned, not forked: a forked worker would inherit the caller's signal handlers
        # (train's SIGTERM sets a flag instead of exiting), and the pool's terminate() at
        # its end would then wait forever on a worker that will not die
        with multiprocessing.get_context("spawn").Pool(spec.workers) as pool:
            results = list(pool.imap_unordered(_run, tasks))
    else:
        results = [_run(task) for task in tasks]
    for result in results:
        if isinstance(result, dict):  # a retrieval task's entries
            for name, found in result.items():
                entries[name].extend(found)
    for name, file in RETRIEVAL_FILES.items():
        images = sorted(entries[name], key=lambda entry: entry["imgid"])
        karpathy = {"dataset": "world" if name == "world" else f"world-{name}", "images": images}
        (out / "retrieval" / file).write_text(json.dumps(karpathy))

    manifest = {
        "version": VERSION,
        "spec": spec.content(),
        "object_classes": OBJECT_CLASSES,
        "colours": list(COLOURS),
        "places": PLACES,
        "scenes": SCENES,
        "object_templates": OBJECT_TEMPLATES,
        "place_templates": PLACE_TEMPLATES,
        "counts": counts,
        "files": files,
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    started.unlink()
    return manifest_path
