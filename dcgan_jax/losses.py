"""GAN losses from discriminator outputs, and the gradient penalties. Pure functions, no state.

D's output is a logit per example, (batch, 1) float32. For the two cross-entropy losses D(x) =
sigmoid(logit) is a probability; the others read the raw output as a score ("critic"). Every loss is a
mean over the batch; `mean` is how per-example values become that mean: jnp.mean by default; with
--invariant_groups the trainer passes one device's share of the global mean (sum / global batch size:
every example's gradient is then scaled by exactly 1 / batch size on any topology) or the global mean
summed in a fixed order (invariant.py).

--loss (d: the discriminator's loss, minimised; g: the generator's; l = D's output):
* non_saturating (default; the seed's, and the DCGAN paper's code):
      d = -E[log sigmoid(l_real)] - E[log(1 - sigmoid(l_fake))]   g = -E[log sigmoid(l_fake)]
* minimax (Goodfellow et al. 2014, eq. 1): the same d;  g = E[log(1 - sigmoid(l_fake))], whose
  gradient vanishes when D confidently rejects fakes, early in training.
* least_squares (Mao et al. 2017, LSGAN, targets a=0 fake, b=1 real, c=1 for G):
      d = E[(l_real - 1)^2] / 2 + E[l_fake^2] / 2                  g = E[(l_fake - 1)^2] / 2
* hinge (Lim & Ye 2017; Miyato et al. 2018):
      d = E[relu(1 - l_real)] + E[relu(1 + l_fake)]               g = -E[l_fake]
* wasserstein (Arjovsky et al. 2017): d = E[l_fake] - E[l_real]   g = -E[l_fake]
  Only meaningful with D Lipschitz-constrained (a gradient penalty or spectral normalisation); the
  config refuses it alone.

Penalties, from D's gradient with respect to its input, grads (batch, H, W, C), per example:
* gradient_penalty (Gulrajani et al. 2017, WGAN-GP): E[(||grad D(x_hat)||_2 - 1)^2] at random
  interpolates x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1] per example.
* r1_penalty (Mescheder et al. 2018): E[||grad D(x)||_2^2] / 2 at real data; weighted by gamma.
The trainer adds weight * penalty to d; jax.grad of that differentiates D's input gradient again with
respect to D's parameters (double backward), through whichever convolution form the step uses.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from dcgan_jax.config import LOSSES  # pylint: disable=unused-import  (the names --loss takes)

Mean = Callable[[jax.Array], jax.Array]
# Losses whose D output is a probability (sigmoid of the logit); the others' is an unbounded score.
PROBABILISTIC = ("non_saturating", "minimax")


def d_loss(real_logits: jax.Array, fake_logits: jax.Array, kind: str = "non_saturating",
           mean: Mean = jnp.mean) -> jax.Array:
  """The discriminator's loss of `kind` from its outputs (batch, 1) on real and fake images: a scalar."""
  if kind in PROBABILISTIC:
    # -log sigmoid(l) = softplus(-l);  -log(1 - sigmoid(l)) = softplus(l): stable for any logit.
    return mean(jax.nn.softplus(-real_logits)) + mean(jax.nn.softplus(fake_logits))
  if kind == "least_squares":
    return 0.5 * mean(jnp.square(real_logits - 1.0)) + 0.5 * mean(jnp.square(fake_logits))
  if kind == "hinge":
    return mean(jax.nn.relu(1.0 - real_logits)) + mean(jax.nn.relu(1.0 + fake_logits))
  if kind == "wasserstein":
    return mean(fake_logits) - mean(real_logits)
  raise ValueError(f"unknown loss {kind!r}")


def g_loss(fake_logits: jax.Array, kind: str = "non_saturating", mean: Mean = jnp.mean) -> jax.Array:
  """The generator's loss of `kind` from D's outputs (batch, 1) on G(z): a scalar."""
  if kind == "non_saturating":
    return mean(jax.nn.softplus(-fake_logits))
  if kind == "minimax":
    return -mean(jax.nn.softplus(fake_logits))
  if kind == "least_squares":
    return 0.5 * mean(jnp.square(fake_logits - 1.0))
  if kind in ("hinge", "wasserstein"):
    return -mean(fake_logits)
  raise ValueError(f"unknown loss {kind!r}")


def _squared_norms(grads: jax.Array) -> jax.Array:
  """Per-example squared L2 norms: (batch, ...) -> (batch, 1)."""
  return jnp.sum(jnp.square(grads.reshape(grads.shape[0], -1)), axis=1, keepdims=True)


def gradient_penalty(grads: jax.Array, mean: Mean = jnp.mean) -> jax.Array:
  """WGAN-GP's E[(||g||_2 - 1)^2] over per-example input gradients g (batch, H, W, C).

  The norm's gradient at g = 0 is undefined (sqrt'(0)); a tiny floor under the square root keeps the
  double backward finite there (an image D is exactly flat at does not occur in practice)."""
  norms = jnp.sqrt(_squared_norms(grads) + 1e-12)
  return mean(jnp.square(norms - 1.0))


def r1_penalty(grads: jax.Array, mean: Mean = jnp.mean) -> jax.Array:
  """R1's E[||g||_2^2] / 2 over per-example input gradients g (batch, H, W, C) at real images."""
  return 0.5 * mean(_squared_norms(grads))
