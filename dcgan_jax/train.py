"""Training state, the pure pmapped train step, and the training loop.

    state, metrics = p_train_step(state, slots, data)

* `state` (TrainState) is one pytree holding everything a step needs: the step, the base PRNG key and, for
  G and D, params + batch_stats + optax state. It is replicated over all devices as a single
  jax.Array per leaf (pmap in_axes/out_axes None), so the loop never replicates or unreplicates.
* `slots` (int32, (local_devices, per_device_batch)) are the global positions of each device's examples
  within the global batch. Noise, dropout masks and the data order are functions of (seed, step, slot)
  (randomness.py), not of the device that happens to compute them.
* `data` is either the whole dataset (uint8, on every device, gathered inside the step) or this step's
  streamed batch (uint8, (local_devices, d_steps, per_device_batch, H, W, C)).

One step = `d_steps` discriminator updates, then one generator update through the *updated* D
(pytorch/examples order). G runs forward once per D update; the last one's fakes are reused for the G
update (jax.vjp keeps G's backward pass), so its BatchNorm statistics are updated once per D update.
Gradients and BatchNorm statistics are averaged over all devices inside the step.
"""

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

from absl import logging
import flax
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax

from dcgan_jax import checkpoints
from dcgan_jax import invariant
from dcgan_jax import losses
from dcgan_jax import models
from dcgan_jax import randomness
from dcgan_jax import writers
from dcgan_jax.config import Config, ConfigError

AXIS = "batch"  # the pmap axis name: BatchNorm and gradient means run over it.


class TrainingDivergedError(RuntimeError):
  """A loss or a parameter became NaN/inf. The message names the first such step."""


@flax.struct.dataclass
class NetState:
  params: Any
  batch_stats: Any  # {} for a network without BatchNorm
  opt_state: Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates of G done so far
  key: jax.Array  # typed PRNG key: jax.random.key(seed); every other key is derived from it
  g: NetState
  d: NetState
  g_ema: Any = None  # EMA of G's params (--g_ema_decay > 0), else None (no leaves: not checkpointed)

  def generator(self, use_ema: bool = True) -> NetState:
    """G for sampling: the EMA params when there are any (and use_ema), with G's BatchNorm statistics."""
    if use_ema and self.g_ema is not None:
      return self.g.replace(params=self.g_ema)
    return self.g


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------
def make_optimizer(config: Config, learning_rate: float) -> optax.GradientTransformation:
  if config.optimizer == "adam":  # DCGAN paper: Adam(2e-4, beta1=0.5)
    return optax.adam(learning_rate, b1=config.beta1, b2=config.beta2)
  # The seed's RMSprop(0.0002, 0.5): Keras' second positional argument is rho (the decay).
  return optax.rmsprop(learning_rate, decay=config.beta1)


def image_shape(config: Config, channels: int) -> tuple:
  return (config.image_size, config.image_size, channels)


def create_train_state(config: Config, channels: int) -> TrainState:
  """Initial state on the default device. `config` must be resolved (Config.resolved())."""
  generator, discriminator = models.build_models(config, channels)
  key = jax.random.key(config.seed)
  g_key, d_key = jax.random.split(randomness.purpose_key(key, randomness.INIT))
  g_vars = generator.init(g_key, jnp.zeros((1, config.latent_dim), jnp.float32), train=False)
  d_vars = discriminator.init(d_key, jnp.zeros((1,) + image_shape(config, channels), jnp.float32),
                              train=False)

  def net(variables, lr):
    params = variables["params"]
    return NetState(params, variables.get("batch_stats", {}), make_optimizer(config, lr).init(params))

  g = net(g_vars, config.learning_rate_g)
  # A copy, not the same arrays: the state's buffers are donated, and one buffer cannot be donated twice.
  g_ema = jax.tree.map(jnp.copy, g.params) if config.g_ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), key=key, g=g, d=net(d_vars, config.learning_rate_d),
                    g_ema=g_ema)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (matches the generator's tanh range)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


# --------------------------------------------------------------------------------------------------
# The step (pure; runs per device under pmap)
# --------------------------------------------------------------------------------------------------
def make_train_step(config: Config, channels: int,
                    num_examples: Optional[int] = None) -> Callable:
  """Returns train_step(state, slots, data) -> (state, metrics), to be pmapped over AXIS.

  num_examples: set for the in-memory path (data = the whole uint8 dataset (N, H, W, C));
                None for the streaming path (data = uint8 (d_steps, per_device_batch, H, W, C)).
  """
  generator, discriminator = models.build_models(config, channels, axis_name=AXIS)
  # --invariant_groups: the layers return gradients already summed over all devices in a fixed order,
  # of a loss that is each device's share of the global mean (invariant.py); else the usual pmean.
  grouped = config.invariant_groups > 0
  if grouped:
    group_size = config.batch_size // config.invariant_groups
    share = lambda v: jnp.sum(v) / config.batch_size  # this device's share of the global mean
    exact_mean = lambda v: invariant.global_mean(v, group_size, AXIS)  # metrics
    average = lambda grads: grads
  else:
    share = exact_mean = jnp.mean
    average = lambda grads: lax.pmean(grads, AXIS)
  g_tx = make_optimizer(config, config.learning_rate_g)
  d_tx = make_optimizer(config, config.learning_rate_d)

  def g_forward(params, batch_stats, z):
    fake, updates = generator.apply({"params": params, "batch_stats": batch_stats}, z, train=True,
                                    mutable=["batch_stats"])
    return fake, updates["batch_stats"]

  def d_forward(params, batch_stats, images, dropout_keys):
    logits, updates = discriminator.apply({"params": params, "batch_stats": batch_stats}, images,
                                          train=True, dropout_keys=dropout_keys, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  def d_step(d: NetState, real, fake, keys: randomness.StepKeys, k: int):
    """One discriminator update on a real and a fake batch (fake carries no gradient to G)."""

    def loss_fn(params):
      real_logits, bs = d_forward(params, d.batch_stats, real, keys.dropout_real(k))
      fake_logits, bs = d_forward(params, bs, fake, keys.dropout_fake_d(k))
      return losses.d_loss(real_logits, fake_logits, share), (bs, real_logits, fake_logits)

    (_, (bs, real_logits, fake_logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
    grads = average(grads)
    updates, opt_state = d_tx.update(grads, d.opt_state, d.params)
    metrics = dict(d_loss=losses.d_loss(real_logits, fake_logits, exact_mean),
                   d_real=exact_mean(jax.nn.sigmoid(real_logits)),
                   d_fake=exact_mean(jax.nn.sigmoid(fake_logits)), d_grad_norm=optax.tree.norm(grads))
    return NetState(optax.apply_updates(d.params, updates), bs, opt_state), metrics

  def g_step(g: NetState, g_vjp, g_batch_stats, fake, d: NetState, keys: randomness.StepKeys):
    """One generator update: backprop the G loss through the updated D, then through G's saved vjp.

    D's BatchNorm statistics from this pass are discarded: D is only ever run in training mode.
    """

    def loss_fn(fake):
      logits, _ = d_forward(d.params, d.batch_stats, fake, keys.dropout_fake_g())
      return losses.g_loss(logits, config.loss, share), logits

    (_, logits), fake_grad = jax.value_and_grad(loss_fn, has_aux=True)(fake)
    (grads,) = g_vjp(fake_grad)
    grads = average(grads)
    updates, opt_state = g_tx.update(grads, g.opt_state, g.params)
    new_g = NetState(optax.apply_updates(g.params, updates), g_batch_stats, opt_state)
    return new_g, dict(g_loss=losses.g_loss(logits, config.loss, exact_mean),
                       g_grad_norm=optax.tree.norm(grads))

  def train_step(state: TrainState, slots: jax.Array, data: jax.Array):
    keys = randomness.StepKeys(randomness.purpose_key(state.key, randomness.TRAIN), state.step, slots)
    data_key = randomness.purpose_key(state.key, randomness.DATA)

    def real_batch(k):
      if num_examples is None:
        return to_float(data[k])
      idx = randomness.example_indices(data_key, state.step * config.d_steps + k, slots,
                                       config.batch_size, num_examples)
      return to_float(data[idx])

    d, g_bs = state.d, state.g.batch_stats
    for k in range(config.d_steps):
      z = randomness.latents(keys.z(k), config.latent_dim)
      if k < config.d_steps - 1:
        fake, g_bs = g_forward(state.g.params, g_bs, z)
      else:  # keep G's backward pass for the G update
        fake, g_vjp, g_bs = jax.vjp(functools.partial(g_forward, batch_stats=g_bs, z=z), state.g.params,
                                    has_aux=True)
      d, d_metrics = d_step(d, real_batch(k), lax.stop_gradient(fake), keys, k)
    g, g_metrics = g_step(state.g, g_vjp, g_bs, fake, d, keys)

    metrics = {**d_metrics, **g_metrics}
    if not grouped:  # (grouped: already global means, from gradients that are the same everywhere)
      metrics = lax.pmean(metrics, AXIS)
    metrics["g_param_norm"] = optax.tree.norm(g.params)
    metrics["d_param_norm"] = optax.tree.norm(d.params)
    finite = [jnp.isfinite(metrics[k]) for k in ("d_loss", "g_loss", "g_param_norm", "d_param_norm")]
    metrics["finite"] = jnp.all(jnp.stack(finite)).astype(jnp.float32)
    g_ema = state.g_ema
    if g_ema is not None:
      g_ema = optax.incremental_update(g.params, g_ema, 1.0 - ema_decay(config.g_ema_decay, state.step + 1))
    return TrainState(step=state.step + 1, key=state.key, g=g, d=d, g_ema=g_ema), metrics

  return train_step


def make_scan_step(train_step: Callable, num_steps: int, in_memory: bool) -> Callable:
  """`num_steps` training steps as one `lax.scan`: one program, one dispatch (the accelerator path).

  Returns multi_step(state, slots, data) -> (state, metrics with a leading (num_steps,) axis), to be
  pmapped like train_step. In-memory: `data` is the dataset, the same for every step. Streaming: `data`
  has a leading (num_steps,) axis, one batch per step.
  """

  def multi_step(state, slots, data):
    if in_memory:
      return lax.scan(lambda s, _: train_step(s, slots, data), state, None, length=num_steps)
    return lax.scan(lambda s, batch: train_step(s, slots, batch), state, data)

  return multi_step


def _stack_steps(history: list) -> dict:
  """[metrics of step 1, ..., of step k] -> metrics with a leading (k,) axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *history)


def scan_steps_by_default() -> bool:
  """Whether make_steps_call runs its steps as one lax.scan on this backend (not on XLA:CPU)."""
  return jax.default_backend() != "cpu"


def make_steps_call(train_step: Callable, num_steps: int, in_memory: bool,
                    scan: Optional[bool] = None, single: Optional[Callable] = None) -> Callable:
  """`num_steps` training steps per call, one host round trip: what --steps_per_call runs.

  Returns call(state, slots, data) -> (state, metrics with a leading (num_steps,) axis, on device).
  `data` as for train_step (in-memory), or with a step axis after the device axis (streaming:
  (devices, num_steps, d_steps, per_device_batch, H, W, C)).

  scan (default: everywhere but on the CPU backend): the steps are one pmapped `lax.scan`, so a fast
  accelerator is not kept waiting by the host between steps.

  Otherwise the call dispatches the single-step program `single` (pmap_train_step(train_step); pass the
  one already in use to share its compilation) num_steps times, asynchronously, and stacks the metrics on
  device. Its results are therefore bitwise those of num_steps single steps. Why not one program on
  XLA:CPU: inside a loop body its convolutions take a far slower path (jax-ml/jax#12868; measured 9-12x
  per step here), and a program with the steps written out lets XLA fuse across steps (the BatchNorm
  running averages of consecutive steps became one fusion), which rounds differently; while a dispatch
  costs microseconds against a CPU step's tens of milliseconds.
  """
  if scan is None:
    scan = scan_steps_by_default()
  if scan:
    return pmap_train_step(make_scan_step(train_step, num_steps, in_memory), in_memory)
  single = single or pmap_train_step(train_step, in_memory)
  stack = jax.jit(_stack_steps)

  def call(state, slots, data):
    history = []
    for i in range(num_steps):
      state, metrics = single(state, slots, data if in_memory else data[:, i])
      history.append(metrics)
    return state, stack(history)

  return call


def ema_decay(decay: float, num_updates: jax.Array) -> jax.Array:
  """The EMA's decay after `num_updates` G updates: min(decay, (1 + n) / (10 + n)), the warm-up of
  tf.train.ExponentialMovingAverage. Without it the average would hold the random initial weights for
  ~1/(1 - decay) steps (63% of them after 468 steps at 0.999); with it, early on it averages over the
  steps taken so far.  ema <- d * ema + (1 - d) * params."""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def pmap_train_step(train_step: Callable, in_memory: bool) -> Callable:
  """pmaps the step: state and metrics replicated (in/out_axes None), slots mapped, data replicated
  (in-memory) or mapped (streaming). The input state's buffers are donated."""
  return jax.pmap(train_step, axis_name=AXIS, in_axes=(None, 0, None if in_memory else 0),
                  out_axes=(None, None), donate_argnums=(0,))


def make_sampler(generator, sample_bn: str = "running") -> Callable:
  """sample(g, z (n, latent_dim)) -> float32 images (n, H, W, C) in [-1, 1], jitted; `g` has `.params`
  and `.batch_stats` (a NetState) of the flax `generator` module.

  sample_bn = "running" (default): BatchNorm uses the running statistics (inference mode), so each
  image depends only on its own z, and a grid is the same whatever else is in the batch.
  "batch": BatchNorm uses the statistics of the sampled batch itself, as in pytorch/examples (which never
  switches G to eval mode); early in training this can look better, but an image then depends on the
  other latents in its batch. Running statistics are never modified by sampling.
  """
  train = sample_bn == "batch"

  @jax.jit
  def sample(g: NetState, z):
    out = generator.apply({"params": g.params, "batch_stats": g.batch_stats}, z, train=train,
                          mutable=["batch_stats"] if train else False)
    return out[0] if train else out

  return sample


def global_mesh() -> Mesh:
  """All devices of all processes along AXIS: what the pmapped step runs over (= the local devices in a
  single-process run)."""
  return Mesh(np.array(jax.devices()), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Host or device values -> one jax.Array per leaf, replicated on every device of `mesh`. In a
  multi-process run every process must pass the same values (they do: same seed, same data)."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):  # device_put cannot target other processes' devices
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(one, tree)


def device_slots(mesh: Mesh, per_device: int) -> jax.Array:
  """int32 (global devices, per_device): the global batch positions of each device's examples.

  Process p's local devices hold the consecutive block [p * L * b, (p + 1) * L * b) of the global batch.
  Placed once (sharded over AXIS) and reused every step.
  """
  n_local = jax.local_device_count()
  first = jax.process_index() * n_local * per_device
  local = np.arange(first, first + n_local * per_device, dtype=np.int32).reshape(n_local, per_device)
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local)


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def check_devices(config: Config, num_devices: int) -> None:
  """ConfigError unless the global batch (and --invariant_groups) split evenly over all devices."""
  if config.batch_size % num_devices:
    raise ConfigError(f"--batch_size={config.batch_size}: must be divisible by the number of devices "
                      f"({num_devices}); pick a multiple of it.")
  if config.invariant_groups % (2 * num_devices):
    # At least two groups per device: XLA:CPU fuses the per-group results of one group differently from
    # those of several (no concatenation), and its FMA contraction then rounds differently.
    raise ConfigError(f"--invariant_groups={config.invariant_groups}: must be a multiple of twice the "
                      f"number of devices ({2 * num_devices}); pick one that twice every device count "
                      "you compare divides, e.g. 16 for up to 8 devices.")


def _per_step(fetched: list) -> list:
  """Host metrics of single calls (dicts of scalars) and multi-step calls (dicts of (k,) arrays) ->
  one dict of scalars per step."""
  out = []
  for m in fetched:
    if np.ndim(m["d_loss"]) == 0:
      out.append(m)
    else:
      out += [{name: v[i] for name, v in m.items()} for i in range(len(m["d_loss"]))]
  return out


def _check_finite(history, first_step):
  """history: host metrics dicts of consecutive steps starting at first_step (state step before it)."""
  for i, m in enumerate(history):
    if m["finite"] < 1:
      bad = ", ".join(f"{k}={m[k]:.4g}" for k in ("d_loss", "g_loss", "g_param_norm", "d_param_norm"))
      raise TrainingDivergedError(
          f"training diverged at step {first_step + i + 1}: non-finite values ({bad}); lower "
          "--learning_rate_g/--learning_rate_d or check the data")


def train_and_evaluate(config: Config, workdir: str) -> TrainState:
  """Trains a DCGAN as configured, writing logs, samples and the config into workdir.

  Returns the final TrainState (replicated over the devices).
  """
  # Imported here so that the training core (this module's step functions) never needs TensorFlow.
  from dcgan_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  config = config.resolved()
  devices = jax.local_devices()
  n_dev = len(devices)
  check_devices(config, n_dev * jax.process_count())
  per_device = config.batch_size // (n_dev * jax.process_count())

  # ---- Data ----------------------------------------------------------------------------------------
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.dataset_spec(config, builder)
  channels = input_pipeline.dataset_channels(spec, config.channels)
  shape = image_shape(config, channels)
  in_memory = input_pipeline.choose_in_memory(config, spec, shape)
  mesh = global_mesh()
  slots = device_slots(mesh, per_device)
  if in_memory:
    t0 = time.time()
    images = input_pipeline.load_in_memory(config, shape, builder)
    num_examples = len(images)
    data = replicate(images, mesh)
    logging.info("Loaded %s:%s into device memory: %s uint8 in %.1fs.", config.dataset, config.split,
                 data.shape, time.time() - t0)
    next_data = lambda: data
  else:
    num_examples = spec.num_examples
    stream = input_pipeline.stream_batches(config, shape, n_dev, per_device * config.d_steps,
                                           jax.process_index(), jax.process_count(), builder)
    # (n_dev, d_steps * b, H, W, C) -> (n_dev, d_steps, b, H, W, C)
    next_data = lambda: next(stream).reshape((n_dev, config.d_steps, per_device) + shape)
    logging.info("Streaming %s:%s with tf.data (%s examples).", config.dataset, config.split,
                 num_examples)
  if num_examples is not None and config.batch_size > num_examples:
    raise ConfigError(f"--batch_size={config.batch_size}: larger than the {num_examples} examples of "
                      f"{config.dataset}:{config.split}; use a smaller batch.")
  if (config.num_steps * config.d_steps + 1) * config.batch_size >= 2**31:
    raise ConfigError(f"--num_steps={config.num_steps}: more than 2**31 examples would be drawn; "
                      "train for fewer steps (or a smaller batch).")

  # ---- Outputs --------------------------------------------------------------------------------------
  writer = writers.RunWriter(workdir, enabled=jax.process_index() == 0)
  writer.write_config(config, extra=dict(devices=n_dev, device_kind=devices[0].device_kind,
                                         backend=jax.default_backend(), in_memory=in_memory,
                                         num_examples=num_examples, channels=channels,
                                         git_commit=checkpoints.git_commit()))
  logging.info("Config: %s", json.dumps(dict(config.__dict__)))

  # ---- State: fresh, or the newest readable checkpoint of this workdir ------------------------------
  state = replicate(create_train_state(config, channels), mesh)
  checkpointer = checkpoints.Checkpointer(workdir, config)
  restored, restored_step = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resuming from step %d (%s).", restored_step,
                 os.path.join(checkpointer.directory, str(restored_step)))
    writer.truncate_metrics(restored_step)  # lines a killed run logged after its last checkpoint
    if not in_memory:
      logging.warning("Streaming data path: the data order after a resume differs from an "
                      "uninterrupted run's (use --in_memory=true for exact resumption).")
  one_step = make_train_step(config, channels, num_examples if in_memory else None)
  single_step = pmap_train_step(one_step, in_memory)
  step_fns = {1: single_step}

  def run_steps(state, k):
    """k training steps with one host round trip (make_steps_call; one function per k, made on first
    use; on CPU they all run single_step's compiled program)."""
    if k not in step_fns:
      step_fns[k] = make_steps_call(one_step, k, in_memory, single=single_step)
    if in_memory or k == 1:
      data = next_data()
    else:  # (n_dev, k, d_steps, b, H, W, C): one streamed batch per step
      data = np.stack([next_data() for _ in range(k)], axis=1)
    return step_fns[k](state, slots, data)

  sample = make_sampler(models.build_models(config, channels)[0], config.sample_bn)
  grid_z = randomness.eval_latents(jax.random.key(config.seed), config.num_samples, config.latent_dim)
  ema = state.g_ema is not None

  # ---- Evaluation during training (optional): FID/KID, and the best checkpoint by FID ----------------
  if config.eval_every:
    best_checkpointer = checkpoints.Checkpointer(workdir, config, subdir="best", max_to_keep=1)
    best = (best_checkpointer.latest_score() or {}).get("fid", float("inf"))
    # Every process evaluates (the same computation on the same data), so that all arrive at the
    # best-checkpoint decision together: a process waiting on another's minute-long evaluation would
    # time out in the collective (gloo: 30 s). Process 0's FID decides; only process 0 writes.
    scorer = _make_scorer(config, shape)
    eval_z = randomness.eval_latents(jax.random.key(config.seed), config.eval_samples, config.latent_dim)

  # ---- Train ----------------------------------------------------------------------------------------
  step = int(state.step)
  pending, pending_start = [], step  # metrics still on device (no host sync until they are needed)
  fetched = []  # host metrics since the last log line
  t_last, step_last = None, step
  with _StopOnSignal() as stop:
    while step < config.num_steps:
      k = min(config.steps_per_call, config.num_steps - step)
      state, metrics = run_steps(state, k)
      pending.append(metrics)
      step += k
      if t_last is None:  # the first call compiles: start the clock after it
        jax.block_until_ready(metrics)
        t_last, step_last = time.time(), step
      # Did this call's steps (step - k, step] reach a multiple of `every`?
      reached = lambda every: step // every > (step - k) // every
      done = step == config.num_steps or stop.signal is not None
      save = done or reached(config.checkpoint_every)
      log = done or reached(config.log_every)
      if save or log:  # never checkpoint a state that is not finite
        host = _per_step(jax.device_get(pending))
        _check_finite(host, pending_start)
        fetched += host
        pending, pending_start = [], step
      if log:
        now = time.time()
        rate = (step - step_last) / (now - t_last) if step > step_last else float("nan")
        mean = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}
        mean.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size)
        writer.write_metrics(step, mean)
        eta = (config.num_steps - step) / rate if rate > 0 else float("nan")
        logging.info("step %d/%d | d_loss %.3f g_loss %.3f D(x) %.2f D(G(z)) %.2f | %.2f steps/s "
                     "%.0f img/s | ETA %s", step, config.num_steps, mean["d_loss"], mean["g_loss"],
                     mean["d_real"], mean["d_fake"], rate, rate * config.batch_size, _fmt_eta(eta))
        fetched, t_last, step_last = [], now, step
      if (reached(config.sample_every) or done) and writer.enabled:
        # From a host copy of G, on this process's default device: only process 0 draws samples.
        writer.write_samples(step, np.asarray(sample(jax.device_get(state.generator()), grid_z)))
        if ema:
          writer.write_samples(step, np.asarray(sample(jax.device_get(state.g), grid_z)), prefix="raw_")
      if config.eval_every and (reached(config.eval_every) or done):
        results = _evaluate(scorer, sample, state.generator(), eval_z)
        if ema:
          results.update({f"{k}_raw": v for k, v in _evaluate(scorer, sample, state.g, eval_z).items()})
        writer.write_metrics(step, results)
        if writer.enabled:
          logging.info("step %d | %s", step, " ".join(f"{k} {v:.4g}" for k, v in results.items()))
        fid = _broadcast(results["fid"])  # every process takes the same decision
        if fid < best:
          best = fid
          best_checkpointer.save(state, step, score=dict(fid=fid, step=step, ema=ema))
          logging.info("New best FID %.4g at step %d: checkpoint in %s.", fid, step,
                       best_checkpointer.directory)
      if save:
        checkpointer.save(state, step)  # asynchronous: returns once the arrays are off the devices
      if stop.signal is not None:
        checkpointer.wait()
        logging.warning("Stopped by %s at step %d; checkpoint written. Run the same command again to "
                        "resume.", stop.signal.name, step)
        break

  # ---- Finish ---------------------------------------------------------------------------------------
  checkpointer.close()
  if config.eval_every:
    best_checkpointer.close()
  if step == config.num_steps:
    path = checkpoints.export_generator(workdir, state, config, channels)
    logging.info("Done: %d steps. Generator exported to %s.", step, path)
    gif = writer.write_progress_gif()
    if gif:
      logging.info("Sample grids over training: %s", gif)
  writer.close()
  return state


def _make_scorer(config: Config, shape: tuple):
  """The evaluator for config.dataset (trained and cached on first use) and its test-split features."""
  from dcgan_jax import evaluator  # pylint: disable=g-import-not-at-top
  ev = evaluator.load_or_train(config.dataset, config.data_dir, shape, config.evaluator_dir)
  logging.info("Evaluator %s: test accuracy %.4f.", ev.path, ev.test_accuracy)
  return evaluator.Scorer(ev, config.data_dir, kid_subsets=20)


def sample_images(sample: Callable, g: NetState, z: jax.Array, chunk: int = 500) -> np.ndarray:
  """float32 images (n, H, W, C) in [-1, 1] for latents z (n, latent_dim), from a host copy of G, in
  chunks (sample_bn=batch: each chunk is one batch)."""
  g = jax.device_get(g)
  return np.concatenate([np.asarray(sample(g, z[i:i + chunk])) for i in range(0, len(z), chunk)])


def _evaluate(scorer, sample: Callable, g: NetState, z: jax.Array) -> dict:
  from dcgan_jax import evaluator  # pylint: disable=g-import-not-at-top
  images = evaluator.as_uint8_images(sample_images(sample, g, z), scorer.evaluator.image_shape)
  report = scorer.score(images, precision_recall=False)
  return {k: float(report[k]) for k in ("fid", "kid", "coverage", "class_kl")}


def _broadcast(value: float) -> float:
  """Process 0's value, on every process."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return float(multihost_utils.broadcast_one_to_all(np.float32(value)))


class _StopOnSignal:
  """Within the block, SIGTERM / SIGINT set `.signal` instead of killing the process, so the loop can
  finish its step and write a checkpoint (preemption, Ctrl-C). A second signal acts as usual."""

  def __enter__(self):
    self.signal, self._old = None, {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)
    signal.signal(signum, self._old[signum])  # a second Ctrl-C interrupts at once

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _fmt_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
