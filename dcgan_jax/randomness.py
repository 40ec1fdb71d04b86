"""Where every random number of a run comes from. Pure functions of keys; no Python state.

The base key `jax.random.key(seed)` is split by *purpose* first (model init, training, data order,
evaluation noise), so no key is ever used twice. Inside the training step the training key is folded
with the step number, then with a purpose (noise for D's k-th update, D's dropout, ...), then with the
*position* of each example in the global batch. So the noise z and the dropout mask of global example j
at step t are the same however the batch is split over devices and hosts.

The data order is also a pure function: a seeded permutation per epoch over the whole dataset, and
position j of real batch r (r = the number of real batches drawn before) is stream position
p = r * batch_size + j, which maps to example permutation(epoch(p))[p mod N]. Resuming at step t needs
nothing but t.
"""

import contextlib

from typing import Optional

import jax
import jax.numpy as jnp

from dcgan_jax import platforms

# Purposes of the base key (first fold).
INIT, TRAIN, DATA, EVAL_NOISE = 0, 1, 2, 3
# Purposes inside one training step (second fold, after the step). `k` is the D update's index.
_Z_D, _DROP_REAL, _DROP_FAKE_D, _DROP_FAKE_G, _MIX, _DROP_MIX = 0, 1, 2, 3, 4, 5


def purpose_key(base_key: jax.Array, purpose: int) -> jax.Array:
  """The key for one of INIT, TRAIN, DATA, EVAL_NOISE."""
  return jax.random.fold_in(base_key, purpose)


def per_example(key: jax.Array, positions: jax.Array) -> jax.Array:
  """One key per example: `key` folded with each global position. positions: int32 (b,) -> keys (b,)."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions)


def _threefry_per_key():
  """Threefry's original (non-partitionable) bit layout, scoped to the draws below.

  jax's default (jax_threefry_partitionable=True) lays bits out so that one large random array can be
  sharded over devices without communication. Here every draw is already per example (vmapped over
  one key per example), so that property buys nothing, and on XLA:CPU it costs 3x: a 128 x 14x14x64
  dropout mask takes 14 ms with it and 4.3 ms without. The choice is fixed here (not left to the global
  flag) so the noise and the masks do not depend on the user's jax configuration."""
  scoped = getattr(jax, "threefry_partitionable", None)  # a config context manager in jax >= 0.4.x
  return scoped(False) if scoped is not None else contextlib.nullcontext()


def latents(keys: jax.Array, latent_dim: int) -> jax.Array:
  """z ~ N(0, I): keys (b,) -> float32 (b, latent_dim); row i depends on keys[i] only."""
  with _threefry_per_key():
    return jax.vmap(lambda k: jax.random.normal(k, (latent_dim,), jnp.float32))(keys)


def example_uniform(keys: jax.Array) -> jax.Array:
  """One U[0, 1) number per example: keys (b,) -> float32 (b,); entry i depends on keys[i] only."""
  with _threefry_per_key():
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys)


def example_bernoulli(keys: jax.Array, p: float, shape: tuple) -> jax.Array:
  """Per-example Bernoulli(p) masks: keys (b,) -> bool (b, *shape); row i depends on keys[i] only."""
  with _threefry_per_key():
    return jax.vmap(lambda k: jax.random.bernoulli(k, p, shape))(keys)


class StepKeys:
  """Keys of one training step. `train_key` = purpose_key(base, TRAIN); `step` may be traced."""

  def __init__(self, train_key: jax.Array, step: jax.Array, positions: jax.Array):
    self._key = jax.random.fold_in(train_key, step)
    self._positions = positions

  def _keys(self, purpose: int, k: int) -> jax.Array:
    return per_example(jax.random.fold_in(jax.random.fold_in(self._key, purpose), k), self._positions)

  def z(self, k: int) -> jax.Array:
    """Per-example keys of the noise for the k-th D update (the last one's fakes also train G)."""
    return self._keys(_Z_D, k)

  def dropout_real(self, k: int) -> jax.Array:
    return self._keys(_DROP_REAL, k)

  def dropout_fake_d(self, k: int) -> jax.Array:
    return self._keys(_DROP_FAKE_D, k)

  def dropout_fake_g(self) -> jax.Array:
    return self._keys(_DROP_FAKE_G, 0)

  def mixing(self, k: int) -> jax.Array:
    """Per-example keys of the gradient penalty's interpolation weights (k-th D update)."""
    return self._keys(_MIX, k)

  def dropout_mixed(self, k: int) -> jax.Array:
    """Per-example dropout keys of D's pass on the gradient penalty's interpolates."""
    return self._keys(_DROP_MIX, k)


_SWAP_OR_NOT_ROUNDS = 128


def _mix32(v: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
  v = v ^ (v >> 16)
  v = v * jnp.uint32(0x85EBCA6B)
  v = v ^ (v >> 13)
  v = v * jnp.uint32(0xC2B2AE35)
  return v ^ (v >> 16)


def permuted_index(key: jax.Array, offset: jax.Array, n: int,
                   policy: Optional[platforms.Policy] = None) -> jax.Array:
  """permutation_key[offset]: where a seeded permutation of range(n) sends each offset, element-wise.

  key: one typed key, or one per element (shape of `offset`); offset: int (any shape) in [0, n) -> int32.
  policy: of the devices the program is compiled for (default: JAX's default backend's): chooses only
  whether the rounds' loop is written out (platforms.Policy.unroll_loops; the same result either way).
  The swap-or-not shuffle (Hoang, Morris and Rogaway, CRYPTO 2012): round r pairs x with
  partner = (K_r - x) mod n and swaps them when a keyed bit of the pair (of its larger member, so both
  members agree) is 1. Each round is an involution of [0, n), so the composition is a bijection for any
  n, after a fixed number of rounds (_SWAP_OR_NOT_ROUNDS = 128: about 6 log2 n, the paper's figure for a
  strong permutation, for n up to 2**21; beyond, still a bijection, with a weaker guarantee).

  Why not jax.random.permutation: it sorts all n keys at every step, a cost that grows with n (at
  n = 60,000 tens of milliseconds per CPU step); this costs O(batch * rounds).
  Why not a Feistel network with cycle walking: walking until the value falls below n is a while loop
  whose trip count depends on the data, and XLA:GPU evaluates such
  a loop's condition on the host, blocking it until the device is idle (WhileThunk: memcpy of the
  predicate + BlockHostUntilDone), at every step, even inside a lax.scan of K steps; here every loop
  has a fixed length.
  """
  words = jnp.vectorize(lambda k: jax.random.bits(k, (_SWAP_OR_NOT_ROUNDS, 2), jnp.uint32),
                        signature="()->(r,w)")(key)
  words = jnp.moveaxis(jnp.broadcast_to(words, offset.shape + (_SWAP_OR_NOT_ROUNDS, 2)), -2, 0)
  pivots, salts = words[..., 0] % jnp.uint32(n), words[..., 1]  # (rounds, ...): K_r in [0, n), F_r's key

  def one_round(r, x):
    partner = (pivots[r] + jnp.uint32(n) - x) % jnp.uint32(n)  # < 2n <= 2**32: no overflow
    swap = (_mix32(jnp.maximum(x, partner) ^ salts[r]) >> 31) == 1
    return jnp.where(swap, partner, x)

  # (A fixed-length loop does not block the host, but on an accelerator each iteration is a launch.)
  unroll = _SWAP_OR_NOT_ROUNDS if (policy or platforms.default()).unroll_loops else 1
  return jax.lax.fori_loop(0, _SWAP_OR_NOT_ROUNDS, one_round, offset.astype(jnp.uint32),
                           unroll=unroll).astype(jnp.int32)


def example_indices(data_key: jax.Array, batch_number: jax.Array, positions: jax.Array,
                    batch_size: int, num_examples: int,
                    policy: Optional[platforms.Policy] = None) -> jax.Array:
  """Dataset indices of the given global positions of real batch `batch_number`.

  Args:
    data_key: purpose_key(base, DATA).
    batch_number: int32 scalar (may be traced): how many real batches were drawn before this one.
    positions: int32 (b,), global positions inside the batch, in [0, batch_size).
    batch_size: global batch size (<= num_examples).
    num_examples: dataset size N.
    policy: of the devices the program is compiled for (permuted_index).
  Returns:
    int32 (b,) indices in [0, N): stream position p = batch_number * batch_size + position maps to
    permutation_e[p mod N], one seeded permutation per epoch e = p // N (permuted_index). Every example
    appears exactly once per epoch; a batch that straddles an epoch boundary takes its tail from the
    next epoch's permutation.
  """
  pos = batch_number.astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32) * batch_size + positions
  # int32 positions overflow after 2**31 examples seen (e.g. 16.7M steps at batch 128): far beyond
  # a DCGAN run; the trainer checks it up front.
  epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(data_key, pos // num_examples)
  return permuted_index(epoch_keys, pos % num_examples, num_examples, policy)


def batch_indices(data_key: jax.Array, step: jax.Array, k: int, d_steps: int, positions: jax.Array,
                  batch_size: int, num_examples: int, policy: Optional[platforms.Policy] = None) -> jax.Array:
  """int32 (b,): the dataset indices of the given positions of step `step`'s k-th real batch (of
  d_steps), the real batch number step * d_steps + k (example_indices). The one numbering of both data
  paths: the in-memory step gathers these indices, the random-access reader reads them."""
  return example_indices(data_key, step * d_steps + k, positions, batch_size, num_examples, policy)


def eval_latents(base_key: jax.Array, num: int, latent_dim: int) -> jax.Array:
  """The fixed evaluation noise (num, latent_dim): the same for every step of a run and every topology."""
  return latents(per_example(purpose_key(base_key, EVAL_NOISE), jnp.arange(num)), latent_dim)
