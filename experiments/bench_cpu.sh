#!/usr/bin/env bash
# Side-by-side CPU throughput, seed model, interleaved repeats; one JSON line per run on stdout.
#   bash experiments/bench_cpu.sh [BATCH=128] [REPEATS=2]
# dcgan_jax's step is compared with the bench references in ../shared/bench (same model, same
# pytorch/examples "alternating" update order as ours): plain Flax (ref_jax.py), TF/Keras (ref_tf.py),
# and PyTorch eager (ref_torch.py) when torch is importable. Needs real Fashion-MNIST for the references
# (apt-get install dataset-fashion-mnist); ours uses synthetic data of the same shape.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-128}; REPEATS=${2:-2}; PY=${PY:-python}
BENCH=${BENCH_DIR:-../shared/bench}
for r in $(seq "$REPEATS"); do
  $PY -m dcgan_jax.benchmark --preset=mnist --batch_size="$BATCH" --steps=20 --warmup=2 2>/dev/null
  (cd "$BENCH" && $PY ref_jax.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null)
  (cd "$BENCH" && $PY ref_tf.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null)
  if $PY -c "import torch" 2>/dev/null; then
    (cd "$BENCH" && $PY ref_torch.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null)
  fi
done
