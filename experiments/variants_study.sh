#!/bin/bash
# The study of losses, penalties and D normalisations (docs/variants.md): each variant of
# experiments/variants/ and the seed-faithful default, every seed in one program (--seeds), then one
# study table over all variants. Prints each variant's wall time as a JSON line.
#   PART=fashion_mnist: Fashion-MNIST with the seed's `mnist` model; each member's final EMA generator
#     is then scored by dcgan_jax.evaluate with 10,000 samples, and the table holds those scores (FID,
#     KID, precision/recall, class coverage and KL).
#   PART=stacked: stacked Fashion-MNIST (1,000 modes) with the `dcgan` model at 32x32; each member is
#     scored with 26,000 samples (the mode-counting protocol), and the table holds FID, KID,
#     precision/recall, modes and modes_kl.
# Needs data/tfds prepared (README; for stacked also
#   python -m dcgan_jax.prepare_data --dataset=stacked_fashion_mnist --idx_dir=... --data_dir=data/tfds).
# Usage: bash experiments/variants_study.sh OUT_DIR [PART=fashion_mnist] [STEPS=469] [SEEDS=0-2] [VARIANTS]
set -euo pipefail
OUT=$1
PART=${2:-fashion_mnist}
STEPS=${3:-469}
SEEDS=${4:-0-2}
VARIANTS=${5:-default least_squares hinge wgan_gp r1 spectral_hinge}
PY=${PYTHON:-python}
DATA=${DATA_DIR:-data/tfds}
HERE=$(cd "$(dirname "$0")" && pwd)
case "$PART" in
  fashion_mnist) MODEL=(); EVAL_SAMPLES=10000; METRICS=fid,kid,precision,recall,coverage,class_kl ;;
  stacked) MODEL=(--dataset=stacked_fashion_mnist --preset=dcgan --image_size=32); EVAL_SAMPLES=26000
    METRICS=fid,kid,precision,recall,modes,modes_kl ;;
  *) echo "error: PART=$PART: use fashion_mnist or stacked" >&2; exit 2 ;;
esac
mkdir -p "$OUT"
for v in $VARIANTS; do
  extra=()
  [ "$v" != default ] && extra=(--flagfile="$HERE/variants/$v.flags")
  start=$(date +%s)
  $PY -m dcgan_jax.main --flagfile=fashion_mnist.flags "${MODEL[@]}" "${extra[@]}" --data_dir="$DATA" \
    --batch_size=128 --num_steps="$STEPS" --eval_every="$STEPS" --sample_every="$STEPS" --seeds="$SEEDS" \
    --workdir="$OUT/$v" > "$OUT/$v.log" 2>&1
  for member in "$OUT/$v"/seed_*; do
    $PY -m dcgan_jax.evaluate --workdir="$member" --data_dir="$DATA" --num_samples="$EVAL_SAMPLES" \
      >> "$OUT/$v.log" 2>&1
  done
  echo "{\"variant\": \"$v\", \"part\": \"$PART\", \"steps\": $STEPS, \"seeds\": \"$SEEDS\", \"wall_sec\": $(( $(date +%s) - start ))}"
done
dirs=()
for v in $VARIANTS; do dirs+=("$OUT/$v"); done
$PY -m dcgan_jax.study --source=evaluations --metrics="$METRICS" "${dirs[@]}"
