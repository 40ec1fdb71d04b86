#!/bin/bash
# The random-access path at scale, on generated "own images": reader speed, training fed by it, and peak
# host memory on two dataset sizes. Offline; needs `apt-get install dataset-fashion-mnist`.
#
#   bash experiments/data_scale_check.sh
#
#  1. Fashion-MNIST as 60,000 PNG files, imported at 28x28: the seed's model trained from memory and
#     by index (data_benchmark: reader alone, both training paths, their ratio).
#  2. CelebA-like folders: 2,000 and 20,000 colourised Fashion-MNIST images resized to 218x178 and saved
#     as JPEG (the decoded 20,000 are 2.3 GB), each imported at 64x64 (peak RSS of the import from
#     /usr/bin/time), then the dcgan preset trained by index only (--nocompare_in_memory): the reader's
#     images/s and the process's peak RSS for each size.
# One JSON line per measurement on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
IDX=/usr/share/datasets/fashion-mnist
quiet() { "$@" 2>/dev/null | grep '^{'; }
[ -d data/fashion_png ] || $PY experiments/write_image_folder.py --idx_dir=$IDX --out=data/fashion_png
[ -d data/tfds/fashion_png28 ] || quiet $PY -m dcgan_jax.prepare_data --image_dir=data/fashion_png \
    --dataset=fashion_png28 --data_dir=data/tfds --image_size=28
quiet $PY -m dcgan_jax.data_benchmark --dataset=fashion_png28 --data_dir=data/tfds --preset=mnist \
    --batch_size=128 --steps=100
for N in 2000 20000; do
  [ -d data/faces_jpeg_$N ] || $PY experiments/write_image_folder.py --idx_dir=$IDX --out=data/faces_jpeg_$N \
      --count=$N --size=218 --width=178 --colour --format=jpeg --flat >/dev/null
  if [ ! -d data/tfds/faces$N ]; then
    /usr/bin/time -f %M -o data/import_rss_kb_$N $PY -m dcgan_jax.prepare_data --image_dir=data/faces_jpeg_$N \
        --dataset=faces$N --data_dir=data/tfds --image_size=64 2>/dev/null > data/import_$N.json
    $PY -c "import json; r = json.load(open('data/import_$N.json'))
r['import_peak_rss_mb'] = round(int(open('data/import_rss_kb_$N').read()) / 1024, 1); print(json.dumps(r))"
  fi
  quiet $PY -m dcgan_jax.data_benchmark --dataset=faces$N --data_dir=data/tfds --preset=dcgan \
      --image_size=64 --batch_size=128 --steps=20 --warmup=2 --nocompare_in_memory
done
