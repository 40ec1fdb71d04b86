import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax import losses
from dcgan_jax import platforms
from dcgan_jax import randomness


def test_every_loss_and_penalty_against_hand_computed_values():
  """D outputs real (2, -1), fake (0.5, -3), worked out by hand from each paper's formula; the
  penalties on per-example input gradients of norms 3 and 0.6 (and 0 for the gradient penalty's floor).
  Catches a swapped real/fake term, a missing 1/2 (LSGAN, R1), a hinge margin on the wrong side, a
  sign error in the critic losses, and a norm taken over the whole batch instead of per example."""
  real, fake = jnp.array([[2.0], [-1.0]]), jnp.array([[0.5], [-3.0]])
  sp = lambda v: np.log1p(np.exp(v))  # softplus
  expected = {
      "non_saturating": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, (sp(-0.5) + sp(3)) / 2),
      "minimax": ((sp(-2) + sp(1)) / 2 + (sp(0.5) + sp(-3)) / 2, -(sp(0.5) + sp(-3)) / 2),
      # d = E[(l_r - 1)^2]/2 + E[l_f^2]/2 = ((1 + 4)/2 + (0.25 + 9)/2)/2;  g = E[(l_f - 1)^2]/2 = (0.25 + 16)/4
      "least_squares": ((1 + 4) / 4 + (0.25 + 9) / 4, (0.25 + 16) / 4),
      # d = E[relu(1 - l_r)] + E[relu(1 + l_f)] = (0 + 2)/2 + (1.5 + 0)/2;  g = -E[l_f] = 1.25
      "hinge": (1.0 + 0.75, 1.25),
      "wasserstein": ((0.5 - 3) / 2 - (2 - 1) / 2, 1.25),
  }
  assert set(expected) == set(losses.LOSSES)
  for kind, (d, g) in expected.items():
    np.testing.assert_allclose(losses.d_loss(real, fake, kind), d, rtol=1e-6, err_msg=kind)
    np.testing.assert_allclose(losses.g_loss(fake, kind), g, rtol=1e-6, err_msg=kind)
  grads = jnp.zeros((2, 2, 2, 1)).at[0, 0, 0, 0].set(3.0).at[1, 1, 0, 0].set(0.36).at[1, 0, 1, 0].set(0.48)
  np.testing.assert_allclose(losses.r1_penalty(grads), (9 + 0.36) / 4, rtol=1e-6)  # E[||g||^2] / 2
  np.testing.assert_allclose(losses.gradient_penalty(grads), ((3 - 1) ** 2 + (0.6 - 1) ** 2) / 2, rtol=1e-5)
  flat = jax.grad(lambda g: losses.gradient_penalty(g))(jnp.zeros((2, 2, 2, 1)))
  assert np.all(np.isfinite(flat))


def test_losses_from_logits():
  """The losses at logit 0 (D: 2 log 2; G non-saturating: log 2; minimax: -log 2), minimax's vanishing
  gradient against non-saturating's at a confident D, and finite losses at logits of +-100. Catches minimax
  and non-saturating swapped, a sign error, and log(sigmoid) computed unstably (log 0)."""
  zero = jnp.zeros((5, 1))
  np.testing.assert_allclose(losses.d_loss(zero, zero), 2 * np.log(2), rtol=1e-6)
  np.testing.assert_allclose(losses.g_loss(zero, "non_saturating"), np.log(2), rtol=1e-6)
  np.testing.assert_allclose(losses.g_loss(zero, "minimax"), -np.log(2), rtol=1e-6)
  # A confident D on fakes (logit -10): minimax's gradient vanishes, non-saturating's does not.
  confident = jnp.full((5, 1), -10.0)
  g_mm = jax.grad(lambda l: losses.g_loss(l, "minimax"))(confident)
  g_ns = jax.grad(lambda l: losses.g_loss(l, "non_saturating"))(confident)
  assert float(jnp.max(jnp.abs(g_mm))) < 1e-4 < float(jnp.max(jnp.abs(g_ns)))
  # Stable for large logits (no log(0)).
  assert np.isfinite(float(losses.d_loss(jnp.full((2, 1), -100.0), jnp.full((2, 1), 100.0))))


def test_data_order_visits_every_example_once_per_epoch_and_straddles_epochs():
  """The data order visits every example once per epoch, each epoch in its own permutation, joined without
  dropping a remainder; any split of the global positions gives the same indices. Catches repeated or
  skipped examples, one permutation for every epoch, and an order that depends on how positions are split
  over devices."""
  key = randomness.purpose_key(jax.random.key(0), randomness.DATA)
  n, b = 10, 4
  slots = jnp.arange(b)
  seq = np.concatenate([np.asarray(randomness.example_indices(key, jnp.int32(r), slots, b, n))
                        for r in range(10)])  # 40 positions = 4 epochs
  for e in range(4):
    assert sorted(seq[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(seq[:n], seq[n:2 * n])  # each epoch its own permutation
  # Any split of the slots gives the same indices (topology independence).
  r = jnp.int32(2)  # positions 8..11: straddles the first epoch boundary
  whole = randomness.example_indices(key, r, slots, b, n)
  parts = [randomness.example_indices(key, r, slots[i:i + 2], b, n) for i in (0, 2)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_latents_depend_only_on_the_global_slot():
  """The noise of global position i is the same whether the positions are drawn together or in parts,
  differs between steps and D updates, and is standard normal. Catches noise drawn per device
  (topology-dependent), the step or update index not folded into the key, and a wrong scale."""
  step_keys = randomness.StepKeys(jax.random.key(1), jnp.int32(7), jnp.arange(8))
  z_all = randomness.latents(step_keys.z(0), 100)
  z_tail = randomness.latents(randomness.StepKeys(jax.random.key(1), jnp.int32(7), jnp.arange(4, 8)).z(0), 100)
  np.testing.assert_array_equal(z_all[4:], z_tail)
  assert z_all.shape == (8, 100)
  # Different step, purpose or D-update index: different noise.
  z_next = randomness.latents(randomness.StepKeys(jax.random.key(1), jnp.int32(8), jnp.arange(8)).z(0), 100)
  assert not np.allclose(z_all, z_next)
  assert not np.allclose(z_all, randomness.latents(step_keys.z(1), 100))
  assert abs(float(jnp.std(z_all)) - 1.0) < 0.1


def test_permuted_index_is_a_seeded_bijection_that_shuffles():
  """The keyed permutation is a bijection for sizes 1 to 60,001, shuffles like a uniform random permutation
  (no correlation, about one fixed point, mean jump n/3), changes with the key and is element-wise. Catches
  a permutation that repeats indices, leaves the order nearly intact, or ignores its key."""
  key = randomness.purpose_key(jax.random.key(0), randomness.DATA)
  for n in (1, 2, 3, 7, 64, 1000, 60001):
    perm = np.asarray(randomness.permuted_index(key, jnp.arange(n), n))
    assert sorted(perm) == list(range(n)), n
  n = 60000
  perm = np.asarray(randomness.permuted_index(key, jnp.arange(n), n))
  # Statistics of a uniform random permutation: no order kept, ~1 fixed point, mean |step| ~ n/3.
  assert abs(np.corrcoef(np.arange(n), perm)[0, 1]) < 0.02
  assert (perm == np.arange(n)).sum() < 10
  assert 0.32 < np.abs(np.diff(perm)).mean() / n < 0.35
  other = np.asarray(randomness.permuted_index(jax.random.fold_in(key, 1), jnp.arange(n), n))
  assert (perm == other).mean() < 0.01  # another key, another permutation
  # Element-wise: any subset of offsets, with per-element keys, gives the same images.
  np.testing.assert_array_equal(
      randomness.permuted_index(jnp.stack([key] * 5), jnp.array([4, 0, 59999, 17, 4]), n),
      perm[[4, 0, 59999, 17, 4]])


def test_permuted_index_is_the_same_rolled_and_written_out():
  """Accelerators run the swap-or-not rounds written out (unrolled), the CPU as a loop: same values.
  Catches a data order that depends on the platform (e.g. a written-out round that differs)."""
  key = randomness.purpose_key(jax.random.key(0), randomness.DATA)
  offsets = jnp.arange(0, 60000, 997)
  order = lambda platform: jax.jit(lambda o: randomness.permuted_index(
      key, o, 60000, platforms.Policy(platform)))(offsets)
  hlo = lambda platform: jax.jit(lambda o: randomness.permuted_index(
      key, o, 60000, platforms.Policy(platform))).lower(offsets).as_text()
  # The two forms are really compared: the rounds' loop (one stablehlo.while) is gone when written out.
  assert hlo("cpu").count("stablehlo.while") == hlo("gpu").count("stablehlo.while") + 1
  np.testing.assert_array_equal(order("cpu"), order("gpu"))
