#!/bin/bash
# How docs/results/scaling is made (run from the repository root, after `make test` built
# .venv): the whole experiment, then its report copied here. A stopped run resumes where it
# stopped when started again with the same OUT (finished runs are kept, partial ones resume
# from their last checkpoint).
set -e
OUT=${OUT:-runs/scaling-5x}
.venv/bin/python -m threetowers reproduce --experiment scaling --out "$OUT"
cp "$OUT"/results.json "$OUT"/results.md "$OUT"/scaling_*.png docs/results/scaling/
