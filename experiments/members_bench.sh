#!/bin/bash
# One run against 4 members in one program (--seeds=0-3), each member form (--members_form: dispatch,
# vmap), seed model, batch 128, interleaved repeats; one JSON line per run, then each form's ratio of
# the members' total images/s to the single run's (medians).
# Usage: bash experiments/members_bench.sh [REPEATS=3] [STEPS=30]
set -euo pipefail
REPEATS=${1:-3}
STEPS=${2:-30}
PY=${PYTHON:-python}
OUT=$(mktemp)
for r in $(seq "$REPEATS"); do
  for run in "--seeds=" "--seeds=0-3 --members_form=dispatch" "--seeds=0-3 --members_form=vmap"; do
    # shellcheck disable=SC2086
    $PY -m dcgan_jax.benchmark --preset=mnist --batch_size=128 --steps="$STEPS" $run \
      2>/dev/null | tail -1 | tee -a "$OUT"
  done
done
$PY - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
one = [r["images_per_sec"] for r in runs if r["members"] == 1]
out = dict(single=[round(x, 1) for x in one])
for form in ("dispatch", "vmap"):
  four = [r["images_per_sec"] for r in runs if r["members"] == 4 and r["members_form"] == form]
  out[f"members4_{form}_total"] = [round(x, 1) for x in four]
  out[f"{form}_ratio_of_medians"] = round(statistics.median(four) / statistics.median(one), 3)
print(json.dumps(out))
PY
