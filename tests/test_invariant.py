"""--invariant_groups: the same math as the plain layers, and the same bits on 1, 2 and 4 devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcgan_jax.ops import invariant
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config, ConfigError


def pmapped(fn, n, in_axes):
  return jax.pmap(fn, axis_name="batch", in_axes=in_axes, devices=jax.devices()[:n])


def shard(x, n):
  return x.reshape((n, -1) + x.shape[1:])


def test_ordered_sum_is_a_left_fold_in_global_group_order():
  """invariant.ordered_sum on order-sensitive float32 values equals a left fold in global group order,
  bitwise, on 1, 2 and 4 devices. Catches a tree reduction or psum (whose order depends on the device count)
  and groups taken in local order."""
  parts = np.float32([1e8, 1.0, -1e8, 1.0, 3.0, -3.0, 0.5, 0.25])  # order-sensitive in float32
  expected = np.float32(0)
  for p in parts:
    expected = np.float32(expected + p)
  for n in (1, 2, 4):
    local = shard(parts, n)  # device d holds groups [d * L, (d + 1) * L)
    out = pmapped(lambda p: invariant.ordered_sum(list(p), "batch"), n, 0)(local)
    np.testing.assert_array_equal(np.asarray(out), np.full(n, expected))
  assert invariant.ordered_sum(list(parts), None) == expected


@pytest.mark.parametrize("shape", [(16, 12), (16, 5, 5, 3)])
def test_batch_norm_matches_flax_in_values_and_gradients(shape):
  """Global-batch statistics over 4 devices, two groups each = flax's BatchNorm on the whole batch."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal(shape).astype(np.float32) * 3 + 1
  dy = rng.standard_normal(shape).astype(np.float32)
  c = shape[-1]
  scale, bias = (1 + 0.1 * rng.standard_normal(c)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
  bn = nn.BatchNorm(use_running_average=False, epsilon=1e-3)
  variables = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": np.zeros(c), "var": np.ones(c)}}

  def flax_loss(x, scale, bias):
    v = {"params": {"scale": scale, "bias": bias}, "batch_stats": variables["batch_stats"]}
    return jnp.sum(bn.apply(v, x, mutable=["batch_stats"])[0] * dy)

  ref_grads = jax.grad(flax_loss, argnums=(0, 1, 2))(x, scale, bias)
  ref_y = bn.apply(variables, x, mutable=["batch_stats"])[0]

  def ours(x, dy, scale, bias):
    def loss(x, scale, bias):
      y, mean, var = invariant.batch_norm(x, scale, bias, 1e-3, 2, "batch")
      return jnp.sum(y * dy), (y, mean, var)
    grads, (y, mean, var) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(x, scale, bias)
    return y, grads, mean, var

  y, (dx, dscale, dbias), mean, var = pmapped(ours, 4, (0, 0, None, None))(shard(x, 4), shard(dy, 4), scale, bias)
  axes = tuple(range(len(shape) - 1))
  np.testing.assert_allclose(np.asarray(y).reshape(shape), ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dx).reshape(shape), ref_grads[0], rtol=1e-4, atol=1e-5)
  # Parameter gradients: the global batch's, the same on every device (no pmean needed).
  for got, want in ((dscale, ref_grads[1]), (dbias, ref_grads[2])):
    assert all(np.array_equal(got[0], g) for g in got)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(mean[0], x.mean(axes), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var[0], x.var(axes), rtol=1e-5)


@pytest.mark.parametrize("layer", ["dense", "conv", "conv_transpose"])
def test_grouped_layer_gradient_is_the_global_batch_gradient(layer):
  """A grouped layer (Dense, Conv, ConvTranspose) on 4 devices returns the global batch's parameter and
  input gradients of the ungrouped layer. Catches a grouped gradient that is only the local share, is summed
  twice, or drops the bias."""
  rng = np.random.default_rng(1)
  if layer == "dense":
    module, x = models.Dense(7), rng.standard_normal((8, 5))
  else:
    cls = models.Conv if layer == "conv" else models.ConvTranspose
    module, x = cls(16, (5, 5), strides=(2, 2)), rng.standard_normal((8, 7, 7, 16))
  x = x.astype(np.float32)
  params = module.init(jax.random.key(0), x[:1])["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias
  dy = rng.standard_normal(module.apply({"params": params}, x).shape).astype(np.float32)
  loss = lambda m: (lambda p, x, dy: jnp.sum(m.apply({"params": p}, x) * dy))
  ref = jax.grad(loss(module), argnums=(0, 1))(params, x, dy)
  grouped = module.clone(group_size=1, axis_name="batch")
  got = pmapped(jax.grad(loss(grouped), argnums=(0, 1)), 4, (None, 0, 0))(params, shard(x, 4), shard(dy, 4))
  np.testing.assert_allclose(np.asarray(got[1]).reshape(x.shape), ref[1], rtol=1e-4, atol=1e-5)
  for g, r in zip(jax.tree.leaves(got[0]), jax.tree.leaves(ref[0])):
    assert all(np.array_equal(g[0], gi) for gi in g)  # every device: the global gradient
    np.testing.assert_allclose(g[0], r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["mnist", "dcgan"])
def test_models_have_the_same_parameters_with_and_without_groups(preset):
  """The models with --invariant_groups have the same parameter tree (names, shapes, dtypes) as without.
  Catches grouped layers that rename or reshape parameters, which would make checkpoints of the two forms
  incompatible."""
  config = Config(preset=preset, image_size=None if preset == "mnist" else 32, base_width=8, batch_size=8,
                  latent_dim=8, invariant_groups=4).resolved()
  plain, grouped = models.build_models(config, 1), models.build_models(config, 1, axis_name="batch")
  assert grouped[0].group_size == 2 and plain[0].group_size == 0
  z, x = jnp.zeros((1, config.latent_dim)), jnp.zeros((1, config.image_size, config.image_size, 1))
  for a, b, inp in ((plain[0], grouped[0], z), (plain[1], grouped[1], x)):
    va, vb = (jax.eval_shape(lambda k, x: m.init(k, x, train=False), jax.random.key(0), inp) for m in (a, b))
    assert va == vb  # the same tree of parameter shapes and dtypes: checkpoints are interchangeable


def run_steps(config, n, data, steps):
  """`steps` in-memory training steps on the first n devices; returns (host state, metrics list)."""
  step = jax.pmap(step_lib.make_train_step(config, 1, len(data)), axis_name=parallel.AXIS,
                  in_axes=(None, 0, None), out_axes=(None, None), devices=jax.devices()[:n])
  state = step_lib.create_train_state(config, 1)
  slots = np.arange(config.batch_size, dtype=np.int32).reshape(n, -1)
  history = []
  for _ in range(steps):
    state, metrics = step(state, slots, data)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


@pytest.mark.slow
def test_training_is_bitwise_identical_on_2_and_4_devices():
  """The dcgan preset (BatchNorm in G and D, dropout): 4 groups per device on 2 devices, 2 on 4;
  weights, statistics, optimizer states and every metric of every step bit for bit. (1 and 8 devices and
  2 processes x 2, mnist preset, through the CLI: test_topology.py.) --steps_per_call on CPU runs this
  same single-step program (test_train.py)."""
  config = Config(preset="dcgan", image_size=32, base_width=8, batch_size=16, latent_dim=16,
                  invariant_groups=8, dropout_rate=0.3).resolved()
  data = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 1), np.uint8)
  (a, history_a), (b, history_b) = run_steps(config, 4, data, 3), run_steps(config, 2, data, 3)
  for x, y in zip(jax.tree.leaves((a.g, a.d)), jax.tree.leaves((b.g, b.d))):
    np.testing.assert_array_equal(x, y)
  assert history_a == history_b


def test_invariant_groups_errors():
  """--invariant_groups refused in one line when it does not divide the batch, is negative, or is not a
  multiple of twice the device count; accepted otherwise. Catches groups that silently split unevenly over
  devices."""
  with pytest.raises(ConfigError, match="--invariant_groups=3: must divide --batch_size=8"):
    Config(batch_size=8, invariant_groups=3).validate()
  with pytest.raises(ConfigError, match="invariant_groups=-1"):
    Config(invariant_groups=-1).validate()
  with pytest.raises(ConfigError, match="--invariant_groups=4: must be a multiple of twice the number of "
                                        r"devices \(8\)"):
    parallel.check_devices(Config(batch_size=16, invariant_groups=4), 4)
  parallel.check_devices(Config(batch_size=16, invariant_groups=8), 4)

