"""The pmapped training step on 4 virtual CPU devices (set in conftest.py), with tiny data."""
import os

import jax
import jax.extend.core
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import progress
from dcgan_jax import sampling
from dcgan_jax import step as step_lib
from dcgan_jax import train
from dcgan_jax.config import Config
from helpers import read_json, read_jsonl

pytestmark = pytest.mark.slow  # end-to-end and multi-device runs: not in the fast tier


def setup(config, num_examples=64, channels=1):
  config = config.resolved()
  mesh = parallel.global_mesh()
  assert mesh.devices.size == 4, "conftest.py forces 4 CPU devices"
  rng = np.random.default_rng(0)
  data = rng.integers(0, 256, (num_examples, config.image_size, config.image_size, channels), np.uint8)
  state = jax.device_put(step_lib.create_train_state(config, channels), NamedSharding(mesh, P()))
  slots = parallel.batch_positions(mesh, config.batch_size // 4)
  return config, mesh, data, state, slots


def assert_same_on_every_device(tree):
  for leaf in jax.tree.leaves(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 4
    for other in shards[1:]:
      np.testing.assert_array_equal(shards[0], other)


@pytest.mark.parametrize("preset,d_steps", [("mnist", 1), ("dcgan", 2)])
def test_pmapped_in_memory_steps(preset, d_steps):
  """Three pmapped steps on 4 devices per preset and --d_steps: the step counter advances, losses are finite
  and change, every parameter of G changes, and parameters, BatchNorm statistics and optimizer states are
  the same on every device (D's statistics threaded too). Catches gradients or statistics not averaged over
  devices (replicas drift apart) and state not threaded between steps."""
  config = Config(preset=preset, image_size=None if preset == "mnist" else 32, base_width=8,
                  batch_size=8, d_steps=d_steps, latent_dim=16)
  config, mesh, data, state, slots = setup(config)
  step = parallel.pmap_step(step_lib.make_train_step(config, 1, num_examples=len(data)), replicated_data=True)
  data = jax.device_put(data, NamedSharding(mesh, P()))
  g0 = jax.device_get(state.g.params)
  history = []
  for _ in range(3):
    state, metrics = step(state, slots, data)
    history.append(jax.device_get(metrics))
  assert int(state.step) == 3
  for m in history:
    assert m["finite"] == 1.0
    assert all(np.isfinite(m[k]) for k in ("d_loss", "g_loss", "d_real", "d_fake"))
  assert history[0]["d_loss"] != history[-1]["d_loss"] and history[0]["g_loss"] != history[-1]["g_loss"]
  assert_same_on_every_device((state.g, state.d))  # params, BatchNorm statistics, optimizer states
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), g0, jax.device_get(state.g.params))
  assert all(jax.tree.leaves(changed))
  if preset == "dcgan":
    assert jax.tree.leaves(state.d.batch_stats)  # D's BatchNorm statistics are threaded too


def test_streamed_step_matches_in_memory_step_on_the_same_batch():
  """Streaming and in-memory paths run the same math: feed the in-memory path's batch as a stream."""
  from dcgan_jax import randomness
  config, mesh, data, state, slots = setup(Config(batch_size=8, latent_dim=16))
  in_mem = parallel.pmap_step(step_lib.make_train_step(config, 1, num_examples=len(data)), True)
  streamed = parallel.pmap_step(step_lib.make_train_step(config, 1, None), False)
  idx = randomness.example_indices(randomness.purpose_key(jax.random.key(0), randomness.DATA),
                                   jnp.int32(0), jnp.arange(8), 8, len(data))
  batch = np.asarray(data)[np.asarray(idx)].reshape(4, 1, 2, 28, 28, 1)
  state_b = jax.tree.map(lambda x: x.copy(), state)  # the steps donate their input state
  a, ma = in_mem(state, slots, jax.device_put(data, NamedSharding(mesh, P())))
  b, mb = streamed(state_b, slots, batch)
  np.testing.assert_allclose(ma["d_loss"], mb["d_loss"], rtol=1e-6)
  np.testing.assert_allclose(ma["g_loss"], mb["g_loss"], rtol=1e-6)


def test_two_identical_runs_are_bitwise_identical():
  """Two runs of the same config and seed give bitwise identical parameters. Catches randomness that does
  not come from the seed (a time- or call-count-based key)."""
  def run():
    config, mesh, data, state, slots = setup(Config(batch_size=8, latent_dim=16, seed=3))
    step = parallel.pmap_step(step_lib.make_train_step(config, 1, num_examples=len(data)), True)
    data = jax.device_put(data, NamedSharding(mesh, P()))
    for _ in range(2):
      state, _ = step(state, slots, data)
    return jax.device_get(state.g.params)
  jax.tree.map(np.testing.assert_array_equal, run(), run())


def test_non_finite_values_stop_training_naming_the_step():
  """progress.check_finite passes finite history and raises TrainingDivergedError naming the first
  non-finite step (12 = 10 + 2) and the bad value. Catches an off-by-one step number and a check that looks
  only at the last step."""
  ok = dict(d_loss=1.0, g_loss=1.0, g_param_norm=1.0, d_param_norm=1.0, finite=1.0)
  bad = dict(ok, g_loss=float("nan"), finite=0.0)
  progress.check_finite([ok, ok], 10)
  with pytest.raises(progress.TrainingDivergedError, match=r"^training diverged at step 12: .*g_loss=nan"):
    progress.check_finite([ok, bad, bad], 10)


def test_sampler_bn_modes():
  """The sampler with running statistics gives each image independently of its batch; with batch statistics
  the same noise gives other images. Catches a --sample_bn flag that does not reach the sampler."""
  config = Config(batch_size=8, latent_dim=16).resolved()
  state = step_lib.create_train_state(config, 1)
  z = jax.random.normal(jax.random.key(0), (4, 16))
  generator = models.build_models(config, 1)[0]
  running = sampling.make_sampler(generator)(state.g, z)
  batch = sampling.make_sampler(generator, "batch")(state.g, z)
  assert running.shape == batch.shape == (4, 28, 28, 1)
  assert not np.allclose(running, batch)
  np.testing.assert_allclose(running[:1], sampling.make_sampler(generator)(state.g, z[:1]), atol=1e-5)


def test_streaming_tf_data_path_trains_under_mock_data(tmp_path):
  """--in_memory=false: tf.data shuffle/repeat/batch/prefetch feeding (devices, d_steps, b, H, W, C)."""
  import tensorflow_datasets as tfds
  config = Config(dataset="cifar10", preset="dcgan", image_size=32, base_width=8, latent_dim=16,
                  batch_size=8, num_steps=2, log_every=1, sample_every=2, checkpoint_every=2,
                  in_memory="false", shuffle_buffer=16)
  with tfds.testing.mock_data(num_examples=32):
    [state] = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 2
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert [l["step"] for l in lines] == [1, 2] and all(np.isfinite(l["d_loss"]) for l in lines)
  assert read_json(tmp_path / "config.json")["run"]["in_memory"] is False
  assert (tmp_path / "samples" / "step_00000002.png").exists()


def run_single_and_multi(in_memory, k, scan):
  """k single steps, and one make_multi_step call of k steps, from the same state: (single state, its
  metrics per step, multi state, its stacked metrics as one dict per step)."""
  config, mesh, data, state, slots = setup(Config(batch_size=8, latent_dim=16, seed=5, g_ema_decay=0.9))
  one = step_lib.make_train_step(config, 1, len(data) if in_memory else None)
  single = parallel.pmap_step(one, in_memory)
  multi = parallel.make_multi_step(one, k, in_memory, scan=bool(scan), p_step=single)
  if in_memory:
    inputs = [jax.device_put(data, NamedSharding(mesh, P()))] * k
    multi_input = inputs[0]
  else:  # any batches will do: (devices, d_steps, per_device, H, W, C) per step
    inputs = [data[8 * i:8 * (i + 1)].reshape(4, 1, 2, 28, 28, 1) for i in range(k)]
    multi_input = np.stack(inputs, axis=1)
  state_b = jax.tree.map(lambda x: x.copy(), state)  # the steps donate their input state
  history = []
  for batch in inputs:
    state, metrics = single(state, slots, batch)
    history.append(jax.device_get(metrics))
  state_b, stacked = multi(state_b, slots, multi_input)
  assert int(state_b.step) == k
  return state, history, state_b, progress.per_step([jax.device_get(stacked)])


@pytest.mark.parametrize("in_memory", [True, False])
def test_steps_per_call_on_cpu_is_bitwise_single_steps(in_memory):
  """--steps_per_call on CPU: K steps per call = K single steps, bit for bit (state and metrics).
  Catches K steps that skip, repeat or reorder steps, data or noise."""
  state, history, state_b, per_step = run_single_and_multi(in_memory, k=3, scan=None)
  arrays = lambda s: jax.device_get((s.step, jax.random.key_data(s.key), s.g, s.d, s.g_ema))
  leaves = jax.tree_util.tree_leaves_with_path(arrays(state_b))
  for (path, a), b in zip(leaves, jax.tree.leaves(arrays(state)), strict=True):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  assert per_step == history


def test_scanned_steps_match_single_steps():
  """The accelerators' --steps_per_call, one lax.scan, run here on CPU: the same math as single steps,
  other rounding (the loop body is compiled apart from the single step).
  Catches a scan body that is not the step (other data, noise or state threading)."""
  state, history, state_b, per_step = run_single_and_multi(True, k=2, scan=True)
  # Relative L2 over all parameters and states, as in the topology tests: Adam's update follows the sign
  # of near-zero gradients, so single elements (of G's first bias) can differ by 1% while the whole
  # agrees closely.
  from dcgan_jax import checkpoints
  gap = checkpoints.relative_l2(jax.device_get((state_b.g, state_b.d, state_b.g_ema)),
                                jax.device_get((state.g, state.d, state.g_ema)))
  print("relative L2, scan vs single steps:", gap)
  assert 0 <= gap < 1e-4, gap  # measured 4.2e-7
  for m, ref in zip(per_step, history, strict=True):
    for name in ("d_loss", "g_loss", "d_real", "d_fake"):
      assert m[name] == pytest.approx(ref[name], rel=1e-5)
    for name in ("d_grad_norm", "g_grad_norm"):  # G's through the D just updated: see above
      assert m[name] == pytest.approx(ref[name], rel=1e-3)


def test_loop_with_steps_per_call_matches_single_steps(tmp_path):
  """The loop with --steps_per_call=4 over 6 steps (one 4-step call, then a 2-step call) logs and
  checkpoints after the calls that reach those steps, and ends bitwise where the single-step loop ends.
  Catches logging or checkpointing only at exact multiples inside a call (missed), and a short last call
  that trains too far."""
  import tensorflow_datasets as tfds
  from dcgan_jax import checkpoints
  base = dict(dataset="mnist", batch_size=8, latent_dim=16, num_steps=6, log_every=2, sample_every=6,
              checkpoint_every=3)
  with tfds.testing.mock_data(num_examples=32):
    train.train_and_evaluate(Config(**base), str(tmp_path / "a"))
    train.train_and_evaluate(Config(**base, steps_per_call=4), str(tmp_path / "b"))
  a, b = (checkpoints.read_state_numpy(str(tmp_path / x)) for x in "ab")
  assert a[1] == b[1] == 6
  for x, y in zip(jax.tree.leaves(b[0]), jax.tree.leaves(a[0]), strict=True):
    np.testing.assert_array_equal(x, y)
  lines = lambda x: read_jsonl(tmp_path / x / "metrics.jsonl")
  assert [l["step"] for l in lines("a")] == [2, 4, 6]
  assert [l["step"] for l in lines("b")] == [4, 6]  # logged after the call that reaches the step
  last = lambda x: {k: v for k, v in lines(x)[-1].items() if k not in ("steps_per_sec", "images_per_sec")}
  assert last("a") == last("b")  # both: the means over steps 5 and 6
  assert sorted(os.listdir(tmp_path / "b" / "checkpoints")) == ["4", "6"]


def _primitives(jaxpr) -> set:
  """Names of every primitive in a jaxpr, sub-jaxprs (scan/cond/pjit/custom_vjp bodies) included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


def test_step_has_no_loop_whose_length_depends_on_data():
  """XLA:GPU checks a while loop's condition on the host, blocking it until the device is idle, at every
  iteration (WhileThunk); only loops of static length (fori_loop/scan with Python bounds: `scan` in the
  jaxpr) run without. The data order once walked a cycle until in range (a `while`): not again.
  Catches a while loop in the step's jaxpr."""
  config = Config(batch_size=8, latent_dim=16).resolved()
  state = step_lib.create_train_state(config, 1)
  data = np.zeros((64, 28, 28, 1), np.uint8)
  step = step_lib.make_train_step(config, 1, num_examples=len(data))
  jaxpr = jax.make_jaxpr(step, axis_env=[(parallel.AXIS, 1)])(state, jnp.arange(8), data)
  names = _primitives(jaxpr.jaxpr)
  assert "while" not in names
  assert "scan" in names  # the data order's fixed-length loop is seen (so sub-jaxprs are searched)


def one_device_step(config, num_examples):
  """The pure step pmapped over the first device only: (state, positions (1, B), data) -> (state, metrics)."""
  return jax.pmap(step_lib.make_train_step(config, 1, num_examples), axis_name=parallel.AXIS,
                  in_axes=(None, 0, None), out_axes=(None, None), devices=jax.devices()[:1])


def test_d_steps_2_draws_distinct_real_batches_and_noise_in_the_data_order(monkeypatch):
  """--d_steps=2: each D update of step t gets its own real batch, real batch number 2t + k of the
  (seed, step) data order, and its own noise. Catches both updates given the same real batch (the
  `+ k` dropped from the batch number) or the same noise (the update index not folded into the key),
  and an order that is not the data order's."""
  from dcgan_jax import randomness
  seen = {"real": [], "z": []}
  record = lambda name: (lambda x: seen[name].append(np.asarray(x)))
  to_float, latents = step_lib.to_float, randomness.latents

  def spy_to_float(images):
    jax.debug.callback(record("real"), images)
    return to_float(images)

  def spy_latents(keys, dim):
    z = latents(keys, dim)
    jax.debug.callback(record("z"), z)
    return z

  monkeypatch.setattr(step_lib, "to_float", spy_to_float)
  monkeypatch.setattr(randomness, "latents", spy_latents)
  config = Config(batch_size=4, latent_dim=8, d_steps=2, seed=7).resolved()
  n = 32
  data = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 28, 28, 1), np.uint8)
  state = step_lib.create_train_state(config, 1)
  positions = np.arange(4, dtype=np.int32)[None]
  step = one_device_step(config, n)
  for _ in range(2):
    state, _ = step(state, positions, data)
  jax.effects_barrier()
  assert len(seen["real"]) == len(seen["z"]) == 4  # 2 steps x 2 D updates
  data_key = randomness.purpose_key(jax.random.key(7), randomness.DATA)
  for number, real in enumerate(seen["real"]):  # step t, update k: real batch number 2t + k
    expected = randomness.example_indices(data_key, jnp.int32(number), jnp.arange(4), 4, n)
    np.testing.assert_array_equal(real[:, 0, 0, 0], np.asarray(expected))
  assert not np.array_equal(seen["real"][0], seen["real"][1])
  assert not np.allclose(seen["z"][0], seen["z"][1]) and not np.allclose(seen["z"][1], seen["z"][2])


@pytest.mark.parametrize("optimizer,factor", [("adam", 1.0), ("rmsprop", 2 ** 0.5)])
def test_optimizers_take_their_first_step(optimizer, factor):
  """One real step per optimizer. Adam's first update moves every parameter with a nonzero gradient by
  lr (bias-corrected m / sqrt(v) = sign(g)); the seed's RMSprop(lr, rho=0.5) by lr * sqrt(2)
  (nu = 0.5 g^2). Catches an optimizer that is not the configured one (e.g. RMSprop with optax's
  default decay 0.9: lr * 3.16) or that is never applied."""
  config = Config(batch_size=4, latent_dim=8, optimizer=optimizer, learning_rate_g=1e-3,
                  learning_rate_d=1e-3).resolved()
  data = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), np.uint8)
  state = step_lib.create_train_state(config, 1)
  before = jax.device_get(state.d.params)
  state, metrics = one_device_step(config, 16)(state, np.arange(4, dtype=np.int32)[None], data)
  assert metrics["finite"] == 1.0
  moves = np.concatenate([np.abs(np.asarray(a) - np.asarray(b)).ravel()
                          for a, b in zip(jax.tree.leaves(jax.device_get(state.d.params)),
                                          jax.tree.leaves(before))])
  moved = moves[moves > 1e-6]
  assert len(moved) > 0.5 * len(moves)
  np.testing.assert_allclose(np.median(moved), 1e-3 * factor, rtol=0.02)


def test_minimax_generator_loss_in_a_real_step():
  """--loss=minimax trains G on log(1 - D(G(z))) (<= 0), non_saturating on -log D(G(z)) (>= 0), in a
  real step, with different generator updates. Catches the loss setting not reaching the step."""
  data = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), np.uint8)
  results = {}
  for loss in ("minimax", "non_saturating"):
    config = Config(batch_size=4, latent_dim=8, loss=loss).resolved()
    state, metrics = one_device_step(config, 16)(step_lib.create_train_state(config, 1),
                                                 np.arange(4, dtype=np.int32)[None], data)
    results[loss] = (float(metrics["g_loss"]), jax.device_get(state.g.params))
  assert results["minimax"][0] < 0 < results["non_saturating"][0]
  assert not np.array_equal(jax.tree.leaves(results["minimax"][1])[0],
                            jax.tree.leaves(results["non_saturating"][1])[0])


def test_the_penalties_train_finite_steps_on_4_devices_through_dropout():
  """Two pmapped steps on 4 devices of the mnist preset (dropout in D): plain, wasserstein with the
  gradient penalty, and R1. Each step is finite and moves G and D; a penalty is logged (> 0) and
  changes D's gradient against the same step without it. (Each loss's and penalty's gradients are
  checked exactly against the textbook on one device in test_variant_maths.py.) Catches NaNs from the
  double backward through dropout, and a penalty computed but not added to D's loss when the batch is
  split over devices."""
  def two_steps(**overrides):
    config = Config(**dict(dict(batch_size=8, latent_dim=16, base_width=8), **overrides))
    config, mesh, data, state, slots = setup(config)
    step = parallel.pmap_step(step_lib.make_train_step(config, 1, len(data)), replicated_data=True)
    data = jax.device_put(data, NamedSharding(mesh, P()))
    before = jax.device_get((state.g.params, state.d.params))
    history = []
    for _ in range(2):
      state, metrics = step(state, slots, data)
      history.append(jax.device_get(metrics))
    after = jax.device_get((state.g.params, state.d.params))
    for net in (0, 1):
      assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[net]), jax.tree.leaves(after[net])))
    assert all(m["finite"] == 1.0 for m in history), (overrides, history)
    return history

  plain = two_steps()[0]["d_grad_norm"]
  assert two_steps(loss="wasserstein", gp_weight=10.0)[0]["gp"] > 0
  r1 = two_steps(r1_weight=10.0)
  assert r1[0]["r1"] > 0 and r1[0]["d_grad_norm"] != plain
