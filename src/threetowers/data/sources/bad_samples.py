"""Bad samples: skipped, counted by reason, the first few named; too many stop the run.

Decoding raises :class:`BadSample` for a sample that cannot be used (a corrupt image, a
missing file, no usable caption, a malformed row, ...). The loader turns it into a
:class:`Skipped` record that travels inside its batch, so counts stay exact with any number
of loader worker processes and need no shared state. :class:`BadSampleLog` is the policy:
it counts every visit of a bad sample, names the first few in the log, reports the counts
for ``metrics.jsonl``, and raises :class:`BadDataError` once more than ``max_fraction`` of
the visited samples were bad. Its state goes into checkpoints, so a resumed run reports
the same totals as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from threetowers.errors import UserError

log = logging.getLogger(__name__)

# Why a sample was skipped; the names are stable (they are metric keys).
REASONS = {
    "missing_file": "the image file is missing or unreadable",
    "undecodable_image": "corrupt, truncated, empty or unknown image data",
    "oversized_image": "more pixels than the decompression-bomb limit",
    "no_image": "a shard sample without an image member (parquet: a null image)",
    "no_caption": "no caption at all",
    "empty_caption": "only empty or whitespace captions",
    "overlong_caption": "only absurdly long captions",
    "caption_not_utf8": "caption bytes that are not UTF-8",
    "malformed_row": "a table row or shard sample that cannot be parsed",
    "path_outside_root": "an image path that leaves the dataset's folder",
    "truncated_shard": "a tar shard cut off in this sample (or unreadable from its start), "
    "or a parquet file or row group that cannot be read",
    "compressed_shard": "a compressed tar shard whose name does not say so (one per shard)",
    "member_too_large": "a shard member larger than its kind's limit (left unread)",
    "unreachable_shard": "a remote shard of which nothing could be read, after its retries "
    "(one per shard)",
}
# What to do about each reason, added to the error that stops a run.
_FIXES = {
    "path_outside_root": "if the table's absolute or '..' paths are intended, set "
    "data.allow_absolute_paths=true",
    "missing_file": "image paths in a table or parquet file are relative to its folder",
    "malformed_row": "data.image_key and data.caption_key name other columns or keys, and a "
    "JSONL file holds one JSON object per line",
    "compressed_shard": "decompress shards that are compressed but named .tar (e.g. "
    "gunzip -c X.tar > plain/X.tar)",
    "unreachable_shard": "check that remote shards' URLs (or pipe: commands) read from here, "
    "e.g. with curl -I URL",
}
NAMED = 10  # bad samples named in the log (and kept as examples) per log
# Visits before the bad fraction is judged: a few bad samples in the first batches must not
# stop a run whose overall rate is fine. At a true rate of half the limit (0.5% of 1%),
# 2000 visits stop a good run with probability ~1e-3; a pass shorter than this is judged
# at its end.
GRACE = 2000


class BadSample(Exception):
    """This sample cannot be used; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail

    def skipped(self, sample_id: str) -> Skipped:
        return Skipped(sample_id, self.reason, self.detail)


@dataclass(frozen=True)
class Skipped:
    """A bad sample as it travels in a batch: its id (``SHARD/KEY``, a table's key, an
    image's path), why, and where (in ``detail``)."""

    id: str
    reason: str
    detail: str


class BadDataError(UserError, ValueError):
    """More of the data was bad than ``data.max_bad_fraction`` allows."""


class SourceError(UserError, ValueError):
    """A data source that cannot be read as given: its format, its files or their columns."""


class BadSampleLog:
    """Counts of bad samples among the samples visited by one pass (training, caching, ...)."""

    def __init__(self, max_fraction: float, what: str, size: int | None = None) -> None:
        """``size``: samples in one pass (an epoch) when known; a shorter pass than
        :data:`GRACE` is judged once it has been visited whole."""
        self.max_fraction, self.what = max_fraction, what
        self.grace = GRACE if size is None else max(1, min(GRACE, size))
        self.seen = 0
        self.counts: Counter[str] = Counter()
        self.examples: list[Skipped] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def record(self, used: int, skipped: list[Skipped]) -> None:
        """One batch: ``used`` good samples and the ``skipped`` bad ones."""
        self.record_counts(used, Counter(bad.reason for bad in skipped), skipped)

    @property
    def naming(self) -> bool:
        """Whether the next bad samples are named (else only counted)."""
        return len(self.examples) < NAMED

    def record_counts(self, used: int, reasons: Counter[str], named: list[Skipped]) -> None:
        """One batch: ``used`` good samples and bad ones counted by reason; ``named``, those
        bad samples in order, is read only while :attr:`naming`."""
        self.seen += used + sum(reasons.values())
        self.counts.update({reason: n for reason, n in reasons.items() if n})  # no 0 metric
        for bad in named:
            if self.naming:
                self.examples.append(bad)
                log.warning(
                    "%s: skipped sample %r (%s): %s", self.what, bad.id, bad.reason, bad.detail
                )
                if len(self.examples) == NAMED:
                    log.warning("%s: further bad samples are counted, not named", self.what)
        if self.seen >= self.grace:
            self.check()

    def check(self) -> None:
        """Raise :class:`BadDataError` if the bad fraction so far is above the limit."""
        if self.total > self.max_fraction * self.seen:
            raise BadDataError(self._too_many())

    def metrics(self) -> dict[str, int]:
        """Cumulative counts for ``metrics.jsonl``: the total and one entry per reason."""
        out = {"data/bad_samples": self.total, "data/samples": self.seen}
        return out | {f"data/bad_samples/{reason}": n for reason, n in sorted(self.counts.items())}

    def summary(self) -> str:
        if not self.total:
            return f"{self.what}: no bad samples in {self.seen}"
        return f"{self.what}: skipped {self.total} bad of {self.seen} samples ({self._reasons()})"

    def state_dict(self) -> dict[str, Any]:
        """Plain containers only (checkpoints are read with ``weights_only=True``)."""
        return {
            "seen": self.seen,
            "counts": dict(self.counts),
            "examples": [[s.id, s.reason, s.detail] for s in self.examples],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.counts = Counter({str(k): int(v) for k, v in state["counts"].items()})
        self.examples = [Skipped(*map(str, example)) for example in state["examples"]]

    def _reasons(self) -> str:
        return ", ".join(f"{n} {reason}" for reason, n in self.counts.most_common())

    def _too_many(self) -> str:
        return (
            f"{self.what}: {self.total} of {self.seen} samples were bad "
            f"({self.total / self.seen:.1%}; {self._reasons()}), more than "
            f"data.max_bad_fraction={self.max_fraction}. {self._examples_and_fixes()}, or "
            "raise data.max_bad_fraction if this much bad data is expected"
        )

    def _examples_and_fixes(self) -> str:
        shown = "\n".join(f"  {s.id!r}: {s.reason}: {s.detail}" for s in self.examples[:5])
        fixes = [_FIXES[r] for r in self.counts if r in _FIXES]
        return (
            f"First examples:\n{shown}\n"
            + "".join(f"{fix}; " for fix in fixes)
            + ("fix or remove these samples")
        )


def refuse_known_bad(what: str, size: int, skipped: list[Skipped], max_fraction: float) -> None:
    """Samples known to be bad before any is read (a table's malformed rows and refused
    paths): when no sample is left, or they alone pass ``max_fraction``, stop now, naming
    them, rather than after a tokenizer and caches are built on what is left. Counts
    nothing: the pass that meets them counts them."""
    if not skipped or (len(skipped) < size and len(skipped) <= max_fraction * size):
        return
    known = BadSampleLog(max_fraction, what, size)
    known.seen, known.counts = size, Counter(bad.reason for bad in skipped)
    known.examples = skipped[:NAMED]
    if len(skipped) < size:
        raise BadDataError(known._too_many())
    raise BadDataError(
        f"{what}: none of its {size} samples can be used ({known._reasons()}). "
        + known._examples_and_fixes()
    )
