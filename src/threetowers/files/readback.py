"""Files this tool wrote and reads back: when one is not what it should be, it names itself.

A kill, a full disk or a hand edit can leave ``eval.json`` truncated or a ``manifest.json``
that is a list; the user then needs the file's path and what to do, not a parser's
"Unterminated string (char 18)".
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from threetowers.errors import UserError


class DamagedFileError(UserError, ValueError):
    """A file written by this tool that cannot be read back as it was written."""


def read_json(path: str | Path, fix: str = "delete it to have it written again") -> dict[str, Any]:
    """The JSON object in ``path``; a :class:`DamagedFileError` naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as error:
        raise DamagedFileError(f"{path} is not UTF-8 text ({error.reason}); {fix}") from None
    except json.JSONDecodeError as error:
        raise DamagedFileError(f"{path} is damaged (not JSON: {error}); {fix}") from None
    if not isinstance(data, dict):
        raise DamagedFileError(
            f"{path} is damaged (a JSON {type(data).__name__}, not an object); {fix}"
        )
    return data


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read a MiB at a time (what checksums in manifests record)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
