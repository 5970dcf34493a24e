"""One sample's image and captions, decoded and checked, or :class:`BadSample` saying why not.

Odd but valid images (greyscale, palette, RGBA, 16-bit, CMYK, EXIF-rotated) are converted
to upright RGB by :func:`to_rgb` and used. Everything that cannot be used raises
:class:`BadSample` with a reason, so that the loader can skip and count it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from threetowers.data.sources.bad_samples import BadSample
from threetowers.data.transforms import to_rgb

# Longer captions are junk (scraped page text), not descriptions: web alt-texts run to a few
# hundred characters, and the text tower reads at most its context length of tokens.
MAX_CAPTION_CHARS = 4096


def load_image(data: str | Path | bytes, where: str) -> Image.Image:
    """Decode an image file or bytes to upright RGB.

    Images with more pixels than Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``,
    ~89 megapixels by default) are refused from their header, before any pixel is decoded.
    """
    try:
        with warnings.catch_warnings():
            # Pillow's complaints about damaged metadata would repeat for every such image of
            # a long run; what matters is whether the pixels decode.
            warnings.simplefilter("ignore")
            # Pillow only warns between 1x and 2x its limit; refuse those too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            stream = io.BytesIO(data) if isinstance(data, bytes) else data
            with Image.open(stream) as image:
                image.load()
                return to_rgb(image)
    except UnidentifiedImageError:  # its message holds a memory address: not reproducible
        raise BadSample("undecodable_image", f"{where}: empty or not an image format") from None
    except OSError as error:
        if error.errno is not None and not isinstance(data, bytes):  # the file, not its data
            raise BadSample("missing_file", f"{where}: {error.strerror}: {data}") from None
        raise BadSample("undecodable_image", f"{where}: {error}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise BadSample("oversized_image", f"{where}: {error}") from None
    except Exception as error:  # corrupt data makes Pillow raise almost any exception type
        raise BadSample("undecodable_image", f"{where}: {type(error).__name__}: {error}") from None


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
