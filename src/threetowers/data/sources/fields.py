"""Where a sample's image and captions are: ``data.image_key`` and ``data.caption_key``.

One name per role, whatever the source: a table's column (CSV/TSV), a JSONL object's key, a
shard's member extension (``jpg``, several as ``jpg;png``) or, for a caption, a field of
the shard's ``.json`` member. Unset, each source reads what its writers usually write:

* tables: the ``image`` column; the ``caption`` column (JSONL: ``caption``, a string, or
  ``captions``, a list);
* shards: the first of :data:`IMAGE_EXTENSIONS`; the ``.json`` member's ``captions`` list,
  else the ``.txt`` member, else ``.caption``, else the ``.json``'s ``caption`` string
  (img2dataset writes both a ``.txt`` and that field);
* parquet files: the ``image`` column (Hugging Face's ``{bytes, path}`` struct, encoded
  bytes or a path); the ``caption`` column (a string or a list of strings).

A parquet file's image paths resolve when its samples are decoded, wherever that is (a
loader worker, a cache build, ``index``), so the path rule (``data.allow_absolute_paths``)
travels here too, with the rest of how a source's samples are read.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "tif", "tiff", "gif")
IMAGE_COLUMN, CAPTION_COLUMN = "image", "caption"
CAPTION_MEMBERS = ("txt", "caption")  # a shard's caption members, after a .json's list


@dataclass(frozen=True)
class Fields:
    image: str | None = None  # data.image_key
    caption: str | None = None  # data.caption_key
    # data.allow_absolute_paths, for the image paths that parquet samples carry (tables
    # resolve theirs when opened); open_pairs sets it for parquet sources only.
    allow_absolute_paths: bool = False

    @property
    def image_column(self) -> str:
        return self.image or IMAGE_COLUMN

    @property
    def caption_column(self) -> str:
        return self.caption or CAPTION_COLUMN

    @property
    def image_members(self) -> tuple[str, ...]:
        return tuple(self.image.split(";")) if self.image else IMAGE_EXTENSIONS

    def identity(self) -> dict:
        """What a cache of the dataset depends on beyond its files: the fields read, when they
        are not the defaults (so caches written before the keys existed keep their names), and
        the path rule when it lets paths leave the folder (other samples are then usable)."""
        named = (self.image, self.caption) != (None, None)
        spec: dict = {"fields": [self.image, self.caption]} if named else {}
        return spec | ({"absolute_paths": True} if self.allow_absolute_paths else {})


DEFAULT_FIELDS = Fields()
