#!/bin/bash
# How docs/results/open_vocab was made: the experiment at the reproduce preset, 3 seeds, then the
# diagnosis of the MiniLM runs (run from the repository root, after `make test` built .venv).
set -e
OUT=${OUT:-runs/open-vocab}
.venv/bin/python -m threetowers reproduce --experiment open-vocab --out "$OUT"
.venv/bin/python docs/results/open_vocab/diagnose.py "$OUT" > "$OUT/diagnosis.json"
