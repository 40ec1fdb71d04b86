import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcgan_jax import models
from dcgan_jax import platforms
from dcgan_jax.config import Config

slow = pytest.mark.slow  # (the fast tier, -m "not slow", runs the others)


def count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def init(config, channels, abstract=False):
  """G, D and their variables, each initialised by one jitted program (flax's init in eager mode
  compiles every operation on its own: seconds), or only their shapes (abstract: jax.eval_shape)."""
  g, d = models.build_models(config.resolved(), channels)
  c = config.resolved()
  run = jax.eval_shape if abstract else (lambda f, *args: jax.jit(f)(*args))
  g_vars = run(functools.partial(g.init, train=False), jax.random.key(0), jnp.zeros((2, c.latent_dim)))
  d_vars = run(functools.partial(d.init, train=False), jax.random.key(1),
               jnp.zeros((2, c.image_size, c.image_size, channels)))
  return g, d, g_vars, d_vars


def test_mnist_preset_matches_the_seeds_keras_model():
  """The mnist preset has the seed's Keras parameter counts (G 2,318,016 trainable and 25,472 BatchNorm
  statistics, D 212,865, no BatchNorm in D), makes 28x28x1 images in [-1, 1] and gives one logit each.
  Catches a layer of another size, a missing or extra layer, and an output that is not tanh."""
  g, d, g_vars, d_vars = init(Config(preset="mnist"), 1)
  assert count(g_vars["params"]) == 2_318_016
  assert count(g_vars["batch_stats"]) == 25_472  # Keras' non-trainable BatchNorm moving mean/variance
  assert count(d_vars["params"]) == 212_865
  assert "batch_stats" not in d_vars
  z = jax.random.normal(jax.random.key(2), (3, 100))
  images = g.apply(g_vars, z, train=False)
  assert images.shape == (3, 28, 28, 1) and images.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(images))) <= 1.0
  assert d.apply(d_vars, images, train=False).shape == (3, 1)


@pytest.mark.parametrize("size,channels", [(32, 3), pytest.param(64, 3, marks=slow), pytest.param(64, 1, marks=slow)])
def test_dcgan_preset_shapes(size, channels):
  """The dcgan preset at each size and channel count: G's images have that shape, D gives one logit, and
  BatchNorm sits where the paper puts it (not in G's output layer nor D's input layer). Catches a wrong
  number of up- or down-sampling layers and BatchNorm in the excluded layers."""
  config = Config(preset="dcgan", image_size=size, base_width=8)
  g, d, g_vars, d_vars = init(config, channels, abstract=True)  # (shapes only: no computation)
  images = jax.eval_shape(functools.partial(g.apply, train=False), g_vars, jnp.ones((2, 100)))
  assert images.shape == (2, size, size, channels)
  assert jax.eval_shape(functools.partial(d.apply, train=False), d_vars, images).shape == (2, 1)
  # Paper: BatchNorm everywhere except G's output layer and D's input layer.
  n_up = size.bit_length() - 3
  assert len(g_vars["batch_stats"]) == n_up  # after the projection and each hidden ConvT
  assert len(d_vars["batch_stats"]) == n_up - 1  # every strided conv but the first


def test_dcgan_init_is_normal_002():
  """The dcgan preset initialises kernels from N(0, 0.02), as the paper. Catches flax's default lecun_normal
  (a std set by fan-in) or Keras' glorot_uniform on this preset."""
  _, _, g_vars, _ = init(Config(preset="dcgan", image_size=32, base_width=16), 3)
  kernel = g_vars["params"]["ConvTranspose_0"]["kernel"]
  assert abs(float(jnp.std(kernel)) - 0.02) < 0.002 and abs(float(jnp.mean(kernel))) < 0.002


@pytest.mark.parametrize("preset", ["mnist", pytest.param("dcgan", marks=slow)])
def test_running_statistics_make_each_output_independent_of_its_batch(preset):
  """In inference mode (running statistics) an image depends only on its own z, whatever the rest of the
  batch; in training mode it does depend on it. Catches sampling that uses batch statistics when running
  ones are asked for."""
  config = Config(preset=preset, image_size=None if preset == "mnist" else 32, base_width=8)
  g, _, g_vars, _ = init(config, 1)
  # Give the running statistics non-trivial values with one training-mode pass.
  _, upd = g.apply(g_vars, jax.random.normal(jax.random.key(3), (16, 100)), train=True,
                   mutable=["batch_stats"])
  g_vars = {"params": g_vars["params"], "batch_stats": upd["batch_stats"]}
  z = jax.random.normal(jax.random.key(4), (8, 100))
  other = jax.random.normal(jax.random.key(5), (8, 100)) * 3.0
  alone = g.apply(g_vars, z[:1], train=False)
  with_a = g.apply(g_vars, jnp.concatenate([z[:1], z[1:]]), train=False)[:1]
  with_b = g.apply(g_vars, jnp.concatenate([z[:1], other]), train=False)[:1]
  np.testing.assert_allclose(alone, with_a, atol=1e-5)
  np.testing.assert_allclose(alone, with_b, atol=1e-5)
  # Batch statistics, by contrast, do depend on the rest of the batch.
  train_a, _ = g.apply(g_vars, jnp.concatenate([z[:1], z[1:]]), train=True, mutable=["batch_stats"])
  train_b, _ = g.apply(g_vars, jnp.concatenate([z[:1], other]), train=True, mutable=["batch_stats"])
  assert float(jnp.max(jnp.abs(train_a[0] - train_b[0]))) > 1e-3


def test_dropout_mask_depends_only_on_the_examples_key():
  """ExampleDropout: example i's mask depends only on its key (a slice of the batch gives the same masks),
  drops about the rate, scales kept units by 1/(1 - rate), differs between keys, and is the identity without
  keys. Catches one mask drawn for the whole batch (topology-dependent), no inverted scaling, and dropout at
  inference."""
  drop = models.ExampleDropout(0.5)
  x = jnp.ones((4, 10, 10, 3))
  keys = jax.random.split(jax.random.key(0), 4)
  full = drop.apply({}, x, keys)
  half = drop.apply({}, x[2:], keys[2:])
  np.testing.assert_array_equal(full[2:], half)
  assert 0.3 < float(jnp.mean(full == 0)) < 0.7  # rate 0.5
  np.testing.assert_allclose(jnp.unique(full), [0.0, 2.0])  # inverted dropout scaling
  assert not bool(jnp.all(full[0] == full[1]))  # different keys, different masks
  np.testing.assert_array_equal(drop.apply({}, x, None), x)  # no keys: identity


@pytest.mark.parametrize("shape,features,kernel,strides,padding", [
    pytest.param((2, 7, 7, 16), 16, (5, 5), (2, 2), "SAME", marks=slow),  # the mnist preset's 7x7 ->
    # 14x14 layer, scaled down (the fast tier runs the preset itself: test_golden.py)
    ((2, 4, 4, 8), 16, (4, 4), (2, 2), "SAME"),  # the dcgan preset's layers
    pytest.param((2, 14, 14, 1), 16, (5, 5), (2, 2), "SAME", marks=slow),  # an image layer
    pytest.param((2, 5, 6, 3), 16, (3, 3), (2, 2), "SAME", marks=slow),
    pytest.param((2, 5, 5, 3), 16, (4, 4), (2, 2), "VALID", marks=slow),
    pytest.param((2, 5, 5, 3), 16, (5, 5), (3, 3), "SAME", marks=slow),
    pytest.param((2, 3, 4, 3), 4, (2, 3), (2, 3), "SAME", marks=slow),
    pytest.param((2, 3, 3, 4), 5, (1, 1), (2, 2), "SAME", marks=slow),  # a phase with no tap at all
    ((2, 5, 5, 3), 2, (5, 5), (1, 1), "SAME"),  # stride 1 (here always the DFT form): the seed's first
    pytest.param((2, 4, 7, 3), 3, (2, 5), (1, 1), "SAME", marks=slow),  # an even kernel
    pytest.param((2, 6, 5, 4), 3, (4, 3), (1, 1), "VALID", marks=slow),
])
@pytest.mark.parametrize("layer", ["ConvTranspose", "Conv"])
def test_conv_layers_match_flax_in_outputs_and_gradients(layer, shape, features, kernel, strides, padding,
                                                         monkeypatch):
  """models.ConvTranspose / models.Conv in the "cpu" form (cpu_kernels.py, dft.py) and in the "exact" form
  (patches.py) = flax's nn.ConvTranspose / nn.Conv: same parameters, outputs, gradients (w.r.t. parameters
  and input) and second derivatives (the gradient penalties differentiate the input gradient in the
  parameters), within float32 rounding. The loss weights every output by its own number, so outputs in
  the wrong places change it. Catches any error in the sub-pixel, phase and DFT rewrites (phases
  interleaved in the wrong order, padding, flipped kernels, transforms), and a custom VJP whose backward
  pass is not differentiable or differentiates wrongly (a penalty's gradient would be off)."""
  from dcgan_jax.ops import cpu_kernels
  from dcgan_jax.ops import dft
  assert not cpu_kernels.use_subpixel_forward((2, 2), "SAME", 1)  # 1-channel layers keep XLA's ops ...
  monkeypatch.setattr(cpu_kernels, "MIN_CHANNELS", 1)  # ... here every layer takes the rewrites
  monkeypatch.setattr(dft, "DFT_MAX_COST_RATIO", 1e9)  # (the DFT form pays only for large layers)
  if layer == "Conv":  # the input of the strided convolution that a transposed one would invert
    shape = (shape[0], shape[1] * strides[0], shape[2] * strides[1], shape[3])
  ref = getattr(nn, layer)(features, kernel, strides, padding)
  x = jax.random.normal(jax.random.key(0), shape)
  variables = ref.init(jax.random.key(1), x)
  # The CPU rewrites are exercised (not XLA's own ops) wherever they apply.
  strided = max(strides) > 1
  if layer == "ConvTranspose":
    assert cpu_kernels.use_subpixel_forward(strides, padding, features) == (strided and padding == "SAME")
  else:
    assert cpu_kernels.use_subpixel_input_gradient(shape[1:3], strides, padding, shape[-1]) == (
        strided and padding == "SAME")
  weights = jax.random.normal(jax.random.key(2), jax.eval_shape(ref.apply, variables, x).shape)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)) * weights)
  g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(variables, x)
  # Double backward: d/dparams of ||d/dx loss||^2, as R1 and the gradient penalty take it.
  penalty = lambda m: lambda v: jnp.sum(jnp.square(jax.grad(lambda x: loss(m)(v, x))(x)))
  gg_ref = jax.jit(jax.grad(penalty(ref)))(variables)
  for form in ("cpu", "exact"):
    ours = getattr(models, layer)(features, kernel, strides, padding, form=form)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, variables)
    if form == "cpu":
      jaxpr = str(jax.make_jaxpr(ours.apply)(variables, x))
      assert ("conv_general_dilated" not in jaxpr) == (not strided)  # stride 1: DFT form, no convolution
    np.testing.assert_allclose(ours.apply(variables, x), ref.apply(variables, x), atol=2e-5, rtol=1e-5,
                               err_msg=form)
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5, err_msg=form),
                 g_ours, g_ref)
    gg = jax.jit(jax.grad(penalty(ours)))(variables)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-5, err_msg=form), gg, gg_ref)


def test_dft_form_is_used_where_it_saves_multiplications():
  """The seed generator's stride-1 layer (7x7x256 -> 7x7x128, 5x5) takes the DFT form at training batch
  sizes in float32 in the "cpu" form, and nothing else does: not at batch 1 (the kernel's transform
  would dominate), not a 3x3 kernel (0.54 of the direct multiplications), not bfloat16, not the "lax"
  form of GPUs and TPUs."""
  from dcgan_jax.ops import dft
  seed_layer = models.ConvTranspose(128, (5, 5), (1, 1), "SAME", form="cpu")
  geometry = dft.correlation_geometry((7, 7), (5, 5), ((2, 2), (2, 2)))
  x, w = jnp.zeros((128, 7, 7, 256)), jnp.zeros((5, 5, 256, 128))
  assert geometry == ((7, 7), (5, 5), (2, 2), (7, 7)) and dft.use_dft(x, w, geometry)
  variables = jax.eval_shape(seed_layer.init, jax.random.key(0), x)
  assert "conv_general_dilated" not in str(jax.make_jaxpr(seed_layer.apply)(variables, x))
  assert not dft.use_dft(x[:1], w, geometry)
  assert dft.use_dft(x[:8], w, geometry)
  assert not dft.use_dft(x, w[1:4, 1:4], dft.correlation_geometry((7, 7), (3, 3), ((1, 1), (1, 1))))
  assert not dft.use_dft(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), geometry)
  lax_layer = models.ConvTranspose(128, (5, 5), (1, 1), "SAME", form="lax")
  assert "conv_general_dilated" in str(jax.make_jaxpr(lax_layer.apply)(variables, x))


def test_subpixel_form_takes_both_branches():
  """One convolution for all phases when it wastes little (5x5, stride 2), one per phase otherwise (4x4);
  both equal lax.conv_transpose. Catches a wrong phase layout in either branch of the sub-pixel form."""
  from dcgan_jax.ops import cpu_kernels
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  for k in (5, 4):
    w = jax.random.normal(jax.random.key(1), (k, k, 3, 2))
    before = cpu_kernels.transpose_padding(k, 2, "SAME")[0]
    transposed = lambda x, w: cpu_kernels.subpixel_transposed(x, w, (2, 2), (before, before))
    assert str(jax.make_jaxpr(transposed)(x, w)).count("conv_general_dilated") == (1 if k == 5 else 4)
    ref = jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(transposed(x, w), ref, atol=1e-5)


@pytest.mark.parametrize("preset,size", [("mnist", 28), pytest.param("dcgan", 32, marks=slow)])
def test_accelerator_models_are_plain_lax_and_match_the_cpu_forms(preset, size):
  """Models built for a GPU or TPU (platform "gpu"/"tpu": the "lax" form) contain no custom VJP, so
  forward-mode AD (jax.jvp) runs through G and D, and no CPU rewrite: their jaxprs hold only lax
  convolutions. They compute what the CPU forms compute. Catches a CPU rewrite (or any custom_vjp)
  reaching an accelerator's graph, and a form choice made from the host's default backend."""
  config = Config(preset=preset, image_size=size, base_width=8, latent_dim=16).resolved()
  for accelerator in ("gpu", "tpu"):
    g, d = models.build_models(config, 1, policy=platforms.Policy(accelerator))
    assert g.form == d.form == "lax"
  g, d = models.build_models(config, 1, policy=platforms.Policy("gpu"))
  g_cpu, d_cpu = models.build_models(config, 1, policy=platforms.Policy("cpu"))
  assert g_cpu.form == "cpu"
  z = jax.random.normal(jax.random.key(0), (16, 16))
  g_vars = g.init(jax.random.key(1), z, train=False)
  images = jax.random.uniform(jax.random.key(2), (16, size, size, 1), minval=-1, maxval=1)
  d_vars = d.init(jax.random.key(3), images, train=False)
  for module, variables, x in ((g, g_vars, z), (d, d_vars, images)):
    f = lambda p, x: module.apply({**variables, "params": p}, x, train=False)
    jaxpr = str(jax.make_jaxpr(f)(variables["params"], x))
    assert "custom_vjp" not in jaxpr  # (relu is a custom_jvp, which forward mode handles)
    tangent = jax.tree.map(jnp.ones_like, variables["params"])
    out, dout = jax.jvp(lambda p: f(p, x), (variables["params"],), (tangent,))
    assert np.all(np.isfinite(dout))
  np.testing.assert_allclose(g.apply(g_vars, z, train=False), g_cpu.apply(g_vars, z, train=False),
                             atol=1e-5)
  np.testing.assert_allclose(d.apply(d_vars, images, train=False),
                             d_cpu.apply(d_vars, images, train=False), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset,size", [("mnist", 28), pytest.param("dcgan", 32, marks=slow)])
def test_bfloat16_compute_keeps_float32_state_and_close_outputs(preset, size):
  """--compute_dtype=bfloat16: the same parameters (shapes, dtype float32, values at init), float32
  outputs and BatchNorm statistics, and outputs within bfloat16 rounding of the float32 model's."""
  f32 = Config(preset=preset, image_size=size, base_width=8, latent_dim=16).resolved()
  bf16 = dataclasses.replace(f32, compute_dtype="bfloat16")
  (g32, d32), (g16, d16) = models.build_models(f32, 1), models.build_models(bf16, 1)
  z = jax.random.normal(jax.random.key(0), (8, 16))
  v32 = g32.init(jax.random.key(1), z, train=False)
  v16 = g16.init(jax.random.key(1), z, train=False)
  jax.tree.map(np.testing.assert_array_equal, v32, v16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(v16))
  x32, s32 = g32.apply(v32, z, train=True, mutable=["batch_stats"])
  x16, s16 = g16.apply(v16, z, train=True, mutable=["batch_stats"])
  assert x16.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16))
  np.testing.assert_allclose(x16, x32, atol=0.05)
  assert not np.array_equal(x16, x32)  # it did compute in bfloat16
  dv = d32.init(jax.random.key(2), x32, train=False)
  l32, l16 = d32.apply(dv, x32, train=False), d16.apply(dv, x32, train=False)
  assert l16.dtype == jnp.float32
  np.testing.assert_allclose(l16, l32, atol=0.05 * float(np.abs(l32).max()) + 1e-3)


def test_configure_xla_cpu_respects_the_user_an_accelerator_run_and_a_started_backend(monkeypatch):
  """The XLA:CPU flag is set before JAX starts and only then, never over the user's own choice, and not
  for a run whose JAX_PLATFORMS names no CPU.
  Catches a flag that overrides the user's XLA_FLAGS or is set too late to take effect."""
  from dcgan_jax.ops import convolutions
  assert convolutions.EIGEN_CONVOLUTIONS in os.environ["XLA_FLAGS"]  # set by conftest.py
  jax.devices()  # the backend is up: too late to change XLA_FLAGS
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert not convolutions.configure_xla_cpu()
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  # An explicit choice in XLA_FLAGS wins, and "ynnpack" (jaxlib's default) adds nothing.
  mine = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
  monkeypatch.setenv("XLA_FLAGS", mine)
  monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
  assert not convolutions.configure_xla_cpu() and os.environ["XLA_FLAGS"] == mine
  monkeypatch.setenv("XLA_FLAGS", "")
  assert not convolutions.configure_xla_cpu("ynnpack") and os.environ["XLA_FLAGS"] == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cuda")
  assert not convolutions.configure_xla_cpu() and os.environ["XLA_FLAGS"] == ""
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert convolutions.configure_xla_cpu() and os.environ["XLA_FLAGS"] == convolutions.EIGEN_CONVOLUTIONS


def test_configure_xla_gpu_sets_deterministic_mode_for_groups_only_and_never_over_the_user(monkeypatch):
  """--invariant_groups asks for XLA:GPU's deterministic mode (XLA_FLAGS, before JAX starts); nothing
  without groups, nothing over the user's own setting, nothing once a backend is up. Catches the flag
  set for every run, over the user's choice, or too late to take effect."""
  from dcgan_jax.ops import convolutions
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  assert not convolutions.configure_xla_gpu(True)  # the backend is up (conftest): too late
  monkeypatch.setattr("jax._src.xla_bridge.backends_are_initialized", lambda: False)
  assert not convolutions.configure_xla_gpu(False)
  assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
  assert convolutions.configure_xla_gpu(True)
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=4",
                                             convolutions.DETERMINISTIC_GPU]
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
  assert not convolutions.configure_xla_gpu(True) and os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_spectral_normalisation_brings_the_largest_singular_value_to_one_and_trains_only_in_training():
  """--d_norm=spectral's layers: after 200 training-mode passes (one power iteration each) the weight
  they use, kernel / sigma, has largest singular value 1 within 1e-3 (1.47 for the raw kernel); an
  inference-mode pass computes with the stored vector `spectral_u` (batch_stats) without advancing it. Catches sigma
  estimated from the wrong side of the matrix, a power iteration that never advances (sigma stuck at
  its random start), and a vector advanced outside training."""
  layer = models.Conv(16, (4, 4), (2, 2), "SAME", spectral=True)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  variables = layer.init(jax.random.key(1), x)
  kernel = variables["params"]["kernel"]
  top = lambda k: float(np.linalg.svd(np.asarray(k).reshape(-1, k.shape[-1]), compute_uv=False)[0])
  assert top(kernel) > 1.4
  stats = variables["batch_stats"]
  train = jax.jit(lambda s: layer.apply({"params": variables["params"], "batch_stats": s}, x,
                                        mutable=["batch_stats"])[1]["batch_stats"])
  for _ in range(200):  # the top two singular values are close: power iteration converges slowly
    stats = train(stats)
  matrix = np.asarray(kernel).reshape(-1, kernel.shape[-1])
  u = np.asarray(stats["spectral_u"])
  v = matrix @ u / np.linalg.norm(matrix @ u)
  sigma = v @ matrix @ u
  assert abs(top(kernel / sigma) - 1.0) < 1e-3, top(kernel / sigma)
  out_inference = layer.apply({"params": variables["params"], "batch_stats": stats}, x)
  np.testing.assert_allclose(out_inference, jax.lax.conv_general_dilated(
      x, kernel / sigma, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), rtol=1e-5, atol=1e-6)
