"""Generators and discriminators (Flax linen), with BatchNorm state kept explicit.

Two presets:
  * `mnist`: the seed document's Keras model, layer for layer (28x28 only).
  * `dcgan`: Radford et al. 2015 ("DCGAN") for any power-of-two resolution >= 32.

Conventions shared by every module here:
  * images are NHWC float32 in [-1, 1]; latents are (batch, latent_dim) float32;
  * BatchNorm running statistics live in the `batch_stats` collection. `train=True` normalises with the
    statistics of the batch (averaged over `bn_axis_name`, so over the *global* batch under pmap) and
    returns updated running statistics; `train=False` uses the running statistics, so an example's output
    does not depend on the rest of its batch;
  * the discriminator returns logits of shape (batch, 1); its dropout takes one typed PRNG key per example
    (`dropout_keys`, shape (batch,)), so the mask of example i is a function of that example's key alone,
    whatever the batch is split into (see randomness.py).
"""

import functools
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dcgan_jax import ops
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


class _Convolution(nn.Module):
  """flax.linen's convolution parameters (`kernel` (kh, kw, cin, cout), `bias`) and outputs, computed by
  an ops.py function (`_op`) that is fast on XLA:CPU. Subclasses keep flax's class names, so parameter
  trees (ConvTranspose_0, Conv_0, ...) and checkpoints are those of the flax layers."""

  features: int
  kernel_size: tuple
  strides: tuple = (1, 1)
  padding: str = "SAME"
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()
  dtype: Any = jnp.float32  # computation dtype; the parameters stay float32

  def _op(self, x, kernel):
    raise NotImplementedError

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, tuple(self.kernel_size) + (x.shape[-1], self.features))
    y = self._op(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(y.dtype)
    return y


class ConvTranspose(_Convolution):
  """= flax.linen.ConvTranspose (transpose_kernel=False), through ops.conv_transpose."""

  def _op(self, x, kernel):
    return ops.conv_transpose(x, kernel, tuple(self.strides), self.padding)


class Conv(_Convolution):
  """= flax.linen.Conv, through ops.conv."""

  def _op(self, x, kernel):
    return ops.conv(x, kernel, tuple(self.strides), self.padding)


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
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32  # computation dtype (parameters and BatchNorm statistics stay float32)

  @nn.compact
  def __call__(self, z, train: bool):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, dtype=self.dtype)
    convt = functools.partial(ConvTranspose, kernel_size=(5, 5), padding="SAME", use_bias=False,
                              kernel_init=_keras_init, dtype=self.dtype)
    dense = nn.Dense(7 * 7 * 256, kernel_init=_keras_init, dtype=self.dtype)
    x = bn()(nn.leaky_relu(dense(z.astype(self.dtype)), 0.2))
    x = x.reshape(-1, 7, 7, 256)
    x = nn.leaky_relu(bn()(convt(128, strides=(1, 1))(x)), 0.2)
    x = nn.leaky_relu(bn()(convt(64, strides=(2, 2))(x)), 0.2)
    return jnp.tanh(convt(self.channels, strides=(2, 2))(x)).astype(jnp.float32)


class MnistDiscriminator(nn.Module):
  """images (B, 28, 28, C) -> logits (B, 1).

  Conv(64, 5, s2) -> LeakyReLU(0.2) -> Dropout(0.3) -> Conv(128, 5, s2) -> LeakyReLU -> Dropout
  -> Flatten -> Dense(1). No BatchNorm (as in the seed).
  """

  dropout_rate: float = 0.3
  dtype: Any = jnp.float32  # computation dtype; the logits are always float32

  @nn.compact
  def __call__(self, x, train: bool, dropout_keys: Optional[jax.Array] = None):
    keys = dropout_keys if train else None
    conv = functools.partial(Conv, kernel_size=(5, 5), strides=(2, 2), padding="SAME",
                             kernel_init=_keras_init, dtype=self.dtype)
    x = ExampleDropout(self.dropout_rate)(nn.leaky_relu(conv(64)(x.astype(self.dtype)), 0.2), keys)
    x = ExampleDropout(self.dropout_rate)(nn.leaky_relu(conv(128)(x), 0.2), keys)
    logits = nn.Dense(1, kernel_init=_keras_init, dtype=self.dtype)(x.reshape(x.shape[0], -1))
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
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32  # computation dtype (parameters and BatchNorm statistics stay float32)

  @nn.compact
  def __call__(self, z, train: bool):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, scale_init=_scale_init,
                           dtype=self.dtype)
    convt = functools.partial(ConvTranspose, kernel_size=(4, 4), strides=(2, 2), padding="SAME",
                              use_bias=False, kernel_init=_dcgan_init, dtype=self.dtype)
    n_up = _num_upsamplings(self.image_size)
    width = self.base_width * 2 ** (n_up - 1)  # 64x64, base 64: 512 feature maps at 4x4
    x = nn.Dense(4 * 4 * width, use_bias=False, kernel_init=_dcgan_init, dtype=self.dtype)(
        z.astype(self.dtype)).reshape(-1, 4, 4, width)
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
  bn_axis_name: Optional[str] = None
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32  # computation dtype; the logits are always float32

  @nn.compact
  def __call__(self, x, train: bool, dropout_keys: Optional[jax.Array] = None):
    bn = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=self.bn_epsilon, axis_name=self.bn_axis_name, scale_init=_scale_init,
                           dtype=self.dtype)
    conv = functools.partial(Conv, kernel_size=(4, 4), use_bias=False, kernel_init=_dcgan_init,
                             dtype=self.dtype)
    keys = dropout_keys if train else None
    x = x.astype(self.dtype)
    width = self.base_width
    for i in range(_num_upsamplings(self.image_size)):
      x = conv(width, strides=(2, 2), padding="SAME")(x)
      x = nn.leaky_relu(x if i == 0 else bn()(x), 0.2)
      x = ExampleDropout(self.dropout_rate)(x, keys)
      width *= 2
    x = conv(1, strides=(1, 1), padding="VALID")(x)
    return x.reshape(x.shape[0], 1).astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
def build_models(config: Config, channels: int, bn_axis_name: Optional[str] = None):
  """Returns (generator, discriminator) for a resolved config.

  `bn_axis_name` is the pmap axis over which BatchNorm averages batch statistics ("batch" inside the
  training step, None for sampling outside pmap).
  """
  c = config
  dtype = jnp.dtype(c.compute_dtype)
  if c.preset == "mnist":
    return (MnistGenerator(channels, c.bn_momentum, c.bn_epsilon, bn_axis_name, dtype),
            MnistDiscriminator(c.dropout_rate, dtype))
  if c.preset == "dcgan":
    return (DCGANGenerator(c.image_size, channels, c.base_width, c.bn_momentum, c.bn_epsilon, bn_axis_name,
                           dtype),
            DCGANDiscriminator(c.image_size, c.base_width, c.bn_momentum, c.bn_epsilon, bn_axis_name,
                               c.dropout_rate, dtype))
  raise ValueError(f"unknown preset {c.preset!r}")  # unreachable after Config.validate()
