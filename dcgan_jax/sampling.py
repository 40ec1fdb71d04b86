"""Images from a generator, outside the training step (sample grids, evaluation, the sample tool).

    sample = make_sampler(generator, sample_bn="running")    # jitted
    images = sample_images(sample, g, z)                     # float32 (n, H, W, C) in [-1, 1]
    generate, config, step, used_ema = load(workdir)         # a run's (or an export's) generator
    images = generate(latents(config, 10000))                # on its fixed evaluation noise
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax import randomness


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


def load(workdir, step=None, best=False, use_ema=True, sample_bn=None):
  """(sample(z) -> float32 images in [-1, 1], config, step, used_ema) for a run or an export: the
  generator that `python -m dcgan_jax.sample` and `evaluate` use.

  step=0 without a checkpoint 0 is the untrained generator, rebuilt from the run's config (the initial
  weights are a function of the seed): the baseline that training should improve on.
  """
  sampler, g, config, step, used_ema = load_sampler(workdir, step, best, use_ema, sample_bn)
  return (lambda z: sample_images(sampler, g, z)), config, step, used_ema


def load_sampler(workdir, step=None, best=False, use_ema=True, sample_bn=None):
  """(sampler, g, config, step, used_ema): load's generator as sampling.make_sampler's jitted
  `sampler(g, z)` and its state `g`, for programs that generate on the devices."""
  from dcgan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dcgan_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if step == 0 and 0 not in workdir_lib.checkpoint_steps(workdir):
    generator, variables, config = _initial_generator(workdir)
    used_ema = False
  else:
    generator, variables, config, step, used_ema = checkpoints.load_run_generator(workdir, step, use_ema,
                                                                                  best)
  sampler = make_sampler(generator, sample_bn or config.sample_bn)
  g = step_lib.NetState(jax.tree.map(jnp.asarray, variables["params"]),
                        jax.tree.map(jnp.asarray, variables["batch_stats"]), None)
  return sampler, g, config, step, used_ema


def _initial_generator(workdir):
  """The untrained generator of a run, rebuilt from its config (its initial weights are a function of
  the seed)."""
  from dcgan_jax import models  # pylint: disable=g-import-not-at-top
  from dcgan_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config, run = workdir_lib.read_config(workdir)
  state = step_lib.create_train_state(config, run["channels"])
  generator, _ = models.build_models(config, run["channels"])
  return generator, {"params": state.g.params, "batch_stats": state.g.batch_stats}, config


def latents(config, num: int, seed=None) -> jax.Array:
  """The run's evaluation noise (num, latent_dim), or that of another seed."""
  return randomness.eval_latents(jax.random.key(config.seed if seed is None else seed), num,
                                 config.latent_dim)


def interpolation_latents(config, rows: int, steps: int, seed=None) -> jax.Array:
  """(rows, steps, latent_dim): row r goes linearly from z[2r] to z[2r + 1] of the evaluation noise."""
  ends = latents(config, 2 * rows, seed).reshape(rows, 2, -1)
  t = jnp.linspace(0.0, 1.0, steps)[None, :, None]
  return (1 - t) * ends[:, :1] + t * ends[:, 1:]
