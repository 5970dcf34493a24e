"""A crafted pickle: what a weights file must never be allowed to run."""

from __future__ import annotations


class Exploit:
    """Unpickling this runs code: here it creates a marker file, elsewhere anything."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
