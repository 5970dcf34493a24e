"""Map-style pairs from a CSV/TSV with a header (``image`` and ``caption`` columns by
default, optional ``key``; the separator, comma or tab, read from the header) or a JSONL
file (``image`` plus ``caption`` or a ``captions`` list, optional ``key``); other columns
and keys by ``data.image_key`` / ``data.caption_key`` (fields.py). Image paths are relative
to the table's folder and held inside it."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from threetowers.data.sources.bad_samples import BadSample, SourceError
from threetowers.data.sources.decode import (
    EncodedImage,
    clean_captions,
    image_path,
    is_utf8,
    load_image,
)
from threetowers.data.sources.fields import DEFAULT_FIELDS, Fields
from threetowers.data.sources.pair import ORDER_STREAM, Pair, check_seed


class PairTable:
    """Map-style pairs from a CSV/TSV/JSONL file; ``table[i]`` decodes image ``i``.

    Rows that cannot be used (malformed, a duplicate key, a path leaving the table's folder)
    stay in the table as bad rows: ``table[i]`` raises their :class:`BadSample`, so the loader
    skips and counts them like any other bad sample, and row numbers keep their meaning.
    """

    def __init__(
        self,
        images: Sequence[Path],
        captions: Sequence[list[str]],
        keys: Sequence[str],
        name: str,
        bad: dict[int, BadSample] | None = None,
        fields: Fields = DEFAULT_FIELDS,
    ) -> None:
        if not len(images) == len(captions) == len(keys):
            raise ValueError("images, captions and keys must have the same length")
        self.bad = dict(bad or {})
        good_keys = [key for i, key in enumerate(keys) if i not in self.bad]
        duplicates = [key for key, n in Counter(good_keys).items() if n > 1]
        if duplicates:
            raise SourceError(f"{name}: duplicate keys, e.g. {duplicates[:3]}")
        self.images = [Path(p) for p in images]
        self.captions = [list(c) for c in captions]
        self.keys = [str(k) for k in keys]
        self.name, self.fields = name, fields

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        fields: Fields = DEFAULT_FIELDS,
        key_column: str = "key",
        allow_absolute_paths: bool = False,
    ) -> PairTable:
        """CSV or TSV with a header row; the separator is the header's (a tab, else a comma),
        whatever the suffix: OpenCLIP's ``filepath``/``title`` files are tab-separated
        ``.csv`` files."""
        path = _existing(path)
        image_column, caption_column = fields.image_column, fields.caption_column
        rows = _Rows(path, allow_absolute_paths, fields)
        # Bytes that are not UTF-8 become lone surrogates: only their row is bad, not the file.
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as handle:
            delimiter = "\t" if "\t" in handle.readline() else ","
            handle.seek(0)
            # TSV dumps of web captions (e.g. CC3M) carry bare quote characters; only CSV quotes.
            quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(handle, delimiter=delimiter, quoting=quoting)
            columns = reader.fieldnames or []
            for column, setting in ((image_column, "image"), (caption_column, "caption")):
                if column not in columns:
                    raise SourceError(
                        f"{path}: no column {column!r}; the header has {columns} (name the "
                        f"{setting} column with data.{setting}_key=COLUMN)"
                    )
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:  # e.g. a field over the csv module's size limit
                    rows.reject(reader.line_num, None, f"unreadable row ({error})")
                    continue
                line, key = reader.line_num, row.get(key_column) or None
                if None in row or None in row.values():
                    rows.reject(line, key, f"not the {len(columns)} fields of the header")
                elif not row[image_column]:
                    rows.reject(line, key, f"empty {image_column!r} cell")
                else:
                    rows.add(line, row[image_column], [row[caption_column]], key)
        return rows.table()

    @classmethod
    def from_jsonl(
        cls, path: str | Path, fields: Fields = DEFAULT_FIELDS, allow_absolute_paths: bool = False
    ) -> PairTable:
        """One JSON object per line: the image's path and a caption (a string) or captions (a
        list), under the keys ``fields`` names (default ``image``, ``caption``/``captions``)."""
        path = _existing(path)
        rows = _Rows(path, allow_absolute_paths, fields)
        image_key = fields.image_column
        caption_keys = (fields.caption,) if fields.caption else ("captions", "caption")
        with open(path, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8", errors="surrogateescape")
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    rows.reject(line_number, None, f"not valid JSON: {error}")
                    continue
                if not isinstance(record, dict) or not isinstance(record.get(image_key), str):
                    rows.reject(line_number, None, f"not an object with an {image_key!r} string")
                    continue
                key = str(record["key"]) if "key" in record else None
                texts = next((record[k] for k in caption_keys if k in record), None)
                texts = [texts] if isinstance(texts, str) else texts
                if not isinstance(texts, list):
                    wanted = " or ".join(repr(k) for k in reversed(caption_keys))
                    rows.reject(line_number, key, f"needs {wanted} (a string or a list)")
                    continue
                rows.add(line_number, record[image_key], texts, key)
        return rows.table()

    @property
    def ids(self) -> list[str]:
        """Each row's sample id (see :class:`Pair`): the keys, unique within a table."""
        return self.keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> Pair:
        return self.pair(index)

    def pair(self, index: int, encoded: bool = False) -> Pair:
        """Row ``index`` as a Pair, or :class:`BadSample`; ``encoded``: its image an
        :class:`EncodedImage`, decoded by the transform that reads it."""
        if index in self.bad:
            raise self.bad[index]
        where = f"{self.name} key {self.keys[index]}"
        captions = clean_captions(self.captions[index], where)
        image = (EncodedImage if encoded else load_image)(self.images[index], where)
        return Pair(self.keys[index], image, captions, self.keys[index], index)

    def order(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's permutation of row indices, a function of (seed, epoch) only."""
        check_seed(seed, epoch)
        return np.random.default_rng([seed, epoch, ORDER_STREAM]).permutation(len(self))

    def __repr__(self) -> str:
        return f"PairTable({self.name!r}, {len(self)} pairs)"


class _Rows:
    """A table's rows as they are read: each with a key, good or bad (see PairTable)."""

    def __init__(self, table: Path, allow_absolute_paths: bool, fields: Fields) -> None:
        self.table_path, self.allow_absolute_paths, self.fields = (
            table,
            allow_absolute_paths,
            fields,
        )
        self.images: list[Path] = []
        self.captions: list[list[str]] = []
        self.keys: list[str] = []
        self.bad: dict[int, BadSample] = {}
        self.first_line: dict[str, int] = {}

    def add(self, line: int, image: str, captions: list, key: str | None) -> None:
        where = f"{self.table_path}:{line}"
        if key is not None and key in self.first_line:
            self.reject(line, key, f"duplicate key {key!r} (first on line {self.first_line[key]})")
            return
        try:
            if key is not None and not is_utf8(key):
                raise BadSample("malformed_row", f"{where}: key {key!r} is not UTF-8")
            path = image_path(self.table_path, image, self.allow_absolute_paths, where)
        except BadSample as bad:
            self._append(Path(), [], key, bad)
            return
        key = self._append(path, list(captions), key, None)
        self.first_line[key] = line

    def reject(self, line: int, key: str | None, problem: str) -> None:
        bad = BadSample("malformed_row", f"{self.table_path}:{line}: {problem}")
        self._append(Path(), [], key, bad)

    def _append(self, image: Path, captions: list, key: str | None, bad: BadSample | None) -> str:
        # Rows without a key are named by their position, bad rows included.
        key = key if key is not None else f"{len(self.keys):09d}"
        if bad is not None:
            self.bad[len(self.keys)] = bad
        self.images.append(image)
        self.captions.append(captions)
        self.keys.append(key)
        return key

    def table(self) -> PairTable:
        name = str(self.table_path)
        return PairTable(self.images, self.captions, self.keys, name, self.bad, self.fields)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    return path
