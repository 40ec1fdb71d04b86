#!/bin/bash
# What the training loop's stop agreement (parallel.StopAgreement: a max over all devices after each
# call) costs: the seed model at batch 128 with and without it, interleaved repeats, one JSON line each.
#   bash experiments/stop_agreement_bench.sh [repeats]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for r in $(seq ${1:-3}); do
  for flag in --stop_agreement --nostop_agreement; do
    $PY -m dcgan_jax.benchmark --batch_size=128 --steps=60 --warmup=3 $flag 2>/dev/null | grep '^{' |
      $PY -c 'import json,sys; d=json.loads(sys.stdin.read()); print(json.dumps({k: d[k] for k in ("stop_agreement", "images_per_sec", "devices", "batch_size", "steps")}))'
  done
done
