#!/bin/bash
# How docs/results/analysis was made: `threetowers analyze` on seed 0 of the full
# `threetowers reproduce` (runs/reproduce, 1300 steps, world version 4): CLIP and 3T in each
# pretraining setting of the third tower.
set -euo pipefail
for run in none-clip matched-3t mismatched-3t imagenet-3t; do
  threetowers analyze "runs/reproduce/runs/$run-seed0" --out "docs/results/analysis/$run" \
    > "docs/results/analysis/$run.txt"
done
