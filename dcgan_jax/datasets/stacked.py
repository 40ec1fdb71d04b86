"""Stacked datasets with 1,000 modes, and counting the modes a generator covers. No JAX, no TensorFlow.

    python -m dcgan_jax.prepare_data --dataset=stacked_fashion_mnist \
        --idx_dir=/usr/share/datasets/fashion-mnist --data_dir=data/tfds [--stack_seed=0]

Stacked MNIST (Metz et al. 2017, "Unrolled GANs"; VEEGAN, PacGAN) puts three independently drawn
digits into the R, G and B channels of one 28x28x3 image: 10 x 10 x 10 = 1,000 modes, the label
100 * class(R) + 10 * class(G) + class(B). Here the same is built from Fashion-MNIST (or MNIST for users
who can fetch it): example i of a split draws its three source images uniformly with replacement from
that split, from a numpy generator seeded by (--stack_seed, split), so one seed gives one dataset, byte
for byte. Each split has the source split's number of examples (60,000 / 10,000).

Mode counting (the PacGAN/VEEGAN protocol): each channel of each generated image is classified by the
source dataset's evaluator (evaluator.py's classifier for fashion_mnist); the three classes give the
image's mode. Reported: `modes` covered (modes with at least one sample, of 1,000) and `modes_kl`, the
KL divergence KL(p_generated || uniform) of the mode histogram (0 when every mode is equally frequent;
log 1000 = 6.91 for a generator stuck on one mode). The protocol scores 26,000 samples.
"""

import hashlib
from typing import Dict, Tuple

import numpy as np

SOURCES = {"stacked_fashion_mnist": "fashion_mnist", "stacked_mnist": "mnist"}
NUM_MODES = 1000
PROTOCOL_SAMPLES = 26_000
_SPLIT_STREAMS = {"train": 0, "test": 1}


def stack(images: np.ndarray, labels: np.ndarray, seed: int, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """Source uint8 (N, 28, 28) images and (N,) labels -> stacked uint8 (N, 28, 28, 3) images and (N,)
  mode labels in [0, 1000), drawn by (seed, split)."""
  rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
  picks = rng.integers(0, len(images), size=(len(images), 3))
  stacked = np.ascontiguousarray(np.moveaxis(images[picks], 1, -1))  # (N, 3, H, W) -> (N, H, W, 3)
  return stacked, mode_of(labels[picks])


def mode_of(channel_classes: np.ndarray) -> np.ndarray:
  """(n, 3) classes of the R, G, B channels -> (n,) modes 100 * R + 10 * G + B."""
  c = np.asarray(channel_classes, np.int64)
  return 100 * c[:, 0] + 10 * c[:, 1] + c[:, 2]


def mode_report(modes: np.ndarray) -> Dict[str, float]:
  """{"modes": modes with >= 1 sample (of 1,000), "modes_kl": KL(histogram || uniform)}."""
  counts = np.bincount(np.asarray(modes, np.int64), minlength=NUM_MODES).astype(np.float64)
  p = counts / counts.sum()
  nonzero = p > 0
  kl = float(np.sum(p[nonzero] * np.log(p[nonzero] * NUM_MODES)))
  return dict(modes=int(nonzero.sum()), modes_kl=kl)


def channel_images(images: np.ndarray) -> np.ndarray:
  """uint8 (n, H, W, 3) -> (3n, H, W, 1): every channel as a grayscale image, image by image (R, G, B)."""
  n, h, w, c = images.shape
  assert c == 3, images.shape
  return np.moveaxis(images, -1, 1).reshape(n * 3, h, w, 1)


def fingerprint(source_name: str, seed: int, splits: dict) -> str:
  """A hash of the stacked arrays (the evaluator cache's key for this dataset)."""
  h = hashlib.sha256(f"{source_name}:{seed}".encode())
  for name in sorted(splits):
    for array in splits[name]:
      h.update(np.ascontiguousarray(array).tobytes())
  return h.hexdigest()
