#!/bin/bash
# The dcgan preset trained on "your own images": Fashion-MNIST written out as a folder of PNG files (one
# subfolder per class), imported at 32x32 and at 64x64, trained by index from the imported datasets,
# FID every 250 steps. Offline; needs `apt-get install dataset-fashion-mnist`.
#
#   bash experiments/image_folder_dcgan.sh [32|64|both] [steps]
#
# Writes data/fashion_png (60,000 PNG files), data/tfds/fashion_png{32,64}, workdirs/fashion_png{32,64}.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${1:-both}; STEPS=${2:-2000}
[ "$SIZES" = both ] && SIZES="32 64"
PY=${PYTHON:-python}
[ -d data/fashion_png ] || $PY experiments/write_image_folder.py --idx_dir=/usr/share/datasets/fashion-mnist \
    --out=data/fashion_png
for S in $SIZES; do
  [ -d data/tfds/fashion_png$S ] || $PY -m dcgan_jax.prepare_data --image_dir=data/fashion_png \
      --dataset=fashion_png$S --data_dir=data/tfds --image_size=$S
  $PY -m dcgan_jax.main --dataset=fashion_png$S --data_dir=data/tfds --preset=dcgan --image_size=$S \
      --batch_size=128 --num_steps=$STEPS --log_every=50 --sample_every=250 --eval_every=250 \
      --eval_samples=2000 --g_ema_decay=0.999 --in_memory=false --workdir=workdirs/fashion_png$S
done
