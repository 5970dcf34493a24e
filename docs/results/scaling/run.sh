#!/bin/bash
# How docs/results/scaling is made (run from the repository root, after `make test` built
# .venv): the whole experiment, then its report copied here.
#
# The experiment takes longer than one session on the 2-core machines (74 runs of 6500 or
# 9750 steps: about 8 h at a 316 GFLOP/s peak, 12.5 h at 134; see docs/results/scaling/README.md), and a
# session's machine keeps nothing but the repository. So every finished run is recorded in runs/ here (record.sh: its config,
# eval.json and environment) and each start seeds OUT with those records: the experiment
# skips a run whose config.yaml matches its own and whose eval.json is at its last step, so
# only the missing runs train. A record made by another config (a changed setting or config
# schema, or OUT at another absolute path, as the configs name the shared tokenizer by its
# path) is stale: the experiment removes the copy in OUT and trains that run again.
# Within one session, a stopped run resumes from OUT as it is (finished runs kept, partial
# ones from their last checkpoint, every 100 steps).
set -e
OUT=${OUT:-runs/scaling-5x}
LEDGER=docs/results/scaling/runs
mkdir -p "$OUT/runs"
if [ -d "$LEDGER" ]; then
    cp -rn "$LEDGER"/. "$OUT/runs/"
fi
.venv/bin/python -m threetowers reproduce --experiment scaling --out "$OUT"
OUT="$OUT" bash docs/results/scaling/record.sh
cp "$OUT"/results.json "$OUT"/results.md "$OUT"/scaling_*.png docs/results/scaling/
