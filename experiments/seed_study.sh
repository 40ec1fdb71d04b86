#!/bin/bash
# One epoch of Fashion-MNIST (batch 128, 468 steps) per seed, with this checkout's code; prints each run's
# final in-training scores (FID etc. on 2,000 samples from the fixed evaluation noise: EMA generator, and
# the raw one as *_raw), then all of OUT_DIR's runs as one table (python -m dcgan_jax.study: mean ± std
# over the seeds of each configuration). Needs data/tfds prepared (README). To compare two versions of the code, run it
# in a checkout of each (git worktree add DIR COMMIT; then cd DIR and bash experiments/seed_study.sh ...).
# Usage: bash experiments/seed_study.sh OUT_DIR SEED [SEED ...]   (about 5 min per seed on 2 CPU cores)
set -euo pipefail
OUT=$1; shift
PY=${PYTHON:-python}
DATA=${DATA_DIR:-data/tfds}
mkdir -p "$OUT"
for seed in "$@"; do
  $PY -m dcgan_jax.main --flagfile=fashion_mnist.flags --data_dir="$DATA" --batch_size=128 \
    --num_steps=468 --eval_every=468 --sample_every=468 --seed="$seed" --workdir="$OUT/seed$seed" \
    > "$OUT/seed$seed.log" 2>&1
  echo "seed $seed: $(grep 'step 468 |' "$OUT/seed$seed.log" | sed 's/.*step 468 | //')"
done
$PY -m dcgan_jax.study "$OUT"
