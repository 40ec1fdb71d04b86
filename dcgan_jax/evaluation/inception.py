"""The FID Inception network in Flax, as pytorch-fid defines it, and its preprocessing.

    variables = variables_from_state_dict(torch_file.load_state_dict(weights_path))
    embed = features_program()                       # jitted
    pool3, logits = embed(variables, uint8_images)   # (n, 2048), (n, 1008) float32

The network is torchvision's Inception v3 as pytorch-fid modifies it to reproduce the TensorFlow graph of
2015-12-05 that the FID paper used (pytorch_fid/inception.py: FIDInceptionA, C, E_1, E_2):
  * every convolution has no bias and is followed by BatchNorm with epsilon 1e-3 and a ReLU;
  * the average pools of the A, C and E_1 blocks do not count the padding (count_include_pad=False);
  * the pool branch of the last block (Mixed_7c, E_2) is a 3x3 max pool, not an average pool;
  * pool3 is the spatial mean of Mixed_7c (2048 channels); the logits are pool3 @ fc (1008 classes, the
    2015 graph's, of which the Inception Score takes the softmax).
Submodule names are torchvision's (Mixed_5b.branch_pool.conv ...), so pytorch-fid's state dict maps
onto the Flax variables name for name (variables_from_state_dict).

Preprocessing, each step as pytorch-fid's (each one moves the numbers if done otherwise):
  uint8 (n, H, W, C) -> float in [0, 1] (x / 255) -> grey replicated to RGB -> bilinear resize to
  299x299 with align_corners=False and no antialiasing (F.interpolate; a nearest, bicubic, antialiased
  or PIL resize gives different features) -> 2x - 1.
Generated images are rounded to uint8 before all this (round((x + 1) * 127.5)), like the real images
they are compared with and like pytorch-fid reading saved PNGs.
"""

import functools
from typing import Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008
BN_EPSILON = 1e-3
PREPROCESSING = ("uint8 -> x/255 -> grey to RGB -> bilinear resize to 299x299 (align_corners=False, no "
                 "antialias) -> 2x-1 (pytorch-fid); generated images rounded to uint8 first")


class BasicConv(nn.Module):
  """conv (no bias) -> BatchNorm(eps 1e-3, running statistics) -> ReLU; torchvision's BasicConv2d."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, self.strides, padding=((ph, ph), (pw, pw)), use_bias=False,
                name="conv")(x)
    return nn.relu(nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name="bn")(x))


def _avg_pool(x):
  """3x3, stride 1, padding 1, the padding not counted (pytorch-fid's FID blocks)."""
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, strides=2, padding=0):
  return nn.max_pool(x, (3, 3), (strides, strides), ((padding, padding), (padding, padding)))


class InceptionA(nn.Module):  # Mixed_5b, 5c, 5d (pytorch-fid's FIDInceptionA)
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(bd)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, bd, bp], axis=-1)


class InceptionB(nn.Module):  # Mixed_6a
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class InceptionC(nn.Module):  # Mixed_6b..6e (pytorch-fid's FIDInceptionC)
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):  # Mixed_7a
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class InceptionE(nn.Module):  # Mixed_7b (FIDInceptionE_1: average pool), Mixed_7c (E_2: max pool)
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool(x, strides=1, padding=1) if self.max_pool else _avg_pool(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """x: float32 (n, 299, 299, 3) in [-1, 1] -> (pool3 float32 (n, 2048), logits float32 (n, 1008))."""

  @nn.compact
  def __call__(self, x):
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(max_pool=False, name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    return pool3, nn.Dense(NUM_LOGITS, name="fc")(pool3)


# --------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def resize_matrix(in_size: int, out_size: int = SIZE) -> np.ndarray:
  """float32 (out_size, in_size): 1-D bilinear interpolation with align_corners=False, as PyTorch's
  F.interpolate(mode='bilinear') computes it: output pixel o samples the input at
  (o + 0.5) * in / out - 0.5, clamped below at 0, from its two neighbours (the last pixel repeated at
  the right edge). No antialiasing: shrinking samples, it does not average (torch's default)."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  frac = src - low
  m = np.zeros((out_size, in_size), np.float64)
  np.add.at(m, (np.arange(out_size), low), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), high), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (n, H, W, C), C in {1, 3} -> float32 (n, 299, 299, 3) in [-1, 1], pytorch-fid's way (see the
  module docstring). Separable: a (299, H) matrix on the rows, a (299, W) one on the columns."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  rows, cols = resize_matrix(x.shape[1]), resize_matrix(x.shape[2])
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=hi)
  x = jnp.einsum("pw,nowc->nopc", cols, x, precision=hi)
  return 2.0 * x - 1.0


def quantise(images: jax.Array) -> jax.Array:
  """Generated float images in [-1, 1] -> uint8, as evaluator.as_uint8_images rounds them."""
  return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def embed(variables, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """uint8 images (n, H, W, C) -> (pool3 float32 (n, 2048), logits float32 (n, 1008))."""
  return FIDInceptionV3().apply(variables, preprocess(images))


@functools.lru_cache(maxsize=None)
def features_program():
  """embed, jitted: (variables, uint8 images (n, H, W, C)) -> (pool3, logits)."""
  return jax.jit(embed)


# --------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict -> Flax variables
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def variable_shapes() -> Dict[str, Tuple[str, Tuple[int, ...]]]:
  """{torch state-dict name: (flax collection/path, flax shape)} for every array the network needs."""
  shapes = jax.eval_shape(lambda: FIDInceptionV3().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3))))
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    keys = [p.key for p in path]
    collection, module, leaf_name = keys[0], keys[1:-1], keys[-1]
    torch_leaf = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
                  ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}[
                      (collection, leaf_name)]
    out[".".join(module + [torch_leaf])] = ("/".join(keys), tuple(leaf.shape))
  return out


def torch_shape(flax_shape: Sequence[int]) -> Tuple[int, ...]:
  """A Flax kernel's shape in PyTorch's layout: (kh, kw, in, out) -> (out, in, kh, kw); (in, out) -> (out, in)."""
  if len(flax_shape) == 4:
    kh, kw, i, o = flax_shape
    return (o, i, kh, kw)
  if len(flax_shape) == 2:
    return tuple(flax_shape[::-1])
  return tuple(flax_shape)


def variables_from_state_dict(state: Dict[str, np.ndarray]) -> dict:
  """pytorch-fid's state dict {name: array in torch layout} -> Flax variables {"params", "batch_stats"}.
  Conv kernels OIHW -> HWIO, the fc matrix transposed; BatchNorm's num_batches_tracked is not used.
  ValueError naming the first missing, unexpected or mis-shaped array."""
  wanted = variable_shapes()
  extra = sorted(k for k in state if k not in wanted and not k.endswith("num_batches_tracked"))
  missing = sorted(k for k in wanted if k not in state)
  if missing or extra:
    raise ValueError(f"not pytorch-fid's Inception weights: {len(missing)} arrays missing (e.g. "
                     f"{missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})")
  variables = {}
  for name, (path, shape) in wanted.items():
    value = np.asarray(state[name], np.float32)
    if value.shape != torch_shape(shape):
      raise ValueError(f"not pytorch-fid's Inception weights: {name} has shape {value.shape}, "
                       f"expected {torch_shape(shape)}")
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    node = variables
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.ascontiguousarray(value)
  return variables
