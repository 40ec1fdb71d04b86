"""Writes Fashion-MNIST (IDX files) out as a folder of image files, one subfolder per class: the stand-in
for "my own images" in the docs and benchmarks (no colour dataset can be downloaded offline).

    python experiments/write_image_folder.py --idx_dir=/usr/share/datasets/fashion-mnist \
        --out=/tmp/fashion_png [--count=60000] [--format=png] [--size=28] [--colour]

--colour tints each garment with a colour drawn from its index (a fixed seed), so that a 3-channel model
has colour to learn; --size resizes (e.g. 218x178-like tests use --size=218 --width=178, JPEG).
"""
import argparse
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from dcgan_jax import prepare_data  # pylint: disable=g-import-not-at-top,wrong-import-position

CLASSES = ("t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle_boot")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
  parser.add_argument("--out", required=True)
  parser.add_argument("--split", default="train")
  parser.add_argument("--count", type=int, default=None, help="the first COUNT images (default all)")
  parser.add_argument("--format", default="png", choices=["png", "jpeg", "bmp", "gif", "webp"])
  parser.add_argument("--size", type=int, default=28, help="height")
  parser.add_argument("--width", type=int, default=None, help="default: --size")
  parser.add_argument("--colour", action="store_true")
  parser.add_argument("--flat", action="store_true", help="no class subfolders")
  args = parser.parse_args()
  images, labels = prepare_data.read_split(args.idx_dir, args.split)
  count = len(images) if args.count is None else args.count
  tints = np.random.default_rng(0).uniform(0.3, 1.0, (count, 3))
  for i in range(count):
    x = images[i % len(images), :, :, 0]
    img = Image.fromarray(x)
    if args.colour:
      img = Image.fromarray(np.round(x[..., None] * tints[i]).astype(np.uint8))
    if (args.size, args.width or args.size) != (28, 28):
      img = img.resize((args.width or args.size, args.size), Image.Resampling.BILINEAR)
    folder = args.out if args.flat else os.path.join(args.out, CLASSES[labels[i % len(labels)]])
    os.makedirs(folder, exist_ok=True)
    img.save(os.path.join(folder, f"{i:06d}.{'jpg' if args.format == 'jpeg' else args.format}"),
             quality=90) if args.format == "jpeg" else img.save(
                 os.path.join(folder, f"{i:06d}.{args.format}"))
  print(f"wrote {count} {args.format} files to {args.out}")


if __name__ == "__main__":
  main()
