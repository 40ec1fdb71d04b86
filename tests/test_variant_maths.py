"""The variant maths against independent computations: the parameter gradients that one real training
step (the trainer's own step function, pmapped) applies, compared with the textbook formulas written
out here with jax.grad over the same Flax models built with plain lax convolutions.

The step runs with plain SGD at learning rate 1 (the one seam: step.make_optimizer), so that each
network's parameters after the step are exactly its parameters before minus the gradient it was given.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dcgan_jax import losses
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import randomness
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config

BATCH, LATENT = 4, 8


def tiny(**overrides) -> Config:
  return Config(**dict(dict(preset="dcgan", image_size=32, base_width=4, batch_size=BATCH,
                            latent_dim=LATENT, learning_rate_g=1.0, learning_rate_d=1.0), **overrides)).resolved()


def real_images(seed=0):
  return np.random.default_rng(seed).integers(0, 256, (1, BATCH, 32, 32, 1), np.uint8)  # (d_steps, b, ...)


_STEPS = {}  # (config, platform) -> the pmapped step: the lazy R1 cases share one compilation


def trainer_step(monkeypatch, config, state, platform=None):
  """One step of the trainer's own step function on one device, with SGD(lr) in place of the
  configured optimizer. Returns (new state, metrics, the step's z, the step's interpolation weights)."""
  if (config, platform) not in _STEPS:
    monkeypatch.setattr(step_lib, "make_optimizer", lambda config, learning_rate: optax.sgd(learning_rate))
    policy = platforms.Policy(platform) if platform else None
    _STEPS[config, platform] = jax.pmap(step_lib.make_train_step(config, 1, None, policy),
                                        axis_name=parallel.AXIS, in_axes=(None, 0, 0), out_axes=(None, None),
                                        devices=jax.devices()[:1])
  step = _STEPS[config, platform]
  positions = np.arange(BATCH, dtype=np.int32)[None]
  new, metrics = step(state, positions, real_images()[None])
  keys = randomness.StepKeys(randomness.purpose_key(state.key, randomness.TRAIN), state.step,
                             jnp.asarray(positions[0]))
  return new, metrics, randomness.latents(keys.z(0), LATENT), randomness.example_uniform(keys.mixing(0))


LOSSES = ("non_saturating", "minimax", "least_squares", "hinge", "wasserstein")


def textbook_gradients(config, state, z, eps, r1_weight=None):
  """The textbook step, written out: D's gradient of its loss (+ penalties) at the state, then G's
  gradient of its loss through the updated D. Plain lax convolutions, no pmap, jax.grad only."""
  r1_weight = config.r1_weight if r1_weight is None else r1_weight
  models_only = dataclasses.replace(config, loss="non_saturating", gp_weight=0.0, r1_weight=0.0, r1_every=1)
  return _textbook(models_only, state, z, eps, LOSSES.index(config.loss), config.gp_weight, r1_weight,
                   config.learning_rate_d)


@functools.partial(jax.jit, static_argnums=0)  # one compilation per model: loss and weights are traced
def _textbook(config, state, z, eps, loss_index, gp_weight, r1_weight, learning_rate_d):
  gen, disc = models.build_models(config, 1, form="lax")  # the plain-lax form, not the trainer's
  real = jnp.asarray(real_images()[0], jnp.float32) / 127.5 - 1.0
  fake, _ = gen.apply({"params": state.g.params, "batch_stats": state.g.batch_stats}, z, train=True,
                      mutable=["batch_stats"])
  fake = jax.lax.stop_gradient(fake)
  sig, log = jax.nn.sigmoid, jnp.log

  def d_out(params, stats, x):
    out, new = disc.apply({"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
    return out[:, 0], new.get("batch_stats", {})

  def input_gradients(params, stats, x):  # per example: D's outputs sum, so row i is dD(x_i)/dx_i
    return jax.grad(lambda x: jnp.sum(d_out(params, stats, x)[0]))(x)

  def d_loss(params):
    r, stats = d_out(params, state.d.batch_stats, real)
    f, stats = d_out(params, stats, fake)
    loss = jax.lax.switch(loss_index, [  # (a switch: the other losses' gradients are not computed)
        lambda: -jnp.mean(log(sig(r))) - jnp.mean(log(1 - sig(f))),  # non_saturating
        lambda: -jnp.mean(log(sig(r))) - jnp.mean(log(1 - sig(f))),  # minimax: the same D loss
        lambda: 0.5 * jnp.mean((r - 1) ** 2) + 0.5 * jnp.mean(f ** 2),  # least_squares
        lambda: jnp.mean(jnp.maximum(0.0, 1 - r)) + jnp.mean(jnp.maximum(0.0, 1 + f)),  # hinge
        lambda: jnp.mean(f) - jnp.mean(r),  # wasserstein
    ])
    x_hat = eps[:, None, None, None] * real + (1 - eps[:, None, None, None]) * fake
    norms = jnp.sqrt(jnp.sum(input_gradients(params, stats, x_hat) ** 2, axis=(1, 2, 3)))
    loss += gp_weight * jnp.mean((norms - 1) ** 2)
    loss += r1_weight * 0.5 * jnp.mean(jnp.sum(input_gradients(params, state.d.batch_stats, real) ** 2,
                                               axis=(1, 2, 3)))
    return loss, stats

  d_grads, d_stats = jax.grad(d_loss, has_aux=True)(state.d.params)
  new_d = jax.tree.map(lambda p, g: p - learning_rate_d * g, state.d.params, d_grads)

  def g_loss(params):
    fake, _ = gen.apply({"params": params, "batch_stats": state.g.batch_stats}, z, train=True,
                        mutable=["batch_stats"])
    f = d_out(new_d, d_stats, fake)[0]
    return jax.lax.switch(loss_index, [lambda: -jnp.mean(log(sig(f))), lambda: jnp.mean(log(1 - sig(f))),
                                       lambda: 0.5 * jnp.mean((f - 1) ** 2), lambda: -jnp.mean(f),
                                       lambda: -jnp.mean(f)])

  return d_grads, jax.grad(g_loss)(state.g.params)


def applied_gradients(before, after, learning_rate=1.0):
  return jax.tree.map(lambda b, a: (np.asarray(b) - np.asarray(a)) / learning_rate, before, after)


def assert_gradients_close(got, want, what):
  """Relative L2 distance of the whole gradient tree, and of each leaf that is not negligible."""
  got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
  total = np.sqrt(sum(np.sum(np.square(np.asarray(w, np.float64))) for w in want_leaves))
  error = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64) - np.asarray(w, np.float64)))
                      for g, w in zip(got_leaves, want_leaves)))
  assert total > 0, what
  assert error / total < 2e-4, f"{what}: relative L2 error {error / total:.3g}"


def compare(monkeypatch, config, platform=None, step=0, r1_weight=None):
  state = step_lib.create_train_state(config, 1)
  state = state.replace(step=jnp.asarray(step, state.step.dtype))
  new, metrics, z, eps = trainer_step(monkeypatch, config, state, platform)
  d_want, g_want = textbook_gradients(config, state, z, eps, r1_weight)
  assert_gradients_close(applied_gradients(state.d.params, new.d.params), d_want, f"{config.loss} D")
  assert_gradients_close(applied_gradients(state.g.params, new.g.params), g_want, f"{config.loss} G")
  return metrics, eps


D_NORMS = {"least_squares": "layer", "hinge": "none"}  # (spectral: the fixtures below)


@pytest.mark.parametrize("loss", ["non_saturating", pytest.param("minimax", marks=pytest.mark.slow),
                                  "least_squares", "hinge"])  # (minimax: D's loss is non_saturating's)
def test_each_loss_trains_d_and_g_on_its_own_formula(monkeypatch, loss):
  """The D and G gradients of one real step equal the textbook gradients of --loss (D: the loss on
  real and fake outputs; G: its generator loss through the updated D). Catches D trained with the
  default cross-entropy whatever --loss says (the logged d_loss still right), a G loss of another
  kind, a sign error, a missing 1/2, and the G update taken through the old D; D with BatchNorm, layer
  norm (least squares) and none (hinge): the step's other paths through D's statistics."""
  compare(monkeypatch, tiny(loss=loss, d_norm=D_NORMS.get(loss, "batch")))


def test_the_gradient_penalty_interpolates_each_example_with_its_own_weight(monkeypatch):
  """WGAN-GP (wasserstein + --gp_weight=10): D's gradient equals E[(||grad D(x_hat)||_2 - 1)^2] * 10
  added to the critic loss, with x_hat = eps_i real_i + (1 - eps_i) fake_i and one eps_i per example
  (the weights themselves differ between examples). Catches one interpolation weight for the whole
  batch, the norm over the batch instead of per example, the penalty on real or fake images, and a
  missing weight."""
  metrics, eps = compare(monkeypatch, tiny(loss="wasserstein", gp_weight=10.0))
  assert float(metrics["gp"]) > 0 and len(np.unique(np.asarray(eps))) == BATCH


@pytest.mark.parametrize("platform", [None, "gpu"])
def test_r1_and_lazy_r1_weight_the_penalty_by_its_interval(monkeypatch, platform):
  """R1 (--r1_weight=gamma): D's gradient adds gamma * E[||grad D(x_real)||^2] / 2. Lazy R1
  (--r1_every=4) adds 4 * gamma of it on updates 0, 4, 8, ... and nothing on the others, in the XLA:CPU
  form (weighted by 0 off the schedule) and in the accelerators' form (a lax.cond; platform "gpu").
  Catches lazy R1 not multiplied by its interval (in either form), R1 applied off the schedule, and R1
  at fake images."""
  if platform is None:  # (R1 on every update has no second form)
    compare(monkeypatch, tiny(r1_weight=0.5), platform)
  compare(monkeypatch, tiny(r1_weight=0.5, r1_every=4), platform, step=0, r1_weight=0.5 * 4)
  compare(monkeypatch, tiny(r1_weight=0.5, r1_every=4), platform, step=1, r1_weight=0.0)


def test_layer_norm_normalises_each_example_over_height_width_and_channels():
  """--d_norm=layer: each example's activations (H, W, C) minus their mean over all of H, W and C,
  over the square root of that variance plus epsilon, then a scale and bias per channel; written out
  here with numpy. Catches normalising over the channels alone (each pixel on its own), over the
  batch, or without the per-channel scale."""
  layer = models._hidden_norm("layer", None)  # pylint: disable=protected-access
  x = np.random.default_rng(0).normal(2.0, 3.0, (2, 4, 5, 3)).astype(np.float32)
  scale = np.array([0.5, 1.0, 2.0], np.float32)
  variables = {"params": {"scale": scale, "bias": np.array([0.1, 0.0, -0.1], np.float32)}}
  mean = x.mean(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
  var = x.var(axis=(1, 2, 3), keepdims=True, dtype=np.float64)
  want = (x - mean) / np.sqrt(var + 1e-6) * scale + variables["params"]["bias"]
  np.testing.assert_allclose(layer.apply(variables, x), want, rtol=1e-5, atol=1e-5)


def test_spectral_normalisation_divides_by_sigma_and_its_gradient_flows_through_sigma():
  """--d_norm=spectral on a layer, in a training pass: the output uses W / sigma, sigma = v^T W u after
  one power iteration from the stored u (v = W u / ||W u||, u' = W^T v / ||W^T v||; as torch's
  spectral_norm: u and v carry no gradient, sigma does), u' is stored, and the kernel's gradient is that
  of the formula written out here. Catches sigma under stop_gradient (the documented gradient through
  sigma lost), no power iteration, u not stored, and the iteration run on W^T."""
  dense = models.Dense(features=3, spectral=True)
  x = np.random.default_rng(1).normal(size=(5, 4)).astype(np.float32)
  cotangent = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
  variables = dense.init(jax.random.key(0), x)
  u0, bias = variables["batch_stats"]["spectral_u"], variables["params"]["bias"]

  def layer_loss(kernel):
    y, new = dense.apply({"params": {"kernel": kernel, "bias": bias}, "batch_stats": {"spectral_u": u0}}, x,
                         mutable=["batch_stats"])
    return jnp.sum(y * cotangent), new["batch_stats"]["spectral_u"]

  def textbook_loss(kernel):
    normalize = lambda a: a / jnp.linalg.norm(a)
    v = jax.lax.stop_gradient(normalize(kernel @ u0))  # kernel: (fan_in, features), u: (features,)
    u = jax.lax.stop_gradient(normalize(kernel.T @ v))
    sigma = v @ kernel @ u
    return jnp.sum((x @ (kernel / sigma) + bias) * cotangent), u

  kernel = variables["params"]["kernel"]
  (got, stored), got_grad = jax.value_and_grad(layer_loss, has_aux=True)(kernel)
  (want, u1), want_grad = jax.value_and_grad(textbook_loss, has_aux=True)(kernel)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(stored, u1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Against code others wrote: fixtures recorded with PyTorch (experiments/torch_reference_fixtures.py).
# ---------------------------------------------------------------------------------------------------
TORCH = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "torch_reference.npz"))


@pytest.mark.parametrize("layer", ["dense", "conv"])
def test_spectral_normalisation_equals_torchs_spectral_norm(layer):
  """--d_norm=spectral's layer against torch.nn.utils.spectral_norm (one power iteration, training mode)
  from the same weight and u: the output, the stored u and the weight's and bias's gradients, for a
  dense layer and a 4x4 stride-2 convolution. Catches sigma under stop_gradient, the power iteration
  on the transposed matrix, a conv kernel reshaped so that output channels mix (reshape(features, -1)),
  and u not updated."""
  get = lambda name: TORCH[f"spectral_{layer}_{name}"].astype(np.float32)
  module = (models.Dense(features=3, spectral=True) if layer == "dense" else
            models.Conv(features=3, kernel_size=(4, 4), strides=(2, 2), padding=((1, 1), (1, 1)), spectral=True))

  def loss(params):
    y, new = module.apply({"params": params, "batch_stats": {"spectral_u": get("u")}}, get("x"),
                          mutable=["batch_stats"])
    return jnp.sum(y * get("cotangent")), (y, new["batch_stats"]["spectral_u"])

  grads, (y, u1) = jax.grad(loss, has_aux=True)({"kernel": get("kernel"), "bias": get("bias")})
  np.testing.assert_allclose(y, TORCH[f"spectral_{layer}_y"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(u1, TORCH[f"spectral_{layer}_u1"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["kernel"], TORCH[f"spectral_{layer}_grad_kernel"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads["bias"], TORCH[f"spectral_{layer}_grad_bias"], rtol=1e-4, atol=1e-5)


def test_each_loss_has_pytorch_studioGANs_gradients():
  """Each --loss's D loss (with respect to the real and fake logits) and G loss (fake logits) against
  the same losses written with torch.nn.functional as PyTorch-StudioGAN writes them. Catches a sign
  error, a missing 1/2 in least squares, hinge's margin on the wrong side, and minimax's G loss
  replaced by the non-saturating one."""
  real, fake = TORCH["loss_real"].astype(np.float32), TORCH["loss_fake"].astype(np.float32)
  for kind in LOSSES:
    d_real, d_fake = jax.grad(lambda r, f: losses.d_loss(r, f, kind), argnums=(0, 1))(real, fake)
    g_fake = jax.grad(lambda f: losses.g_loss(f, kind))(fake)
    for name, got in (("d_grad_real", d_real), ("d_grad_fake", d_fake), ("g_grad_fake", g_fake)):
      np.testing.assert_allclose(got, TORCH[f"loss_{kind}_{name}"], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{kind} {name}")


def test_penalties_have_the_authors_pytorch_gradients():
  """The gradient penalty and R1 (losses.gradient_penalty, losses.r1_penalty over per-example input
  gradients taken as the step takes them: the vjp of D's summed outputs) on a tiny tanh critic, against
  WGAN-GP's PyTorch code (autograd.grad with create_graph, the norm per example) and R1 as Mescheder
  et al.'s code writes it (gamma / 2 times the squared norm): the critic parameters' gradients. Catches
  the norm over the whole batch, a squared norm in the gradient penalty, and R1 without its 1/2."""
  get = lambda name: jnp.asarray(TORCH[name], jnp.float32)
  critic = lambda p, x: jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"]) @ p["w2"]
  params = {"w1": get("penalty_w1"), "b1": get("penalty_b1"), "w2": get("penalty_w2")}
  eps = get("penalty_eps")[:, None, None, None]
  mixed = eps * get("penalty_real") + (1 - eps) * get("penalty_fake")

  def input_grads(p, x):
    out, vjp = jax.vjp(lambda x: critic(p, x), x)
    return vjp(jnp.ones_like(out))[0]

  penalties = {"gp": lambda p: float(TORCH["gp_weight"]) * losses.gradient_penalty(input_grads(p, mixed)),
               "r1": lambda p: float(TORCH["r1_gamma"]) * losses.r1_penalty(input_grads(p, get("penalty_real")))}
  for name, penalty in penalties.items():
    grads = jax.grad(penalty)(params)
    for key in params:
      np.testing.assert_allclose(grads[key], TORCH[f"{name}_grad_{key}"], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{name} {key}")
