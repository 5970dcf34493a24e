"""The mixture sweep's figures: drawn with the plots extra, skipped in one line without it."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace

import pytest

from threetowers.errors import MissingExtraError
from threetowers.evaluation.mixture import Mixture
from threetowers.evaluation.sweep_plots import plot_alpha_sweep

MATPLOTLIB = ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")
ROWS = [{"alpha": i / 10, "zeroshot_top1": 40 + i, "i2t_R@1": 30 + i} for i in range(11)]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if it were not installed (imports of it fail, has() says no)."""
    for name in MATPLOTLIB:
        monkeypatch.setitem(sys.modules, name, None)


def test_plot_alpha_sweep_writes_png(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    sweeps = {
        "3t": [{"alpha": i / 10, "zeroshot_top1": 40 + i, "i2t_R@1": 30 + i} for i in range(11)],
        "small": [{"alpha": i / 10, "zeroshot_top1": 20 + i} for i in range(11)],
    }
    path = tmp_path / "plots" / "alpha.png"
    plot_alpha_sweep(sweeps, ["zeroshot_top1", "i2t_R@1"], path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert matplotlib.get_backend() == backend


def test_a_figure_without_the_plots_extra_names_it(tmp_path, no_matplotlib):
    with pytest.raises(MissingExtraError, match=r"pip install 'threetowers\[plots\]'"):
        plot_alpha_sweep({"3t": ROWS}, ["zeroshot_top1"], tmp_path / "alpha.png")


@pytest.mark.parametrize("towers", [("h",), ("h", "t")])
def test_evals_figure_is_skipped_in_one_line_without_the_plots_extra(
    tmp_path, no_matplotlib, caplog, towers
):
    mixture = Mixture(SimpleNamespace(parts=towers))
    rows = ROWS if len(towers) == 1 else [{"weights": {"f": 1.0, "h": 0.0, "t": 0.0}} | ROWS[0]]
    with caplog.at_level(logging.INFO, logger="threetowers"):
        mixture.plot(rows, tmp_path)
    assert not list(tmp_path.iterdir())
    (line,) = caplog.messages
    assert "not drawn" in line and "threetowers[plots]" in line
