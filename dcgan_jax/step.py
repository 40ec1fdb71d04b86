"""The training state, the optimizers, and the pure training step (per device; parallel.py pmaps it).

    state, metrics = train_step(state, positions, data)

* `state` (TrainState) is one pytree holding everything a step needs: the step, the base PRNG key and,
  for G and D, params + batch_stats + optax state (and the EMA of G's params). It is exactly what a
  checkpoint holds.
* `positions` (int32, (per_device_batch,)) are the global positions of this device's examples within
  the global batch. Noise, dropout masks and the data order are functions of (seed, step, position)
  (randomness.py), not of the device that happens to compute them.
* `data` is either the whole dataset (uint8 (N, H, W, C), the same on every device; batches gathered
  inside the step by data.feeding) or this step's streamed examples (uint8 (d_steps, per_device_batch,
  H, W, C)); the update itself (module-level `train_step`) only ever sees the step's batches.

One step = `d_steps` discriminator updates, then one generator update through the *updated* D
(pytorch/examples order). G runs forward once per D update; the last one's fakes are reused for the G
update (jax.vjp keeps G's backward pass), so its BatchNorm statistics are updated once per D update.
Gradients and BatchNorm statistics are averaged over the global batch (pmap axis parallel.AXIS).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import jax
from jax import lax
import jax.numpy as jnp
import optax

from dcgan_jax.datasets import data as data_lib
from dcgan_jax.ops import invariant
from dcgan_jax import losses
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import randomness
from dcgan_jax.config import Config

AXIS = parallel.AXIS  # BatchNorm statistics and gradient means run over the global batch


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


def make_optimizer(config: Config, learning_rate: float) -> optax.GradientTransformation:
  if config.optimizer == "adam":  # DCGAN paper: Adam(2e-4, beta1=0.5)
    return optax.adam(learning_rate, b1=config.beta1, b2=config.beta2)
  # The seed's RMSprop(0.0002, 0.5): Keras' second positional argument is rho (the decay).
  return optax.rmsprop(learning_rate, decay=config.beta1)


def create_train_state(config: Config, channels: int) -> TrainState:
  """The initial state (float32 parameters, whatever --compute_dtype), on the default device.
  `config` must be resolved (Config.resolved())."""
  # Every convolution form has the same parameters, and init runs the models once only for shapes: the
  # plain lax form, whose first pass is quick (the XLA:CPU form compiles its kernels: seconds).
  generator, discriminator = models.build_models(config, channels, form="lax")
  key = jax.random.key(config.seed)
  g_key, d_key = jax.random.split(randomness.purpose_key(key, randomness.INIT))
  g_vars = generator.init(g_key, jnp.zeros((1, config.latent_dim), jnp.float32), train=False)
  d_vars = discriminator.init(d_key, jnp.zeros((1,) + config.image_shape(channels), jnp.float32),
                              train=False)

  def net(variables, lr):
    params = variables["params"]
    return NetState(params, variables.get("batch_stats", {}), make_optimizer(config, lr).init(params))

  g = net(g_vars, config.learning_rate_g)
  # A copy, not the same arrays: the state's buffers are donated, and one buffer cannot be donated twice.
  g_ema = jax.tree.map(jnp.copy, g.params) if config.g_ema_decay > 0 else None
  return TrainState(step=jnp.zeros((), jnp.int32), key=key, g=g, d=net(d_vars, config.learning_rate_d),
                    g_ema=g_ema)


def state_bytes(state) -> int:
  """Bytes of a state's arrays (or of their jax.eval_shape shapes), keys left out."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
             if hasattr(x, "dtype") and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def to_float(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1] (matches the generator's tanh range)."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def ema_decay(decay: float, num_updates: jax.Array, rampup: float = 0.0) -> jax.Array:
  """The EMA's decay after `num_updates` (n >= 1) G updates.  ema <- d * ema + (1 - d) * params.

  Without a warm-up the average would hold the random initial weights for ~1/(1 - decay) steps (63% of
  them after 468 steps at 0.999). rampup = 0: min(decay, (1 + n) / (10 + n)), the warm-up of
  tf.train.ExponentialMovingAverage (a horizon of about (10 + n) / 9 updates). rampup = r > 0:
  StyleGAN2's ramp-up, min(decay, 0.5 ** (1 / (r * n))): a half-life of at most r * n updates, shorter
  than the default's early on (r = 0.05: 23 updates at n = 469, where the default's horizon is 53)."""
  n = num_updates.astype(jnp.float32)
  if rampup > 0:
    return jnp.minimum(decay, 0.5 ** (1.0 / (rampup * n)))
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


@dataclasses.dataclass(frozen=True)
class Trainer:
  """What a step needs besides its inputs: the settings, the models, the optimizers, how batch means
  are reduced (invariant.Reductions) and the platform policy. Built once by make_train_step."""
  config: Config
  generator: Any  # flax Module (models.build_models, with axis_name=AXIS)
  discriminator: Any
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  reduce: invariant.Reductions
  policy: platforms.Policy

  def g_forward(self, params, batch_stats, z):
    fake, updates = self.generator.apply({"params": params, "batch_stats": batch_stats}, z, train=True,
                                         mutable=["batch_stats"])
    return fake, updates["batch_stats"]

  def d_forward(self, params, batch_stats, images, dropout_keys):
    logits, updates = self.discriminator.apply({"params": params, "batch_stats": batch_stats}, images,
                                               train=True, dropout_keys=dropout_keys, mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  def d_forward_and_input_grads(self, params, batch_stats, images, dropout_keys):
    """D's logits, updated statistics, and the gradient of its summed logits with respect to its
    input (batch, H, W, C): the penalties' per-example gradients, differentiable again in params."""
    logits, vjp, updates = jax.vjp(lambda x: self.d_forward(params, batch_stats, x, dropout_keys), images,
                                   has_aux=True)
    (grads,) = vjp(jnp.ones_like(logits))
    return logits, updates, grads

  def d_output(self, logits):
    """D's output as a number to log: a probability for the cross-entropy losses, else the raw score."""
    return jax.nn.sigmoid(logits) if self.config.loss in losses.PROBABILISTIC else logits


def d_update(t: Trainer, d: NetState, real, fake, keys: randomness.StepKeys, k: int, r1_weight):
  """The k-th discriminator update, on a real and a fake batch (fake carries no gradient to G), with
  the gradient penalty (--gp_weight) and R1 (r1_weight: --r1_weight, times N on lazy updates)."""
  config, share = t.config, t.reduce.share

  def loss_fn(params):
    penalties = {}
    # R1 at the real pass itself: its input gradient, differentiated again below. (r1_weight is a
    # Python number, or an array when the lazy schedule weights it on CPU: then always computed.)
    if not isinstance(r1_weight, (int, float)) or r1_weight:
      real_logits, bs, real_grads = t.d_forward_and_input_grads(params, d.batch_stats, real,
                                                                keys.dropout_real(k))
      penalties["r1"] = losses.r1_penalty(real_grads, share)
    else:
      real_logits, bs = t.d_forward(params, d.batch_stats, real, keys.dropout_real(k))
    fake_logits, bs = t.d_forward(params, bs, fake, keys.dropout_fake_d(k))
    loss = losses.d_loss(real_logits, fake_logits, config.loss, share)
    if config.gp_weight:
      eps = randomness.example_uniform(keys.mixing(k))[:, None, None, None]
      mixed = eps * real + (1.0 - eps) * fake
      # The interpolates' BatchNorm statistics are discarded: running averages follow real and fake.
      _, _, mixed_grads = t.d_forward_and_input_grads(params, bs, mixed, keys.dropout_mixed(k))
      penalties["gp"] = losses.gradient_penalty(mixed_grads, share)
    loss += config.gp_weight * penalties.get("gp", 0.0) + r1_weight * penalties.get("r1", 0.0)
    return loss, (bs, real_logits, fake_logits, penalties)

  (_, (bs, real_logits, fake_logits, penalties)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
  grads = t.reduce.average(grads)
  updates, opt_state = t.d_tx.update(grads, d.opt_state, d.params)
  mean = t.reduce.mean
  metrics = dict(d_loss=losses.d_loss(real_logits, fake_logits, config.loss, mean),
                 d_real=mean(t.d_output(real_logits)), d_fake=mean(t.d_output(fake_logits)),
                 d_grad_norm=optax.tree.norm(grads))
  metrics.update(penalties)  # this device's share when grouped (no penalties then: config refuses)
  return NetState(optax.apply_updates(d.params, updates), bs, opt_state), metrics


def d_update_lazy_r1(t: Trainer, d: NetState, real, fake, keys: randomness.StepKeys, k: int, number):
  """--r1_every=N > 1: R1, weighted by N, on D updates number 0, N, 2N, ... only. Where a branch saves
  work (platforms.Policy.branches_skip_work), a lax.cond skips the double backward on the other updates;
  on XLA:CPU R1 is computed on every update and weighted 0 off the schedule (the same gradients: the
  term adds exact zeros). Metrics: r1 is 0 off the schedule."""
  config = t.config
  due = number % config.r1_every == 0
  if not t.policy.branches_skip_work:
    new, m = d_update(t, d, real, fake, keys, k, config.r1_weight * config.r1_every * due.astype(jnp.float32))
    return new, dict(m, r1=jnp.where(due, m["r1"], 0.0))
  with_r1 = lambda: d_update(t, d, real, fake, keys, k, config.r1_weight * config.r1_every)
  without = lambda: (lambda new, m: (new, dict(m, r1=jnp.zeros((), jnp.float32))))(
      *d_update(t, d, real, fake, keys, k, 0.0))
  return lax.cond(due, with_r1, without)


def g_update(t: Trainer, g: NetState, g_vjp, g_batch_stats, fake, d: NetState, keys: randomness.StepKeys):
  """The generator update: backprop the G loss through the updated D, then through G's saved vjp.

  D's BatchNorm statistics from this pass are discarded: D is only ever run in training mode.
  """

  def loss_fn(fake):
    logits, _ = t.d_forward(d.params, d.batch_stats, fake, keys.dropout_fake_g())
    return losses.g_loss(logits, t.config.loss, t.reduce.share), logits

  (_, logits), fake_grad = jax.value_and_grad(loss_fn, has_aux=True)(fake)
  (grads,) = g_vjp(fake_grad)
  grads = t.reduce.average(grads)
  updates, opt_state = t.g_tx.update(grads, g.opt_state, g.params)
  new_g = NetState(optax.apply_updates(g.params, updates), g_batch_stats, opt_state)
  return new_g, dict(g_loss=losses.g_loss(logits, t.config.loss, t.reduce.mean),
                     g_grad_norm=optax.tree.norm(grads))


def train_step(t: Trainer, state: TrainState, positions: jax.Array, batches):
  """One step (module docstring): d_steps D updates, then G's, then the metrics and G's EMA.
  batches: the step's real images, uint8 (d_steps, per_device_batch, H, W, C) (data.feeding)."""
  config = t.config
  keys = randomness.StepKeys(randomness.purpose_key(state.key, randomness.TRAIN), state.step, positions)

  # ---- D updates, each on fakes from the current G (the last one's kept for G's backward pass) ---
  d, g_bs = state.d, state.g.batch_stats
  for k in range(config.d_steps):
    z = randomness.latents(keys.z(k), config.latent_dim)
    if k < config.d_steps - 1:
      fake, g_bs = t.g_forward(state.g.params, g_bs, z)
    else:
      fake, g_vjp, g_bs = jax.vjp(functools.partial(t.g_forward, batch_stats=g_bs, z=z), state.g.params,
                                  has_aux=True)
    real = to_float(batches[k])
    if config.r1_weight and config.r1_every > 1:
      d, d_metrics = d_update_lazy_r1(t, d, real, lax.stop_gradient(fake), keys, k,
                                      state.step * config.d_steps + k)
    else:
      d, d_metrics = d_update(t, d, real, lax.stop_gradient(fake), keys, k, config.r1_weight)

  # ---- G update, through the updated D -----------------------------------------------------------
  g, g_metrics = g_update(t, state.g, g_vjp, g_bs, fake, d, keys)

  # ---- Metrics and G's EMA -----------------------------------------------------------------------
  metrics = {**d_metrics, **g_metrics}
  if not t.reduce.exact:  # (exact: already global means, from gradients that are the same everywhere)
    metrics = lax.pmean(metrics, AXIS)
  metrics["g_param_norm"] = optax.tree.norm(g.params)
  metrics["d_param_norm"] = optax.tree.norm(d.params)
  finite = [jnp.isfinite(metrics[k]) for k in ("d_loss", "g_loss", "g_param_norm", "d_param_norm")]
  metrics["finite"] = jnp.all(jnp.stack(finite)).astype(jnp.float32)
  g_ema = state.g_ema
  if g_ema is not None:
    decay = ema_decay(config.g_ema_decay, state.step + 1, config.g_ema_rampup)
    g_ema = optax.incremental_update(g.params, g_ema, 1.0 - decay)
  return TrainState(step=state.step + 1, key=state.key, g=g, d=d, g_ema=g_ema), metrics


def make_train_step(config: Config, channels: int, num_examples: Optional[int] = None,
                    policy: Optional[platforms.Policy] = None) -> Callable:
  """Returns train_step(state, positions, data) -> (state, metrics), to be pmapped over AXIS.

  num_examples: set for the in-memory path (data = the whole uint8 dataset (N, H, W, C));
                None for the streaming path (data = uint8 (d_steps, per_device_batch, H, W, C)).
  policy: of the devices the step is compiled for (platforms.py; default: JAX's default backend's).
  """
  policy = policy or platforms.default()
  generator, discriminator = models.build_models(config, channels, axis_name=AXIS, policy=policy)
  trainer = Trainer(config, generator, discriminator, make_optimizer(config, config.learning_rate_g),
                    make_optimizer(config, config.learning_rate_d),
                    invariant.reductions(config.batch_size, config.invariant_groups, AXIS), policy)
  # The data path decides how `data` becomes the step's batches (gathered in memory, or streamed).
  return data_lib.feeding(functools.partial(train_step, trainer), config, num_examples, policy)
