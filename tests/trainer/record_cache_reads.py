"""``python record_cache_reads.py ARGS``: the ``threetowers`` command, where each process
appends the training feature-cache units it opens to ``$CACHE_READS/rank$RANK.txt``."""

from __future__ import annotations

import os
import sys

from threetowers.cli import main
from threetowers.data.caches.streamed_features import StreamedFeatures

_open_unit = StreamedFeatures._unit


def _recorded(self: StreamedFeatures, unit: int):
    if unit not in self._open:
        record = os.path.join(os.environ["CACHE_READS"], f"rank{os.environ.get('RANK', 0)}.txt")
        with open(record, "a") as handle:
            handle.write(f"{self.units[unit].npy}\n")
    return _open_unit(self, unit)


if __name__ == "__main__":
    StreamedFeatures._unit = _recorded
    sys.exit(main(sys.argv[1:]))
