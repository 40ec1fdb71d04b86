#!/bin/bash
# The search behind experiments/fashion_mnist_fast.flags (docs/variants.md, "A faster recipe"): one
# epoch of Fashion-MNIST (469 steps, batch 128) with the seed's `mnist` model, scored by the final
# in-training evaluation (FID etc. on 2,000 samples), then the chosen recipe against the default over
# 5 epochs. Each stage is one or more programs with many members (--sweep, --seeds); the stages' tables
# come from python -m dcgan_jax.study.
#   STAGE=lr:      learning rates of G and D, 3x3 grid, seed 0 (9 members, ~35 min on 2 CPU cores).
#   STAGE=screen:  at G and D 5e-4: Adam betas, EMA decay, D normalisation, a loss; seed 0 (and
#                  seeds 0-2 for --d_norm=batch): 11 members, ~45 min.
#   STAGE=confirm: the default and fashion_mnist_fast.flags, seeds 0-2, 5 epochs (2,345 steps),
#                  evaluated every epoch: the 1-epoch row and the 5-epoch row of each (6 members of
#                  2,345 steps, ~1 h).
# Needs data/tfds prepared (README).
# Usage: bash experiments/fast_recipe_sweep.sh OUT_DIR STAGE
set -euo pipefail
OUT=$1
STAGE=$2
PY=${PYTHON:-python}
DATA=${DATA_DIR:-data/tfds}
HERE=$(cd "$(dirname "$0")" && pwd)
EPOCH=(--flagfile=fashion_mnist.flags --data_dir="$DATA" --batch_size=128 --num_steps=469 --eval_every=469
       --sample_every=469)
FAST_LR=(--learning_rate_g=5e-4 --learning_rate_d=5e-4)
mkdir -p "$OUT"
run() {  # run NAME FLAGS...: one program, its log in OUT/NAME.log, in the background
  local name=$1; shift
  $PY -m dcgan_jax.main "$@" --workdir="$OUT/$name" > "$OUT/$name.log" 2>&1 &
}
case "$STAGE" in
  lr)
    run lr "${EPOCH[@]}" --seeds=0 --sweep='learning_rate_g:2e-4,5e-4,1e-3;learning_rate_d:2e-4,5e-4,1e-3'
    wait
    $PY -m dcgan_jax.study --metrics=fid,kid,coverage,fid_raw "$OUT/lr" ;;
  screen)
    run betas "${EPOCH[@]}" "${FAST_LR[@]}" --seeds=0 --sweep='beta1:0,0.5;beta2:0.9,0.99'
    run ema "${EPOCH[@]}" "${FAST_LR[@]}" --seeds=0 --sweep='g_ema_decay:0.9,0.95'
    run d_batch "${EPOCH[@]}" "${FAST_LR[@]}" --seeds=0-2 --d_norm=batch
    run spectral_hinge "${EPOCH[@]}" --flagfile="$HERE/variants/spectral_hinge.flags" "${FAST_LR[@]}" --seeds=0
    wait
    $PY -m dcgan_jax.study --per_run --metrics=fid,kid,coverage,fid_raw "$OUT/betas" "$OUT/ema" \
      "$OUT/d_batch" "$OUT/spectral_hinge" ;;
  confirm)
    FIVE=(--flagfile=fashion_mnist.flags --data_dir="$DATA" --batch_size=128 --num_steps=2345
          --eval_every=469 --sample_every=469 --seeds=0-2)
    run default "${FIVE[@]}"
    run fast "${FIVE[@]}" --flagfile="$HERE/fashion_mnist_fast.flags"
    wait
    for at in 469 2345; do
      echo "step $at:"
      grep -h "step $at | fid" "$OUT/default.log" "$OUT/fast.log" | sed 's/.*\] //'
    done
    $PY -m dcgan_jax.study --metrics=fid,kid,coverage,class_kl,fid_raw "$OUT/default" "$OUT/fast" ;;
  *) echo "error: STAGE=$STAGE: use lr, screen or confirm" >&2; exit 2 ;;
esac
