"""Images from a generator, outside the training step (sample grids, evaluation, the sample tool).

    sample = make_sampler(generator, sample_bn="running")    # jitted
    images = sample_images(sample, g, z)                     # float32 (n, H, W, C) in [-1, 1]
"""

from typing import Callable

import jax
import numpy as np


def make_sampler(generator, sample_bn: str = "running") -> Callable:
  """sample(g, z (n, latent_dim)) -> float32 images (n, H, W, C) in [-1, 1], jitted; `g` has `.params`
  and `.batch_stats` (a step.NetState) of the flax `generator` module.

  sample_bn = "running" (default): BatchNorm uses the running statistics (inference mode), so each
  image depends only on its own z, and a grid is the same whatever else is in the batch.
  "batch": BatchNorm uses the statistics of the sampled batch itself, as in pytorch/examples (which never
  switches G to eval mode); early in training this can look better, but an image then depends on the
  other latents in its batch. Running statistics are never modified by sampling.
  """
  train = sample_bn == "batch"

  @jax.jit
  def sample(g, z):
    out = generator.apply({"params": g.params, "batch_stats": g.batch_stats}, z, train=train,
                          mutable=["batch_stats"] if train else False)
    return out[0] if train else out

  return sample


def sample_images(sample: Callable, g, z: jax.Array, chunk: int = 500) -> np.ndarray:
  """float32 images (n, H, W, C) in [-1, 1] for latents z (n, latent_dim), from a host copy of G, in
  chunks (sample_bn=batch: each chunk is one batch)."""
  g = jax.device_get(g)
  return np.concatenate([np.asarray(sample(g, z[i:i + chunk])) for i in range(0, len(z), chunk)])
