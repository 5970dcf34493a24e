#!/bin/bash
# Records each finished run of the scaling experiment in OUT (default runs/scaling-5x) in
# docs/results/scaling/runs/NAME: config.yaml, eval.json (at the run's last step) and
# environment.json, the files the report and the experiment's skip read, and what made the
# run. Safe while the experiment trains: a run still training has no eval.json at its last
# step. See run.sh.
set -e
OUT=${OUT:-runs/scaling-5x}
.venv/bin/python - "$OUT/runs" docs/results/scaling/runs <<'PY'
import shutil
import sys
from pathlib import Path

import yaml

from threetowers.trainer.loop import evaluated_step

runs, ledger = Path(sys.argv[1]), Path(sys.argv[2])
recorded = 0
for run in sorted(runs.iterdir()):
    config = run / "config.yaml"
    if not config.exists():
        continue
    if evaluated_step(run) != yaml.safe_load(config.read_text())["train"]["steps"]:
        continue
    (ledger / run.name).mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "eval.json", "environment.json"):
        shutil.copyfile(run / name, ledger / run.name / name)
    recorded += 1
print(f"{recorded} finished runs recorded in {ledger}")
PY
