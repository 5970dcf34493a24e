"""Several training sources read as one: their shards side by side, each shard's source
known, so that samples can be drawn in proportion to the sources' weights (resampling, see
``plan.Resampled``) and counted per source (``data/source/NAME/samples``)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from threetowers.data.sources.bad_samples import Skipped, SourceError
from threetowers.data.sources.plan import Resampled, source_weights
from threetowers.data.sources.shards import ShardPairs
from threetowers.data.sources.table import PairTable


@dataclass(frozen=True)
class SourceMix:
    names: tuple[str, ...]
    weights: tuple[float, ...]
    of_shard: dict[str, int]  # a shard, as the sources spell it -> its source's position

    def resampled(self, pairs: ShardPairs) -> Resampled:
        """Shard weights that draw each source in proportion to its weight."""
        sources = [self.of_shard[str(shard)] for shard in pairs.shards]
        return Resampled(source_weights(pairs.sizes, sources, self.weights))

    def name_of(self, sample_id: str) -> str:
        """The source of a shard sample (``SHARD/KEY``; a key may hold slashes too)."""
        head = sample_id
        while "/" in head:
            head = head.rpartition("/")[0]
            if head in self.of_shard:
                return self.names[self.of_shard[head]]
        raise KeyError(f"{sample_id!r} is no sample of the training shards")


class SourceCounts:
    """The samples drawn from each source so far, bad ones included and also counted apart
    (``data/source/NAME/samples``, ``.../bad_samples``); nothing with a single source. Its
    state goes into checkpoints, like the bad-sample counts."""

    def __init__(self, mix: SourceMix | None) -> None:
        self.mix = mix if mix is not None and len(mix.names) > 1 else None
        self.samples: Counter[str] = Counter()
        self.bad: Counter[str] = Counter()

    def of(self, ids: Sequence[str], skipped: Sequence[Skipped]) -> list[int]:
        """One rank's share of a batch as numbers to add over the ranks: its samples by
        source (bad ones included), then its bad samples by source; [] with one source."""
        if self.mix is None:
            return []
        bad = Counter(self.mix.name_of(sample.id) for sample in skipped)
        drawn = Counter(map(self.mix.name_of, ids)) + bad
        return [drawn[name] for name in self.mix.names] + [bad[name] for name in self.mix.names]

    def record(self, summed: Sequence[int]) -> None:
        """A global batch: the ranks' :meth:`of`, added."""
        if self.mix is None:
            return
        names = self.mix.names
        self.samples.update({n: k for n, k in zip(names, summed, strict=False) if k})
        self.bad.update({n: k for n, k in zip(names, summed[len(names) :], strict=True) if k})

    def metrics(self) -> dict[str, int]:
        names = self.mix.names if self.mix else ()
        return {f"data/source/{n}/samples": self.samples[n] for n in names} | {
            f"data/source/{n}/bad_samples": self.bad[n] for n in names
        }

    def state_dict(self) -> dict[str, Any]:
        return {"samples": dict(self.samples), "bad": dict(self.bad)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples = Counter({str(k): int(v) for k, v in state["samples"].items()})
        self.bad = Counter({str(k): int(v) for k, v in state["bad"].items()})


def open_sources(
    sources: Sequence[tuple[str, object, float]], open_one: Callable[[object], object]
) -> tuple[PairTable | ShardPairs, SourceMix | None]:
    """``sources`` (name, source, weight) opened by ``open_one`` and joined: one source as it
    is, several as one :class:`ShardPairs` (tables cannot be joined: their rows are their
    own) and the mix that says which shard is whose."""
    opened = [open_one(source) for _, source, _ in sources]
    tables = [
        name for (name, _, _), pairs in zip(sources, opened, strict=True) if not _shards(pairs)
    ]
    if len(opened) > 1 and tables:
        raise SourceError(
            f"data.train: several sources must each be .tar or .parquet shards; {tables[0]!r} "
            "is a table (write it as shards, or train on it alone)"
        )
    if not _shards(opened[0]):
        return opened[0], None
    names = tuple(name for name, _, _ in sources)
    weights = tuple(weight for _, _, weight in sources)
    of_shard = {str(shard): k for k, pairs in enumerate(opened) for shard in pairs.shards}
    shards = [shard for pairs in opened for shard in pairs.shards]
    joined = opened[0] if len(opened) == 1 else ShardPairs(shards, opened[0].fields)
    return joined, SourceMix(names, weights, of_shard)


def _shards(pairs) -> bool:
    return isinstance(pairs, ShardPairs)
