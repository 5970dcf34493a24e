#!/bin/bash
# How docs/results/scaling was made: the scaling experiment at the reproduce preset, 3 seeds
# (run from the repository root, after `make test` built .venv), then its report copied here.
set -e
OUT=${OUT:-runs/scaling}
.venv/bin/python -m threetowers reproduce --experiment scaling --out "$OUT"
cp "$OUT"/results.json "$OUT"/results.md "$OUT"/scaling_*.png docs/results/scaling/
