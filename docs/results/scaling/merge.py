"""How results.json, results.md and the figures here were put together from two runs of
the experiment: the first full run (first-run.json, every axis at 1300 steps) for the pairs
and third axes, whose points and code are what the experiment runs now, and a rerun of the
towers axis alone at 2.5x the steps (``reproduce.scaling_axes=[towers]``, run.sh) for that
axis and the step check, reported by the experiment's own code.

Usage (from the repository root): .venv/bin/python docs/results/scaling/merge.py TOWERS_OUT
"""

import json
import sys
from pathlib import Path

from threetowers.config import load_config
from threetowers.experiments.scaling import axis_steps
from threetowers.experiments.scaling_report import write_report

here = Path(__file__).parent
towers_out = Path(sys.argv[1])
first = json.loads((here / "first-run.json").read_text())
towers = json.loads((towers_out / "results.json").read_text())
records = [r for r in first["runs"] if r["size_axis"] != "towers"] + towers["runs"]
cfg = load_config(towers_out / "config.yaml", ["reproduce.scaling_axes=[pairs,towers,third]"])
write_report(here, cfg, records, towers["step_check"], axis_steps(cfg))
