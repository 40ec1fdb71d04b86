#!/bin/bash
# The study of losses, penalties and D normalisations (docs/variants.md): each variant of
# experiments/variants/ and the seed-faithful default, every seed in one program (--seeds), on
# Fashion-MNIST with the seed's `mnist` model; ends with the study table over all variants (final
# in-training scores on 2,000 samples: FID, KID, class coverage and KL; *_raw of the raw generator).
# Prints each variant's wall time. Needs data/tfds prepared (README).
# Usage: bash experiments/variants_study.sh OUT_DIR [STEPS=469] [SEEDS=0-2] [VARIANTS="default least_squares ..."]
set -euo pipefail
OUT=$1
STEPS=${2:-469}
SEEDS=${3:-0-2}
VARIANTS=${4:-default least_squares hinge wgan_gp r1 spectral_hinge}
PY=${PYTHON:-python}
DATA=${DATA_DIR:-data/tfds}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
for v in $VARIANTS; do
  extra=()
  [ "$v" != default ] && extra=(--flagfile="$HERE/variants/$v.flags")
  start=$(date +%s)
  $PY -m dcgan_jax.main --flagfile=fashion_mnist.flags "${extra[@]}" --data_dir="$DATA" --batch_size=128 \
    --num_steps="$STEPS" --eval_every="$STEPS" --sample_every="$STEPS" --seeds="$SEEDS" \
    --workdir="$OUT/$v" > "$OUT/$v.log" 2>&1
  echo "{\"variant\": \"$v\", \"steps\": $STEPS, \"seeds\": \"$SEEDS\", \"wall_sec\": $(( $(date +%s) - start ))}"
done
# shellcheck disable=SC2046
$PY -m dcgan_jax.study --metrics=fid,kid,coverage,class_kl,fid_raw $(for v in $VARIANTS; do echo "$OUT/$v"; done)
