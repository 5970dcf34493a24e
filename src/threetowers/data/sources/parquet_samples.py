"""Samples of local parquet files, as Hugging Face ``datasets`` writes them: a parquet file is
a shard.

Design. A parquet file is handed to the shard machinery as one more kind of shard, and
nothing downstream tells the kinds apart: ``shards.py`` dispatches on the ``.parquet``
suffix where a shard is counted (:func:`count_samples`), streamed (:func:`read_samples`)
and where a raw sample is decoded (:func:`image_data`, :func:`captions`). So the loader's
per-epoch plans, the rank and worker split, the shuffle buffer, exact resume, the feature
caches (one unit per file), bad-sample counting and naming (``FILE/KEY``) and ``index`` are
the shards' own code, shared rather than copied. A file suits that role because its footer
holds its row count (the plan costs no data read) and its row groups are the natural steps
of a stream (memory: one row group, never the file).

A raw sample keeps its row's columns as they are (``__parquet__``: column -> value) and is
read into an image and captions only when decoded, where ``data.image_key``,
``data.caption_key`` and the path rule are known: every caller decodes with the source's
:class:`~threetowers.data.sources.fields.Fields` (which carries
``data.allow_absolute_paths`` for this), while some stream shards by path alone (``index``),
so a stream that needed the fields to be right could be read wrong. A caller that knows the
fields passes :func:`wanted_columns` and the other columns are never read.

Columns:

* the image (``data.image_key``, default ``image``): Hugging Face ``datasets.Image()``'s
  struct ``{bytes, path}`` (the bytes, or when they are null the path), a binary column of
  encoded image bytes, or a string column of paths. A path is relative to the parquet
  file's folder and held inside it unless ``data.allow_absolute_paths`` (the tables' rule,
  :func:`~threetowers.data.sources.decode.image_path`);
* the captions (``data.caption_key``, default ``caption``): a string or a list of strings;
* ``key``, optional: the sample's name; else its row in the file (``000000007``).

A column missing from a file, or of a type no form above has, stops the source when it is
opened: one message naming the file, its columns and the setting (:func:`check_columns`).
Everything else is a bad sample, counted and named by the loader (``undecodable_image``,
``no_image``, ``no_caption``, ``empty_caption``, ``path_outside_root``, ``missing_file``),
and the stream always holds exactly the samples its count promised:

* a file whose footer cannot be read (not parquet; cut short, since the footer is at the
  end; a footer whose row groups do not add up to its row count) counts, and streams, as
  one bad sample named after the file (``truncated_shard``), as a tar that cannot be opened;
* a row group that cannot be read streams each of its rows as bad (``truncated_shard``);
* a key that comes back in the same file is a second sample with the first one's name:
  streamed as bad (``malformed_row``), as in a tar shard.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from threetowers.data.sources.bad_samples import BadSample, SourceError
from threetowers.data.sources.decode import image_path
from threetowers.data.sources.fields import Fields

SUFFIX = ".parquet"
KEY_COLUMN = "key"
ROW = "__parquet__"  # a raw sample's columns
# What pyarrow raises on files that are not parquet or are damaged (ArrowInvalid is a
# ValueError, ArrowIOError an OSError).
_ERRORS = (pa.ArrowException, OSError, ValueError, EOFError)
IMAGE_FORMS = "a {bytes, path} struct (Hugging Face's Image()), binary image bytes or string paths"
CAPTION_FORMS = "strings or lists of strings"


def is_parquet(path: str | Path) -> bool:
    """Whether a shard is a parquet file: by its name, as a tar's compression is."""
    return str(path).lower().endswith(SUFFIX)


def wanted_columns(fields: Fields, images: bool = True) -> list[str]:
    """The columns that decoding with ``fields`` reads (``images=False``: captions only);
    the ``key`` column is read too when a file has one."""
    return [fields.caption_column, *([fields.image_column] if images else [])]


# --------------------------------------------------------------------------- footers


def _row_groups(metadata: pq.FileMetaData) -> list[int]:
    """Rows per row group; ValueError when they do not add up to the file's row count."""
    rows = [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]
    if sum(rows) != metadata.num_rows or min(rows, default=0) < 0:
        raise ValueError(f"row groups of {rows} rows in a file of {metadata.num_rows} rows")
    return rows


_FOOTERS: dict[tuple[str, int, int], tuple[int, pa.Schema] | str] = {}


def _footer(path: str | Path) -> tuple[int, pa.Schema] | str:
    """A file's row count and schema from its footer alone, or why it cannot be read;
    cached per (path, size, mtime): opening a source and planning it read each footer once."""
    stat = os.stat(path)
    cache_key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _FOOTERS:
        try:
            with pq.ParquetFile(str(path)) as file:
                _FOOTERS[cache_key] = (sum(_row_groups(file.metadata)), file.schema_arrow)
        except _ERRORS as error:
            _FOOTERS[cache_key] = str(error)
    return _FOOTERS[cache_key]


def count_samples(path: str | Path) -> int:
    """Samples in one parquet file from its footer (a file that cannot be read counts as 1)."""
    footer = _footer(path)
    return 1 if isinstance(footer, str) else footer[0]


def _is_text(kind: pa.DataType) -> bool:
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_bytes(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_image(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        members = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
        checks = {"bytes": _is_bytes, "path": _is_text}
        return bool(members.keys() & checks.keys()) and all(
            check(members[name]) for name, check in checks.items() if name in members
        )
    return _is_bytes(kind) or _is_text(kind)


def _is_captions(kind: pa.DataType) -> bool:
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _is_text(kind.value_type)
    return _is_text(kind)


def check_columns(path: str | Path, fields: Fields) -> None:
    """ValueError, naming the file, its columns and the settings, when it lacks the image or
    caption column ``fields`` name or holds them in a form that cannot be read. A file whose
    footer cannot be read passes: it is one bad sample (:func:`count_samples`)."""
    footer = _footer(path)
    if isinstance(footer, str):
        return
    schema = footer[1]
    problems = []
    roles = (
        (fields.image_column, "image", _is_image, IMAGE_FORMS),
        (fields.caption_column, "caption", _is_captions, CAPTION_FORMS),
    )
    for column, role, readable, forms in roles:
        index = schema.get_field_index(column)  # -1: absent (or named twice)
        if index < 0:
            problems.append(f"no {role} column {column!r} (data.{role}_key)")
        elif not readable(schema.field(index).type):
            kind = schema.field(index).type
            problems.append(
                f"the {role} column {column!r} (data.{role}_key) holds {kind}, not {forms}"
            )
    if problems:
        raise SourceError(
            f"{path}: {'; '.join(problems)}. Its columns are {schema.names}: name the image "
            "column with data.image_key=COLUMN and the caption column with "
            "data.caption_key=COLUMN"
        )


# --------------------------------------------------------------------------- the stream


def read_samples(path: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict]:
    """The samples of one parquet file in row order, one row group in memory at a time:
    ``__key__``, ``__url__`` and the row's columns (``__parquet__``: all of them, or those
    of ``columns`` and ``key``), or ``__bad__`` = (reason, detail) for a row that cannot be
    read. As many samples as :func:`count_samples` counts, unless the file changes."""
    url = str(path)
    try:
        file = pq.ParquetFile(url)
    except _ERRORS as error:
        yield _unreadable(path, error)
        return
    with file:
        try:
            groups, names = _row_groups(file.metadata), file.schema_arrow.names
        except _ERRORS as error:
            yield _unreadable(path, error)
            return
        wanted = None if columns is None else [n for n in names if n in columns or n == KEY_COLUMN]
        seen: set[str] = set()
        position = 0
        for index, rows in enumerate(groups):
            records, problem = _read_group(file, index, rows, wanted)
            for offset in range(rows):
                if records is None:
                    detail = (
                        f"row group {index} of {url} cannot be read ({problem}): its {rows} "
                        "rows are skipped (a damaged file?)"
                    )
                    yield _bad(f"{position:09d}", url, "truncated_shard", detail)
                else:
                    yield _sample(records[offset], position, url, seen)
                    records[offset] = None  # the sample holds it now, for as long as it lives
                position += 1
            records = None  # before the next read: one row group at a time


def _read_group(
    file: pq.ParquetFile, index: int, rows: int, columns: list[str] | None
) -> tuple[list[dict] | None, str | None]:
    """One row group's rows as dicts, or why it cannot be read (a string: an exception would
    keep this frame, and so the row group, alive through its traceback)."""
    try:
        table = file.read_row_group(index, columns=columns)
        if table.num_rows != rows:
            raise ValueError(f"{table.num_rows} rows where the footer says {rows}")
        return table.to_pylist(), None
    except _ERRORS as error:
        return None, f"{type(error).__name__}: {error}"


def _sample(record: dict, position: int, url: str, seen: set[str]) -> dict[str, Any]:
    key = record.get(KEY_COLUMN)
    if isinstance(key, bytes):
        key = key.decode("utf-8", errors="surrogateescape")  # decode_sample refuses non-UTF-8
    key = f"{position:09d}" if key is None or key == "" else str(key)
    if key in seen:
        detail = f"key {key!r} comes back at row {position} of {url}; the first row with it is kept"
        return _bad(key, url, "malformed_row", detail)
    seen.add(key)
    return {"__key__": key, "__url__": url, ROW: record}


def _unreadable(path: str | Path, error: Exception) -> dict[str, Any]:
    detail = f"{path} is not a readable parquet file ({error})"
    return _bad(Path(path).name, str(path), "truncated_shard", detail)


def _bad(key: str, url: str, reason: str, detail: str) -> dict[str, Any]:
    return {"__key__": key, "__url__": url, "__bad__": (reason, detail)}


# --------------------------------------------------------------------------- decoding


def _column(sample: dict[str, Any], column: str, role: str, where: str) -> Any:
    record = sample.get(ROW)
    if not isinstance(record, dict) or column not in record:
        raise BadSample("malformed_row", f"{where}: no column {column!r} (data.{role}_key)")
    return record[column]


def image_data(sample: dict[str, Any], fields: Fields, where: str) -> bytes | Path:
    """A raw sample's encoded image bytes, or the path of its image file; :class:`BadSample`
    when it has neither, or its path is refused."""
    value = _column(sample, fields.image_column, "image", where)
    if isinstance(value, dict):  # Image(): its bytes when present, else its path
        value = value["bytes"] if value.get("bytes") is not None else value.get("path")
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and value:
        return image_path(Path(sample["__url__"]), value, fields.allow_absolute_paths, where)
    if value is None or value == "":
        raise BadSample("no_image", f"{where}: no image bytes or path")
    raise BadSample(
        "malformed_row", f"{where}: image {type(value).__name__} is not bytes or a path"
    )


def captions(sample: dict[str, Any], fields: Fields, where: str) -> list:
    """A raw sample's captions as they are (``clean_captions`` judges them); nulls left out,
    :class:`BadSample` (``no_caption``) when none is left."""
    value = _column(sample, fields.caption_column, "caption", where)
    texts = value if isinstance(value, list) else [value]
    texts = [text for text in texts if text is not None]
    if not texts:
        raise BadSample("no_caption", f"{where}: no caption ({fields.caption_column!r} is null)")
    return texts
