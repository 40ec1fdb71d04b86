#!/bin/bash
# One epoch of Fashion-MNIST (batch 128, 468 steps) per seed, all seeds in one program (--seeds: one
# member per seed, each the single run of its seed, in OUT_DIR/seed_<s>), with this checkout's code; ends
# with the members' study table (python -m dcgan_jax.study OUT_DIR: mean ± std over the seeds) of the
# final in-training scores (FID etc. on 2,000 samples from the fixed evaluation noise: EMA generator,
# and the raw one as *_raw). Needs data/tfds prepared (README). To compare two versions of the code, run
# it in a checkout of each (git worktree add DIR COMMIT; then cd DIR and bash experiments/seed_study.sh ...).
# Usage: bash experiments/seed_study.sh OUT_DIR SEEDS [SWEEP]   (SEEDS as --seeds takes them: 0-2 or
# 0,1,2; SWEEP as --sweep, e.g. 'learning_rate_d:1e-4,2e-4': one configuration per value; about 3 min
# per member on 2 CPU cores). Also writes the study's report, OUT_DIR.report/index.html.
set -euo pipefail
OUT=$1
SEEDS=$2
SWEEP=${3:-}
PY=${PYTHON:-python}
DATA=${DATA_DIR:-data/tfds}
mkdir -p "$OUT"
$PY -m dcgan_jax.main --flagfile=fashion_mnist.flags --data_dir="$DATA" --batch_size=128 \
  --num_steps=468 --eval_every=468 --sample_every=468 --seeds="$SEEDS" --sweep="$SWEEP" --workdir="$OUT" \
  > "$OUT.log" 2>&1
grep 'step 468 |' "$OUT.log" | sed 's/.*\] //'
$PY -m dcgan_jax.study --report="$OUT.report" "$OUT"
