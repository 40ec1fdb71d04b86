#!/bin/bash
# Sample quality on Fashion-MNIST, scored by `python -m dcgan_jax.evaluate` (10,000 samples each; one JSON
# line per row, prefixed with its label). Needs: data/tfds prepared (README), and
#   WORKDIR  a run of fashion_mnist.flags, e.g. one epoch at batch 128:
#            python -m dcgan_jax.main --flagfile=fashion_mnist.flags --data_dir=data/tfds \
#              --batch_size=128 --num_steps=468 --eval_every=156 --workdir=workdirs/fm_e1
#   REF_NPZ  (optional) samples of the PyTorch reference after the same epoch:
#            python ../shared/bench/quality_ref.py torch --epochs 1 --out DIR   (-> DIR/q_torch_e1.npz)
# Usage: bash experiments/quality_check.sh WORKDIR [REF_NPZ]
set -euo pipefail
WORKDIR=$1; REF_NPZ=${2:-}
PY=${PYTHON:-python}
run() { local label=$1; shift; echo "$label $($PY -m dcgan_jax.evaluate --data_dir=data/tfds "$@" 2>/dev/null)"; }
run untrained --workdir="$WORKDIR" --step=0
# The run's default generator (its EMA one with --g_ema_decay), with running and with batch BatchNorm
# statistics, then the raw generator.
run trained_running_bn --workdir="$WORKDIR"
run trained_batch_bn --workdir="$WORKDIR" --sample_bn=batch
run trained_raw_running_bn --workdir="$WORKDIR" --use_ema=false
run trained_raw_batch_bn --workdir="$WORKDIR" --use_ema=false --sample_bn=batch
if [ -n "$REF_NPZ" ]; then
  run torch_eval_bn --samples="$REF_NPZ" --samples_key=eval --dataset=fashion_mnist
  run torch_train_bn --samples="$REF_NPZ" --samples_key=train --dataset=fashion_mnist
fi
