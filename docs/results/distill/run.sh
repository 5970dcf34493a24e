#!/bin/bash
# How docs/results/distill is made (run from the repository root, after `make test` built
# .venv): the teacher, its export and the 15 students (3 seeds) at the reproduce preset on two
# workers, then the report copied here. A stopped command resumes: finished runs are kept,
# an interrupted one continues from its last checkpoint.
set -e
OUT=${OUT:-runs/distill}
HF_HUB_OFFLINE=1 .venv/bin/python -m threetowers reproduce --experiment distill --out "$OUT"
cp "$OUT"/results.json "$OUT"/results.md "$OUT"/distill.png docs/results/distill/
