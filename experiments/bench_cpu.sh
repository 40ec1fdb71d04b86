#!/usr/bin/env bash
# Side-by-side CPU throughput, seed model, interleaved repeats: one JSON line per run, then one
# summary line per implementation with the median images/s.
#   bash experiments/bench_cpu.sh [BATCH=128] [REPEATS=3]
# dcgan_jax's step is compared with the bench references in ../shared/bench (same model, same
# pytorch/examples "alternating" update order as ours): plain Flax (ref_jax.py), TF/Keras (ref_tf.py),
# and PyTorch eager (ref_torch.py, run with $TORCH_PY, default $PY, when torch is importable). Needs real
# Fashion-MNIST for the references (apt-get install dataset-fashion-mnist); ours uses synthetic data of
# the same shape (the speed of a step does not depend on pixel values).
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH=${1:-128}; REPEATS=${2:-3}; PY=${PY:-python}; TORCH_PY=${TORCH_PY:-$PY}
BENCH=${BENCH_DIR:-../shared/bench}
OUT=$(mktemp)
for r in $(seq "$REPEATS"); do
  $PY -m dcgan_jax.benchmark --preset=mnist --batch_size="$BATCH" --steps=20 --warmup=2 2>/dev/null | tee -a "$OUT"
  (cd "$BENCH" && $PY ref_jax.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null) | tee -a "$OUT"
  (cd "$BENCH" && $PY ref_tf.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null) | tee -a "$OUT"
  if $TORCH_PY -c "import torch" 2>/dev/null; then
    (cd "$BENCH" && $TORCH_PY ref_torch.py --batch "$BATCH" --steps 20 --warmup 3 --alternating 2>/dev/null) | tee -a "$OUT"
  fi
done
$PY - "$OUT" <<'PYEOF'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
  r = json.loads(line)
  runs[r["impl"]].append(r["images_per_sec"])
ours = statistics.median(runs["dcgan_jax"])
for impl, ips in runs.items():
  print(json.dumps(dict(summary=impl, median_images_per_sec=round(statistics.median(ips), 1),
                        runs=[round(x, 1) for x in ips],
                        dcgan_jax_speedup=round(ours / statistics.median(ips), 2))))
PYEOF
rm -f "$OUT"
