"""One sample's image and captions, decoded and checked, or :class:`BadSample` saying why not.

Odd but valid images (greyscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated) are converted
to upright RGB by :func:`to_rgb` and used. Everything that cannot be used raises
:class:`BadSample` with a reason, so that the loader can skip and count it.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from threetowers.data.sources.bad_samples import BadSample

# Longer captions are junk (scraped page text), not descriptions: web alt-texts run to a few
# hundred characters, and the text tower reads at most its context length of tokens.
MAX_CAPTION_CHARS = 4096


def load_image(data: str | Path | bytes, where: str) -> Image.Image:
    """Decode an image file or bytes to upright RGB.

    Images with more pixels than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    ~89 megapixels by default) are refused from their header, before any pixel is decoded.
    """
    with _refusing_bad(data, where):
        with Image.open(_stream(data)) as image:
            image.load()
            return to_rgb(image)


class EncodedImage:
    """An image whose header is read and checked but whose pixels are not decoded yet, so
    that a transform which knows how much of it it needs decodes no more (:meth:`decoded`).

    ``Image.draft`` has a JPEG decoded at 1/2, 1/4 or 1/8 of its size by scaling in the
    DCT domain, which costs a fraction of a full decode. Its pixels are not those of a full
    decode resized (each is an average over its block, computed by the IDCT); other formats
    (PNG, WebP, ...) are always decoded whole. Errors are :class:`BadSample`, as in
    :func:`load_image`.
    """

    def __init__(self, data: str | Path | bytes, where: str) -> None:
        self.data, self.where = data, where
        self._decoded: tuple[Image.Image, float] | None = None  # (image, its scale)
        with _refusing_bad(data, where):
            with Image.open(_stream(data)) as image:  # the header only
                width, height = image.size
                turn = orientation(image)
        self._upright = turn not in TURNS  # else decoded whole: a draft's box would turn too
        # the upright image's (width, height) at full size
        self.size = (height, width) if turn in SIDEWAYS else (width, height)

    def decoded(self, needed: tuple[int, int]) -> tuple[Image.Image, float]:
        """Upright RGB at least ``needed`` (width, height) in size, and its scale (its size
        over the full size: 1, 1/2, 1/4 or 1/8); decoded once for all that need no more."""
        if self._decoded is not None and self._covers(self._decoded[1], needed):
            return self._decoded
        with _refusing_bad(self.data, self.where):
            with Image.open(_stream(self.data)) as image:
                scale = 1.0
                if self._upright:  # a turned image is decoded whole: its sides swap
                    width = image.size[0]
                    drafted = image.draft(image.mode, needed)  # its box: the full image's
                    scale = drafted[1][2] / width if drafted else 1.0
                image.load()
                self._decoded = (to_rgb(image), scale)
        return self._decoded

    def _covers(self, scale: float, needed: tuple[int, int]) -> bool:
        width, height = self.size
        return width * scale >= needed[0] and height * scale >= needed[1]


def _stream(data: str | Path | bytes):
    return io.BytesIO(data) if isinstance(data, bytes) else data


@contextlib.contextmanager
def _refusing_bad(data: str | Path | bytes, where: str) -> Iterator[None]:
    """Whatever decoding ``data`` raises, as the :class:`BadSample` it means."""
    try:
        with warnings.catch_warnings():
            # Pillow's complaints about damaged metadata would repeat for every such image of
            # a long run; what matters is whether the pixels decode.
            warnings.simplefilter("ignore")
            # Pillow only warns between 1x and 2x its limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except UnidentifiedImageError:  # its message holds a memory address: not reproducible
        raise BadSample("undecodable_image", f"{where}: empty or not an image format") from None
    except OSError as error:
        if error.errno is not None and not isinstance(data, bytes):  # the file, not its data
            raise BadSample("missing_file", f"{where}: {error.strerror}: {data}") from None
        raise BadSample("undecodable_image", f"{where}: {error}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample("oversized_image", f"{where}: {error}") from None
    except BadSample:
        raise
    except Exception as error:  # corrupt data makes Pillow raise almost any exception type
        raise BadSample("undecodable_image", f"{where}: {type(error).__name__}: {error}") from None


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_WHITE = (255, 255, 255, 255)


TURNS = range(2, 9)  # EXIF orientations that flip or turn the stored image
SIDEWAYS = range(5, 9)  # those that swap its width and height


def orientation(image: Image.Image) -> int:
    """The image's EXIF orientation, 1 (as stored) when it has none or a corrupt one."""
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception:  # corrupt EXIF blocks are common in web data; orientation is a nicety
        return 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright 8-bit RGB: EXIF orientation applied, transparency composited on white.

    16-bit (and 32-bit integer) greyscale is scaled from 0..65535 rather than clipped, so a
    16-bit PNG does not come out as a mostly white picture.
    """
    if orientation(image) in TURNS:  # else exif_transpose would copy the image for nothing
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ValueError(f"cannot convert an image of mode {mode!r} to RGB: {error}") from error


def caption_text(data: bytes, where: str) -> str:
    """A caption file's bytes as text; UTF-8 only (a byte-order mark is dropped)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise BadSample("caption_not_utf8", f"{where}: {error}") from None


def clean_captions(captions: list, where: str) -> list[str]:
    """The usable captions, stripped; :class:`BadSample` if none is left.

    Bad captions of a sample with several are dropped; the sample is skipped only when every
    caption is bad, for the reason of the first bad one.
    """
    kept, problem = [], None
    for caption in captions:
        if not isinstance(caption, str):
            reason = ("malformed_row", f"{where}: caption {caption!r} is not a string")
        elif not is_utf8(caption):
            reason = ("caption_not_utf8", f"{where}: caption {caption!r} holds bytes not in UTF-8")
        elif not caption.strip():
            reason = ("empty_caption", f"{where}: caption {caption!r} is empty")
        elif len(caption) > MAX_CAPTION_CHARS:
            reason = (
                "overlong_caption",
                f"{where}: caption of {len(caption)} characters (limit {MAX_CAPTION_CHARS})",
            )
        else:
            kept.append(caption.strip())
            continue
        problem = problem or reason
    if not kept:
        raise BadSample(*(problem or ("no_caption", f"{where}: no caption")))
    return kept


def is_utf8(text: str) -> bool:
    # Undecodable bytes read with errors="surrogateescape" become lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def image_path(data_file: Path, image: str, allow_absolute_paths: bool, where: str) -> Path:
    """An image path that a data file (a table, a parquet file) holds, relative to its folder.

    Absolute paths and paths that climb out with ``..`` are refused unless allowed, so that a
    data file cannot make the loader read elsewhere. The check is lexical: symbolic links
    inside the folder are the folder owner's choice and are followed.
    """
    if not is_utf8(image):
        raise BadSample("malformed_row", f"{where}: image path {image!r} is not UTF-8")
    path = Path(image)
    inside = not path.is_absolute() and Path(os.path.normpath(image)).parts[:1] != (os.pardir,)
    if not (inside or allow_absolute_paths):
        raise BadSample(
            "path_outside_root",
            f"{where}: image path {image!r} leaves {data_file.parent}, the folder of "
            f"{data_file.name}",
        )
    return path if path.is_absolute() else data_file.parent / path
