#!/bin/bash
# 3T with the matched classifier alone, EfficientNet-Lite0 alone, and both; validation splits, 3 seeds.
set -e
W=${W:?the checkout to run}; OUT=${OUT:?where to write}
export PYTHONPATH=$W/src OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PY=${PY:-.venv/bin/python}
cd $OUT
[ -f matched.json ] || $PY -m threetowers pretrain reproduce pretrain.world_set=objects pretrain.out=$OUT/matched.safetensors --quiet > pretrain.log 2>&1
M="{name: m, backbone: checkpoint, path: $OUT/matched.safetensors, image_size: 64}"
E="{name: e, backbone: efficientnet_lite0, image_size: 64}"
run() { # setting seed frozen
  $PY -m threetowers train reproduce --quiet --run-dir $OUT/runs/$1-seed$2 "model.frozen=[$3]" \
    eval.retrieval_split=val eval.zeroshot_split=val train.seed=$2 data.cache_dir=$OUT/cache \
    data.world.dir=$OUT/worlds/default > $OUT/logs/$1-seed$2.log 2>&1 && echo done $1 $2
}
export -f run; export PY OUT
mkdir -p logs
run matched 0 "$M" & run imagenet 0 "$E" & wait
run both 0 "$M, $E" & run matched 1 "$M" & wait
run imagenet 1 "$E" & run both 1 "$M, $E" & wait
run matched 2 "$M" & run imagenet 2 "$E" & wait
run both 2 "$M, $E"
echo ALL DONE
