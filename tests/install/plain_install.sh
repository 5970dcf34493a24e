#!/usr/bin/env bash
# A plain install (no extras) in a fresh virtual environment trains the tiny preset on the
# embedded world, pulls none of the extras' packages, and `serve` names its extra.
# Usage: bash tests/install/plain_install.sh [VENV]   (make test-plain-install)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=$(realpath -m "${1:-.venv-plain}")
TORCH=torch==2.13.0
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$TORCH"
"$VENV/bin/pip" install --quiet . "$TORCH"

installed=$("$VENV/bin/pip" list --format=freeze | cut -d= -f1 | tr '[:upper:]_' '[:lower:]-')
for extra in faiss-cpu fastapi uvicorn matplotlib transformers playwright; do
    if grep -qx "$extra" <<<"$installed"; then
        echo "FAIL: a plain install pulled $extra"; exit 1
    fi
done

# The embedded world at a few hundred pairs, the tiny preset for a few steps.
world="data.world.dir=$WORK/world data.world.train_pairs=256 data.world.val_pairs=64
  data.world.retrieval_test=64 data.world.retrieval_val=32 data.world.zeroshot_per_class=4
  data.world.zeroshot_val_per_class=2 data.world.pretrain_objects_per_class=2
  data.world.pretrain_scenes_per_class=2 data.world.shard_size=128"
# shellcheck disable=SC2086
"$VENV/bin/threetowers" train tiny $world train.steps=4 train.warmup_steps=1 \
    data.batch_size=32 data.num_workers=0 train.run_dir="$WORK/run" --quiet
test -f "$WORK/run/eval.json" || { echo "FAIL: training wrote no eval.json"; exit 1; }

set +e
message=$(cd "$WORK" && "$VENV/bin/threetowers" serve "$WORK/index" 2>&1)
status=$?
set -e
lines=$(printf '%s\n' "$message" | wc -l)
if [ "$status" -ne 2 ] || [ "$lines" -ne 1 ] || ! grep -q "threetowers\[search\]" <<<"$message"; then
    echo "FAIL: serve without the search extra said (exit $status):"; echo "$message"; exit 1
fi
echo "plain install: trains the tiny preset, no extras pulled; serve says: $message"
