#!/bin/bash
# Step cost of each variant of experiments/variants/ (the settings that change the step; learning rates
# do not), seed model, batch 128, one JSON line per variant from python -m dcgan_jax.benchmark:
# sec_per_step (a G step with its --d_steps D updates), images_per_sec, compile_sec.
# Usage: bash experiments/variants_bench.sh [STEPS=10]
set -euo pipefail
STEPS=${1:-10}
PY=${PYTHON:-python}
while read -r name settings; do
  # shellcheck disable=SC2086
  $PY -m dcgan_jax.benchmark --preset=mnist --batch_size=128 --steps="$STEPS" $settings 2>/dev/null \
    | tail -1 | $PY -c "import json, sys; r = json.loads(sys.stdin.read()); print(json.dumps(dict(
        variant='$name', **{k: r[k] for k in ('sec_per_step', 'images_per_sec', 'compile_sec', 'backend')})))"
done <<'VARIANTS'
default
least_squares --loss=least_squares
hinge --loss=hinge
wgan_gp --loss=wasserstein --gp_weight=10 --d_steps=5
r1 --r1_weight=1 --r1_every=4
spectral_hinge --loss=hinge --d_norm=spectral
VARIANTS
