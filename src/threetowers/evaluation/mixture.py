"""What 3T's mixture sweep combines: the main pair, each aligned frozen tower's pair and each
frozen pair's own score, the weights it tries, its rows in eval.json and its figure (drawn
where the ``plots`` extra is installed; without it the figure is skipped with one line, the
metrics stay).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from threetowers.errors import has
from threetowers.evaluation import metrics
from threetowers.evaluation.sweep_plots import plot_alpha_grid, plot_alpha_sweep
from threetowers.model.objective import Z_F, Z_G, Structure
from threetowers.model.three_towers import ThreeTowers

SWEEP_METRICS = ("zeroshot_top1", "i2t_R@1", "t2i_R@1")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mixture:
    """The convex combination that ``eval`` sweeps: the main pair (z_f, z_g), each aligned
    frozen tower's pair (z_k, z_gk) and each frozen pair's own (u_pimg, u_ptxt), of the pair's
    width (the parts are concatenated, so widths may differ). One part besides f: α from 0 to
    1 in tenths (``alpha_sweep``, ``alpha_sweep.png``); more: every weight vector in tenths
    (``alpha_grid``, and for two the heat maps ``alpha_grid.png``)."""

    structure: Structure

    @classmethod
    def of(cls, model: ThreeTowers) -> Mixture | None:
        return cls(model.structure) if model.structure.parts else None

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts besides the main pair: the aligned towers', then the frozen pairs'."""
        return self.structure.parts

    @property
    def image_parts(self) -> tuple[str, ...]:
        return (Z_F, *(self.structure.pair(part)[0] for part in self.parts))

    @property
    def text_parts(self) -> tuple[str, ...]:
        return (Z_G, *(self.structure.pair(part)[1] for part in self.parts))

    @property
    def key(self) -> str:
        return "alpha_sweep" if len(self.parts) == 1 else "alpha_grid"

    def grid(self) -> list[tuple[float, ...]]:
        if len(self.parts) == 1:  # as alpha_sweep has always computed its weights
            return [(a, 1.0 - a) for a in metrics.DEFAULT_ALPHAS]
        return metrics.simplex_grid(1 + len(self.parts))

    def sweep(self, images: dict, texts: dict, metric_fn) -> list[dict]:
        image_parts = [images[part] for part in self.image_parts]
        text_parts = [texts[part] for part in self.text_parts]
        return metrics.mixture_sweep(image_parts, text_parts, metric_fn, self.grid())

    def rows(self, sweeps: dict[tuple[float, ...], dict]) -> list[dict]:
        """eval.json's rows: ``{"alpha": a_f, ...}`` (one part besides f, a_f ascending) or
        ``{"weights": {"f": a_f, k: a_k, p: a_p, ...}, ...}`` (grid order)."""
        if len(self.parts) == 1:
            return [{"alpha": w[0]} | row for w, row in sorted(sweeps.items())]
        parts = ("f", *self.parts)
        return [{"weights": dict(zip(parts, w, strict=True))} | row for w, row in sweeps.items()]

    def plot(self, rows: list[dict], out_dir: Path) -> None:
        """The sweep's figure: metrics against α (one part besides f), heat maps (two); none
        for more."""
        if len(self.parts) > 2:
            return
        path = out_dir / ("alpha_sweep.png" if len(self.parts) == 1 else "alpha_grid.png")
        if not has("matplotlib"):
            log.info(
                "%s not drawn: it needs the plots extra (pip install 'threetowers[plots]')", path
            )
            return
        present = [m for m in SWEEP_METRICS if m in rows[0]]
        if len(self.parts) == 1:
            plot_alpha_sweep({"3t": rows}, present, path)
        else:
            plot_alpha_grid(rows, present, self.parts, path)
