"""Where every random number of a run comes from. Pure functions of keys; no Python state.

The base key `jax.random.key(seed)` is split by *purpose* first (model init, training, data order,
evaluation noise), so no key is ever used twice. Inside the training step the training key is folded
with the step number, then with a purpose (noise for D's k-th update, D's dropout, ...), then with the
*global example index* (slot) of each example in the global batch. So the noise z and the dropout mask
of global example j at step t are the same however the batch is split over devices and hosts.

The data order is also a pure function: a seeded permutation per epoch over the whole dataset, and
global position p = r * batch_size + slot (r = the number of real batches drawn before) maps to example
permutation(epoch(p))[p mod N]. Resuming at step t needs nothing but t.
"""

import jax
import jax.numpy as jnp

# Purposes of the base key (first fold).
INIT, TRAIN, DATA, EVAL_NOISE = 0, 1, 2, 3
# Purposes inside one training step (second fold, after the step). `k` is the D update's index.
_Z_D, _DROP_REAL, _DROP_FAKE_D, _DROP_FAKE_G = 0, 1, 2, 3


def purpose_key(base_key: jax.Array, purpose: int) -> jax.Array:
  """The key for one of INIT, TRAIN, DATA, EVAL_NOISE."""
  return jax.random.fold_in(base_key, purpose)


def per_example(key: jax.Array, slots: jax.Array) -> jax.Array:
  """One key per example: `key` folded with each global slot index. slots: int32 (b,) -> keys (b,)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, slots)


def latents(keys: jax.Array, latent_dim: int) -> jax.Array:
  """z ~ N(0, I): keys (b,) -> float32 (b, latent_dim); row i depends on keys[i] only."""
  return jax.vmap(lambda k: jax.random.normal(k, (latent_dim,), jnp.float32))(keys)


class StepKeys:
  """Keys of one training step. `train_key` = purpose_key(base, TRAIN); `step` may be traced."""

  def __init__(self, train_key: jax.Array, step: jax.Array, slots: jax.Array):
    self._key = jax.random.fold_in(train_key, step)
    self._slots = slots

  def _keys(self, purpose: int, k: int) -> jax.Array:
    return per_example(jax.random.fold_in(jax.random.fold_in(self._key, purpose), k), self._slots)

  def z(self, k: int) -> jax.Array:
    """Per-example keys of the noise for the k-th D update (the last one's fakes also train G)."""
    return self._keys(_Z_D, k)

  def dropout_real(self, k: int) -> jax.Array:
    return self._keys(_DROP_REAL, k)

  def dropout_fake_d(self, k: int) -> jax.Array:
    return self._keys(_DROP_FAKE_D, k)

  def dropout_fake_g(self) -> jax.Array:
    return self._keys(_DROP_FAKE_G, 0)


def example_indices(data_key: jax.Array, batch_number: jax.Array, slots: jax.Array,
                    batch_size: int, num_examples: int) -> jax.Array:
  """Dataset indices of the given global slots of real batch `batch_number`.

  Args:
    data_key: purpose_key(base, DATA).
    batch_number: int32 scalar (may be traced): how many real batches were drawn before this one.
    slots: int32 (b,), global positions inside the batch, in [0, batch_size).
    batch_size: global batch size (<= num_examples).
    num_examples: dataset size N.
  Returns:
    int32 (b,) indices in [0, N). Every example appears exactly once per epoch of N positions; a batch
    that straddles an epoch boundary takes its tail from the next epoch's permutation.
  """
  pos = batch_number.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32) * batch_size + slots
  # int32 positions overflow after 2**31 examples seen (e.g. 16.7M steps at batch 128): far beyond
  # a DCGAN run; the trainer checks it up front.
  epoch = pos // num_examples
  first_epoch = (batch_number * batch_size) // num_examples
  offset = pos % num_examples
  perm = lambda e: jax.random.permutation(jax.random.fold_in(data_key, e), num_examples)
  idx = perm(first_epoch)[offset]
  # The next epoch's permutation only for a batch that straddles the boundary (a sort of N keys: the
  # costliest part of the gather on CPU).
  return jax.lax.cond(jnp.any(epoch != first_epoch),
                      lambda: jnp.where(epoch == first_epoch, idx, perm(first_epoch + 1)[offset]),
                      lambda: idx).astype(jnp.int32)


def eval_latents(base_key: jax.Array, num: int, latent_dim: int) -> jax.Array:
  """The fixed evaluation noise (num, latent_dim): the same for every step of a run and every topology."""
  return latents(per_example(purpose_key(base_key, EVAL_NOISE), jnp.arange(num)), latent_dim)
