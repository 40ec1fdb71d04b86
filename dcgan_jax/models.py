"""Generators and discriminators (Flax linen), with BatchNorm state kept explicit.

Two presets:
  * `mnist`: the seed document's Keras model, layer for layer (28x28 only).
  * `dcgan`: Radford et al. 2015 ("DCGAN") for any power-of-two resolution >= 32.

Conventions shared by every module here:
  * images are NHWC float32 in [-1, 1]; latents are (batch, latent_dim) float32;
  * BatchNorm running statistics live in the `batch_stats` collection. `train=True` normalises with the
    statistics of the batch (averaged over `axis_name`, so over the *global* batch under pmap) and
    returns updated running statistics; `train=False` uses the running statistics, so an example's output
    does not depend on the rest of its batch;
  * the discriminator returns logits of shape (batch, 1); its dropout takes one typed PRNG key per example
    (`dropout_keys`, shape (batch,)), so the mask of example i is a function of that example's key alone,
    whatever the batch is split into (see randomness.py);
  * the discriminator's normalisation (--d_norm) is "batch", "layer" or "none" after every hidden layer
    but the first (the DCGAN paper's placement), or "spectral": every weight divided by its largest
    singular value, estimated by power iteration with its vector kept in `batch_stats` (`spectral_u`),
    so it is checkpointed with the BatchNorm statistics and advanced only by training-mode passes.
"""

import functools
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from dcgan_jax.ops import invariant
from dcgan_jax.ops import convolutions
from dcgan_jax import platforms
from dcgan_jax import randomness
from dcgan_jax.config import Config

# The seed's Keras layers initialise kernels with Keras' default, glorot_uniform (biases zero); flax's
# default would be lecun_normal (8x larger for the seed's Dense(100 -> 12544)).
_keras_init = nn.initializers.glorot_uniform()

# DCGAN paper, section 4: "All weights were initialized from a zero-centered Normal distribution with
# standard deviation 0.02." (BatchNorm scale: N(1, 0.02) as in pytorch/examples.)
_dcgan_init = nn.initializers.normal(0.02)


def _scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class ExampleDropout(nn.Module):
  """Inverted dropout whose mask for example i depends only on `keys[i]` (and this layer's name)."""

  rate: float

  @nn.compact
  def __call__(self, x, keys: Optional[jax.Array]):
    if keys is None or self.rate == 0.0:
      return x
    # Fold in a stable hash of this layer's name so two dropout layers never share a mask
    # (crc32, not hash(): Python salts str hashes per process).
    layer_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, zlib.crc32((self.name or "").encode()))
    keep = randomness.example_bernoulli(layer_keys, 1.0 - self.rate, x.shape[1:])
    return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class _Layer(nn.Module):
  """A per-example layer with flax's parameters (`kernel`, `bias`) and outputs, computed by `_op` in the
  convolution form `form` (convolutions.py: "lax", "cpu" or "exact").

  Subclasses keep flax's class names and field order, so parameter trees (Dense_0, ConvTranspose_0,
  Conv_0, ...), checkpoints and positional arguments are those of the flax layers. With `group_size` > 0
  (--invariant_groups) the layer runs group by group and its weight gradient is summed in one fixed order
  over all devices (invariant.grouped_layer, over pmap axis `axis_name`). Subclasses declare the fields
  features, use_bias, kernel_init, bias_init, dtype (computation; parameters stay float32), group_size,
  axis_name and form.
  """

  def _kernel_shape(self, in_features: int) -> tuple:
    raise NotImplementedError

  def _op(self, x, kernel):
    raise NotImplementedError

  def _apply(self, params, x):
    kernel, bias = params
    y = self._op(x.astype(self.dtype), kernel.astype(self.dtype))
    return y if bias is None else y + bias.astype(y.dtype)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, self._kernel_shape(x.shape[-1]))
    bias = self.param("bias", self.bias_init, (self.features,)) if self.use_bias else None
    if self.spectral:
      kernel = self._spectral_normalized(kernel)
    if self.group_size and not self.is_initializing():
      return invariant.grouped_layer(self._apply, (kernel, bias), x, self.group_size, self.axis_name)
    return self._apply((kernel, bias), x)


  def _spectral_normalized(self, kernel):
    """kernel / sigma, sigma the largest singular value of the (fan_in, features) matrix, estimated by
    one power iteration per training-mode pass (Miyato et al. 2018) from the vector `spectral_u`
    (batch_stats collection: explicit state). u and v carry no gradient; sigma does (the paper's)."""
    matrix = kernel.reshape(-1, kernel.shape[-1])  # (kh * kw * cin, features)
    u_var = self.variable("batch_stats", "spectral_u", lambda: jax.random.normal(
        self.make_rng("params"), (kernel.shape[-1],), jnp.float32))
    normalize = lambda v: v * lax.rsqrt(jnp.sum(jnp.square(v)) + 1e-12)
    u = lax.stop_gradient(u_var.value)
    v = lax.stop_gradient(normalize(matrix @ u))
    if self.is_mutable_collection("batch_stats") and not self.is_initializing():  # a training pass
      u = lax.stop_gradient(normalize(matrix.T @ v))
      u_var.value = u
    sigma = v @ (matrix @ u)  # = ||M u|| at inference; v^T M u after the iteration
    return kernel / sigma


class Dense(_Layer):
  """= flax.linen.Dense on (batch, features)."""

  features: int
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = jnp.float32
  group_size: int = 0
  axis_name: Optional[str] = None
  form: str = "lax"
  spectral: bool = False

  def _kernel_shape(self, in_features):
    return (in_features, self.features)

  def _op(self, x, kernel):
    return convolutions.dense(x, kernel, self.form)


class _Convolution(_Layer):
  features: int
  kernel_size: tuple
  strides: tuple = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = jnp.float32
  group_size: int = 0
  axis_name: Optional[str] = None
  form: str = "lax"
  spectral: bool = False

  def _kernel_shape(self, in_features):
    return tuple(self.kernel_size) + (in_features, self.features)


class ConvTranspose(_Convolution):
  """= flax.linen.ConvTranspose (transpose_kernel=False)."""

  def _op(self, x, kernel):
    return convolutions.conv_transpose(x, kernel, self.strides, self.padding, self.form)


class Conv(_Convolution):
  """= flax.linen.Conv."""

  def _op(self, x, kernel):
    return convolutions.conv(x, kernel, self.strides, self.padding, self.form)


class BatchNorm(nn.Module):
  """= flax.linen.BatchNorm (same parameters and statistics), with invariant sums (--invariant_groups).

  Training mode normalises with the statistics of the global batch, summed group by group in one fixed
  order over all devices (invariant.batch_norm); only used when `group_size` > 0, flax's otherwise.
  """

  use_running_average: bool
  group_size: int
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: Optional[str] = None
  scale_init: Callable = nn.initializers.ones_init()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,))
    bias = self.param("bias", nn.initializers.zeros_init(), (c,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    if self.use_running_average or self.is_initializing():
      y = (x.astype(jnp.float32) - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return y.astype(self.dtype)
    y, mean, var = invariant.batch_norm(x.astype(self.dtype), scale, bias, self.epsilon, self.group_size,
                                        self.axis_name)
    ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * var
    return y


def _batch_norm(group_size: int, **kwargs):
  """flax's BatchNorm, or ours with invariant sums when group_size > 0 (both named BatchNorm_i)."""
  return functools.partial(BatchNorm, group_size=group_size, **kwargs) if group_size else \
      functools.partial(nn.BatchNorm, **kwargs)


# --------------------------------------------------------------------------------------------------
# Preset "mnist": the seed's Keras model.
# --------------------------------------------------------------------------------------------------
class MnistGenerator(nn.Module):
  """z (B, latent_dim) -> images (B, 28, 28, channels) in [-1, 1].

  Dense(7*7*256) -> LeakyReLU(0.2) -> BN -> reshape -> ConvT(128, 5, s1) -> BN -> LeakyReLU
  -> ConvT(64, 5, s2) -> BN -> LeakyReLU -> ConvT(channels, 5, s2) -> tanh. Exactly the seed's order
  (including its activation *before* the first BatchNorm).
  """

  channels: int = 1
  bn_momentum: float = 0.8
  bn_epsilon: float = 1e-3
  axis_name: Optional[str] = None  # pmap axis of the global batch (BatchNorm statistics); None outside pmap
  dtype: Any = jnp.float32  # computation dtype (parameters and BatchNorm statistics stay float32)
  group_size: int = 0  # --invariant_groups: examples per group (0: off)
  form: str = "lax"  # how convolutions are computed (convolutions.py)

  @nn.compact
  def __call__(self, z, train: bool):
    bn = _batch_norm(self.group_size, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype)
    layer = dict(kernel_init=_keras_init, dtype=self.dtype, group_size=self.group_size, axis_name=self.axis_name,
                 form=self.form)
    convt = functools.partial(ConvTranspose, kernel_size=(5, 5), padding="SAME", use_bias=False, **layer)
    dense = Dense(7 * 7 * 256, **layer)
    x = bn()(nn.leaky_relu(dense(z.astype(self.dtype)), 0.2))
    x = x.reshape(-1, 7, 7, 256)
    x = nn.leaky_relu(bn()(convt(128, strides=(1, 1))(x)), 0.2)
    x = nn.leaky_relu(bn()(convt(64, strides=(2, 2))(x)), 0.2)
    return jnp.tanh(convt(self.channels, strides=(2, 2))(x)).astype(jnp.float32)


def _hidden_norm(norm: str, batch_norm: Callable) -> Callable:
  """The normalisation after a hidden layer of D (--d_norm): BatchNorm, LayerNorm over each example's
  (H, W, C) with a scale and bias per channel, or none ("none", and "spectral", which acts on weights)."""
  if norm == "batch":
    return batch_norm()
  if norm == "layer":
    return nn.LayerNorm(reduction_axes=(-3, -2, -1), feature_axes=-1)
  return lambda x: x


class MnistDiscriminator(nn.Module):
  """images (B, 28, 28, C) -> logits (B, 1).

  Conv(64, 5, s2) -> LeakyReLU(0.2) -> Dropout(0.3) -> Conv(128, 5, s2) -> LeakyReLU -> Dropout
  -> Flatten -> Dense(1). No BatchNorm (as in the seed); --d_norm=batch/layer puts one after the
  second convolution, spectral normalises all three weights.
  """

  dropout_rate: float = 0.3
  norm: str = "none"  # --d_norm
  bn_momentum: float = 0.8
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32  # computation dtype; the logits are always float32
  axis_name: Optional[str] = None  # pmap axis of the global batch (only used with group_size)
  group_size: int = 0  # --invariant_groups: examples per group (0: off)
  form: str = "lax"  # how convolutions are computed (convolutions.py)

  @nn.compact
  def __call__(self, x, train: bool, dropout_keys: Optional[jax.Array] = None):
    keys = dropout_keys if train else None
    layer = dict(kernel_init=_keras_init, dtype=self.dtype, group_size=self.group_size, axis_name=self.axis_name,
                 form=self.form, spectral=self.norm == "spectral")
    bn = _batch_norm(self.group_size, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, dtype=self.dtype)
    conv = functools.partial(Conv, kernel_size=(5, 5), strides=(2, 2), padding="SAME", **layer)
    x = ExampleDropout(self.dropout_rate)(nn.leaky_relu(conv(64)(x.astype(self.dtype)), 0.2), keys)
    x = _hidden_norm(self.norm, bn)(conv(128)(x))
    x = ExampleDropout(self.dropout_rate)(nn.leaky_relu(x, 0.2), keys)
    logits = Dense(1, **layer)(x.reshape(x.shape[0], -1))
    return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Preset "dcgan": Radford et al. 2015, for image_size = 2**k >= 32.
# --------------------------------------------------------------------------------------------------
def _num_upsamplings(image_size: int) -> int:
  """Stride-2 layers between 4x4 and image_size x image_size."""
  return image_size.bit_length() - 3  # 32 -> 3, 64 -> 4, 128 -> 5


class DCGANGenerator(nn.Module):
  """z (B, latent_dim) -> images (B, S, S, channels) in [-1, 1].

  Project z to 4x4x(base_width * S/8), then stride-2 fractional-strided 4x4 convolutions halving the
  width each time; BatchNorm + ReLU after every layer except the tanh output (paper, section 3).
  """

  image_size: int = 64
  channels: int = 3
  base_width: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None  # pmap axis of the global batch (BatchNorm statistics); None outside pmap
  dtype: Any = jnp.float32  # computation dtype (parameters and BatchNorm statistics stay float32)
  group_size: int = 0  # --invariant_groups: examples per group (0: off)
  form: str = "lax"  # how convolutions are computed (convolutions.py)

  @nn.compact
  def __call__(self, z, train: bool):
    bn = _batch_norm(self.group_size, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, scale_init=_scale_init,
                     dtype=self.dtype)
    layer = dict(use_bias=False, kernel_init=_dcgan_init, dtype=self.dtype, group_size=self.group_size,
                 axis_name=self.axis_name, form=self.form)
    convt = functools.partial(ConvTranspose, kernel_size=(4, 4), strides=(2, 2), padding="SAME", **layer)
    n_up = _num_upsamplings(self.image_size)
    width = self.base_width * 2 ** (n_up - 1)  # 64x64, base 64: 512 feature maps at 4x4
    x = Dense(4 * 4 * width, **layer)(z.astype(self.dtype)).reshape(-1, 4, 4, width)
    x = nn.relu(bn()(x))
    for _ in range(n_up - 1):
      width //= 2
      x = nn.relu(bn()(convt(width)(x)))
    return jnp.tanh(convt(self.channels)(x)).astype(jnp.float32)


class DCGANDiscriminator(nn.Module):
  """images (B, S, S, C) -> logits (B, 1).

  Strided 4x4 convolutions doubling the width down to 4x4, LeakyReLU(0.2), BatchNorm on every layer but
  the first; a final 4x4 valid convolution gives the logit (paper, section 3; no pooling, no dense layers).
  """

  image_size: int = 64
  base_width: int = 64
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None  # pmap axis of the global batch (BatchNorm statistics); None outside pmap
  dropout_rate: float = 0.0
  norm: str = "batch"  # --d_norm
  dtype: Any = jnp.float32  # computation dtype; the logits are always float32
  group_size: int = 0  # --invariant_groups: examples per group (0: off)
  form: str = "lax"  # how convolutions are computed (convolutions.py)

  @nn.compact
  def __call__(self, x, train: bool, dropout_keys: Optional[jax.Array] = None):
    bn = _batch_norm(self.group_size, use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, axis_name=self.axis_name, scale_init=_scale_init,
                     dtype=self.dtype)
    conv = functools.partial(Conv, kernel_size=(4, 4), use_bias=False, kernel_init=_dcgan_init,
                             dtype=self.dtype, group_size=self.group_size, axis_name=self.axis_name,
                             form=self.form, spectral=self.norm == "spectral")
    keys = dropout_keys if train else None
    x = x.astype(self.dtype)
    width = self.base_width
    for i in range(_num_upsamplings(self.image_size)):
      x = conv(width, strides=(2, 2), padding="SAME")(x)
      x = nn.leaky_relu(x if i == 0 else _hidden_norm(self.norm, bn)(x), 0.2)
      x = ExampleDropout(self.dropout_rate)(x, keys)
      width *= 2
    x = conv(1, strides=(1, 1), padding="VALID")(x)
    return x.reshape(x.shape[0], 1).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
def build_models(config: Config, channels: int, axis_name: Optional[str] = None,
                 policy: Optional[platforms.Policy] = None, form: Optional[str] = None):
  """Returns (generator, discriminator) for a resolved config.

  `axis_name` is the pmap axis of the global batch ("batch" inside the training step: BatchNorm
  statistics, and with --invariant_groups every batch sum, run over it), None for sampling outside pmap.
  `policy` is that of the devices the models will be compiled for (default: JAX's default backend's):
  it chooses how convolutions are computed (platforms.Policy.conv_form); `form` names one instead.
  Every form has the same parameters, so states and checkpoints move freely between platforms.
  """
  c = config
  grouped = bool(c.invariant_groups and axis_name)
  form = form or (policy or platforms.default()).conv_form(exact=grouped)
  common = dict(dtype=jnp.dtype(c.compute_dtype), axis_name=axis_name, form=form,
                group_size=c.batch_size // c.invariant_groups if grouped else 0)
  bn = dict(bn_momentum=c.bn_momentum, bn_epsilon=c.bn_epsilon)
  if c.preset == "mnist":
    return (MnistGenerator(channels=channels, **bn, **common),
            MnistDiscriminator(dropout_rate=c.dropout_rate, norm=c.d_norm, **bn, **common))
  if c.preset == "dcgan":
    return (DCGANGenerator(image_size=c.image_size, channels=channels, base_width=c.base_width, **bn,
                           **common),
            DCGANDiscriminator(image_size=c.image_size, base_width=c.base_width, dropout_rate=c.dropout_rate,
                               norm=c.d_norm, **bn, **common))
  raise ValueError(f"unknown preset {c.preset!r}")  # unreachable after Config.validate()
