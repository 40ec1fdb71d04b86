"""GAN losses computed from discriminator logits (never from probabilities: log-sigmoid is stable).

Notation: D(x) = sigmoid(logit). Both losses are means over the batch, float32 scalars. `mean` is how a
batch of per-example values becomes that mean: jnp.mean by default; with --invariant_groups the trainer
passes one device's share of the global mean (sum / global batch size: every example's gradient is then
scaled by exactly 1 / batch size on any topology) or the global mean summed in a fixed order (invariant.py).

* discriminator (both variants): L_D = -E[log D(x)] - E[log(1 - D(G(z)))], i.e. binary cross-entropy
  with label 1 for real and 0 for fake, summed over the two halves (as in the DCGAN paper's reference
  code and pytorch/examples). The seed writes L_D = E[log D(x)] + E[log(1 - D(G(z)))]: the same objective
  written as something D *maximises*.
* generator, "minimax": L_G = E[log(1 - D(G(z)))] (Goodfellow et al. 2014, eq. 1); its gradient vanishes
  when D confidently rejects fakes, early in training.
* generator, "non_saturating" (default): L_G = -E[log D(G(z))]. The seed's L_G line is this form.
"""

from typing import Callable

import jax
import jax.numpy as jnp


Mean = Callable[[jax.Array], jax.Array]


def d_loss(real_logits: jax.Array, fake_logits: jax.Array, mean: Mean = jnp.mean) -> jax.Array:
  """Discriminator loss (same for both variants). Logits (batch, 1); returns a scalar."""
  # -log sigmoid(l) = softplus(-l);  -log(1 - sigmoid(l)) = softplus(l)
  return mean(jax.nn.softplus(-real_logits)) + mean(jax.nn.softplus(fake_logits))


def g_loss(fake_logits: jax.Array, kind: str = "non_saturating", mean: Mean = jnp.mean) -> jax.Array:
  """Generator loss of the given kind ("non_saturating" or "minimax") from D's logits on G(z)."""
  if kind == "non_saturating":
    return mean(jax.nn.softplus(-fake_logits))
  if kind == "minimax":
    return -mean(jax.nn.softplus(fake_logits))
  raise ValueError(f"unknown generator loss {kind!r}")
