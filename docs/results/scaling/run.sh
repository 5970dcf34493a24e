#!/bin/bash
# How docs/results/scaling was made (run from the repository root, after `make test` built
# .venv). The whole experiment is one command, `threetowers reproduce --experiment scaling`;
# the files here come from two runs of it: the first full run (first-run.json: its pairs and
# third axes are the runs the command makes now; its towers axis was at 1300 steps, which
# the step check found too few) and the towers axis alone at 2.5x the steps, merged by
# merge.py.
set -e
OUT=${OUT:-runs/scaling-towers}
.venv/bin/python -m threetowers reproduce --experiment scaling --out "$OUT" \
    "reproduce.scaling_axes=[towers]"
.venv/bin/python docs/results/scaling/merge.py "$OUT"
