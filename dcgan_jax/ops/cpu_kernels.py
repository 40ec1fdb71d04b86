"""Convolutions for XLA:CPU: the same math as lax's, computed without XLA:CPU's slow paths.

Reached only through convolutions.py, for programs compiled for the CPU. `conv_transpose(x, kernel,
strides, padding)` computes exactly `jax.lax.conv_transpose` (flax's `nn.ConvTranspose`,
transpose_kernel=False), and `conv(x, kernel, strides, padding)` exactly `jax.lax.conv_general_dilated`
(flax's `nn.Conv`); outputs and gradients are tested against flax's layers (tests/test_models.py).

Why: XLA:CPU runs a convolution with lhs_dilation (the forward pass of a strided transposed convolution,
and the input gradient of a strided convolution) and the weight gradient of a strided transposed
convolution over the zeros of the dilated input (jax-ml/jax#23783, jax-ml/jax#31662, openxla/xla#34273).
Writing the dilation out explicitly does not help: the zeros are still multiplied. Two rewrites:

* Sub-pixel form (forward and weight gradient of conv_transpose, input gradient of conv). A stride-s
  transposed correlation splits into s*s output phases: output pixel s*m + p only meets the kernel taps
  a with (p + a - before) divisible by s, at input pixel m + (p + a - before) / s. Each phase is a
  *stride-1* convolution with a sub-kernel, and the phases interleave (depth-to-space) into the output.
  When the phases' tap offsets line up (5x5 kernels, stride 2: at most 1.44x the exact FLOPs) one
  convolution with s*s*cout output channels computes them all; otherwise (4x4 kernels: 2.25x) one per
  phase.
* DFT form (stride-1 layers on small maps, dft.py): fewer multiplications than a direct convolution.

Which convolution library XLA:CPU calls matters as much (convolutions.configure_xla_cpu). Measured per
layer by experiments/conv_bench.py, per step by `python -m dcgan_jax.benchmark` (docs/performance.md).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax.ops import dft

_DN = ("NHWC", "HWIO", "NHWC")

# --------------------------------------------------------------------------------------------------
# Sub-pixel form of a stride-s transposed correlation
# --------------------------------------------------------------------------------------------------
def _phase_taps(k: int, s: int, before: int):
  """Per output phase p in [0, s): the (tap a, input offset d) pairs with p + a - before = s * d."""
  return [[(a, (p + a - before) // s) for a in range(k) if (p + a - before) % s == 0] for p in range(s)]


def _sub_kernel(kernel, taps_y, taps_x, lo_y, lo_x, n_y, n_x):
  """kernel (kh, kw, cin, cout) -> (n_y, n_x, len(taps_y), len(taps_x), cin, cout): for each pair of
  phases, the taps placed at their offsets (minus lo), zeros where a phase has no tap. A gather with
  constant indices, so its gradient is a scatter-add back onto the kernel."""
  def index(taps, lo, n):
    idx, mask = np.zeros((n, len(taps)), np.int32), np.zeros((n, len(taps)), bool)
    for p, pairs in enumerate(taps):
      for a, d in pairs:
        idx[d - lo, p], mask[d - lo, p] = a, True
    return idx, mask
  (iy, my), (ix, mx) = index(taps_y, lo_y, n_y), index(taps_x, lo_x, n_x)
  k = kernel[iy[:, None, :, None], ix[None, :, None, :]]
  return jnp.where((my[:, None, :, None] & mx[None, :, None, :])[..., None, None], k, 0).astype(kernel.dtype)


def _offset_range(taps):
  """(lo, n): the offsets of all phases' taps, widened to include 0 so the padding is never negative."""
  offsets = [d for pairs in taps for _, d in pairs] + [0]
  return min(offsets), max(offsets) - min(offsets) + 1


def subpixel_transposed(x, kernel, strides, before):
  """y[s*m + p] = sum over taps a with (p + a - before) % s == 0 of x[m + (p + a - before) / s] @ kernel[a]
  per spatial axis (x is zero outside its extent), for m in [0, h): x (B, h, w, cin), kernel
  (kh, kw, cin, cout) -> y (B, sy*h, sx*w, cout). With before = the transposed convolution's padding this
  is lax.conv_transpose(x, kernel, strides, 'SAME'); see the module docstring."""
  (kh, kw, cin, cout), (sy, sx) = kernel.shape, strides
  b, h, w, _ = x.shape
  taps_y, taps_x = _phase_taps(kh, sy, before[0]), _phase_taps(kw, sx, before[1])
  conv = lambda k, lo_y, n_y, lo_x, n_x: jax.lax.conv_general_dilated(
      x, k, (1, 1), [(-lo_y, lo_y + n_y - 1), (-lo_x, lo_x + n_x - 1)], dimension_numbers=_DN)
  (lo_y, n_y), (lo_x, n_x) = _offset_range(taps_y), _offset_range(taps_x)
  if n_y * n_x * sy * sx <= 1.5 * kh * kw:  # one convolution computes every phase
    k = _sub_kernel(kernel, taps_y, taps_x, lo_y, lo_x, n_y, n_x)  # (n_y, n_x, sy, sx, cin, cout)
    y = conv(k.transpose(0, 1, 4, 2, 3, 5).reshape(n_y, n_x, cin, sy * sx * cout), lo_y, n_y, lo_x, n_x)
    y = y.reshape(b, h, w, sy, sx, cout)
  else:  # one convolution per phase, each with exactly its own taps
    phases = []
    for ty in taps_y:
      row = []
      for tx in taps_x:
        if not ty or not tx:
          row.append(jnp.zeros((b, h, w, cout), x.dtype))
          continue
        (ly, ny), (lx, nx) = _offset_range([ty]), _offset_range([tx])
        k = _sub_kernel(kernel, [ty], [tx], ly, lx, ny, nx)[:, :, 0, 0]
        row.append(conv(k, ly, ny, lx, nx))
      phases.append(jnp.stack(row, axis=3))  # (B, h, w, sx, cout)
    y = jnp.stack(phases, axis=3)  # (B, h, w, sy, sx, cout)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * sy, w * sx, cout)


# --------------------------------------------------------------------------------------------------
# conv_transpose: sub-pixel forward and weight gradient
# --------------------------------------------------------------------------------------------------
def transpose_padding(k: int, s: int, padding: str):
  """(before, after) padding of the dilated input, exactly as jax.lax.conv_transpose computes it."""
  if padding == "SAME":
    pad_len = k + s - 2
    before = k - 1 if s > k - 1 else int(math.ceil(pad_len / 2))
  elif padding == "VALID":
    pad_len = k + s - 2 + max(k - s, 0)
    before = k - 1
  else:
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
  return before, pad_len - before


def _lax_conv_transpose(x, kernel, strides, padding):
  return jax.lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)


# The rewrites pay off for layers with many channels on the rewritten side; with 1 channel (the image
# layers) XLA's own ops are as fast or faster (experiments/conv_bench.py).
MIN_CHANNELS = 16


def use_subpixel_forward(strides, padding: str, features: int) -> bool:
  """conv_transpose's forward pass in sub-pixel form: strided 'SAME' layers with >= MIN_CHANNELS output
  channels on XLA:CPU (seed model, batch 128: 7x7x128 -> 14x14x64 65 -> 31 ms)."""
  return max(strides) > 1 and padding == "SAME" and features >= MIN_CHANNELS


def _dft_if_stride_1(x, kernel, strides, pads):
  """A stride-1 layer in the DFT form where it pays (dft.py), else None. pads() -> (lo, hi) per axis."""
  return dft.correlate_where_it_pays(x, kernel, pads()) if tuple(strides) == (1, 1) else None


def conv_transpose(x, kernel, strides, padding):
  """x (B, h, w, cin), kernel (kh, kw, cin, cout) -> (B, H, W, cout); = jax.lax.conv_transpose.
  (At stride 1 a correlation with the kernel as it is, padded as lax pads it.)"""
  y = _dft_if_stride_1(x, kernel, strides, lambda: [transpose_padding(k, 1, padding) for k in kernel.shape[:2]])
  return _conv_transpose(x, kernel, tuple(strides), padding) if y is None else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose(x, kernel, strides, padding):
  if use_subpixel_forward(strides, padding, kernel.shape[-1]):
    return _subpixel_conv_transpose(x, kernel, strides, padding)
  return _lax_conv_transpose(x, kernel, strides, padding)


def _subpixel_conv_transpose(x, kernel, strides, padding):
  before = tuple(transpose_padding(k, s, padding)[0] for k, s in zip(kernel.shape[:2], strides))
  return subpixel_transposed(x, kernel, strides, before)


def _fwd(x, kernel, strides, padding):
  return _conv_transpose(x, kernel, strides, padding), (x, kernel)


def subpixel_weight_gradient(x, g, kernel, strides, padding):
  """conv_transpose's weight gradient as the sub-pixel form's own: stride-1 convolution weight
  gradients over the real input pixels, then the sub-kernel gather's scatter-add back onto the kernel
  ('SAME' padding). XLA:CPU's own weight gradient of a strided transposed convolution runs over the
  zeros of the dilated input (seed model, batch 128, 7x7x128 -> 14x14x64: 841 -> 28 ms)."""
  return jax.vjp(lambda k_: _subpixel_conv_transpose(x, k_, strides, padding), kernel)[1](g)[0]


def _bwd(strides, padding, residuals, g):
  x, kernel = residuals
  xla = lambda x_, k_: _lax_conv_transpose(x_, k_, strides, padding)
  if not use_subpixel_forward(strides, padding, kernel.shape[-1]):
    return jax.vjp(xla, x, kernel)[1](g)
  (dx,) = jax.vjp(lambda x_: xla(x_, kernel), x)[1](g)  # a plain strided convolution: fast
  return dx, subpixel_weight_gradient(x, g, kernel, strides, padding)


_conv_transpose.defvjp(_fwd, _bwd)


# --------------------------------------------------------------------------------------------------
# conv: XLA's forward and weight gradient; sub-pixel input gradient
# --------------------------------------------------------------------------------------------------
def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def use_subpixel_input_gradient(in_hw, strides, padding: str, in_features: int) -> bool:
  """conv's input gradient in sub-pixel form: strided 'SAME' layers whose input size is a multiple of
  the stride and that have >= MIN_CHANNELS input channels, on XLA:CPU (seed D, 2 x 128 x 14x14x64 ->
  7x7x128: 115 -> 61 ms)."""
  return (max(strides) > 1 and padding == "SAME" and in_features >= MIN_CHANNELS
          and all(n % s == 0 for n, s in zip(in_hw, strides)))


def conv(x, kernel, strides, padding):
  """x (B, H, W, cin), kernel (kh, kw, cin, cout) -> (B, H', W', cout); = lax.conv_general_dilated."""
  y = _dft_if_stride_1(x, kernel, strides,
                       lambda: jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding))
  return _conv(x, kernel, tuple(strides), padding) if y is None else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _lax_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, g):
  x, kernel = residuals
  xla = jax.vjp(lambda x_, k_: _lax_conv(x_, k_, strides, padding), x, kernel)[1]
  kh, kw = kernel.shape[:2]
  if use_subpixel_input_gradient(x.shape[1:3], strides, padding, x.shape[-1]):
    # dx[s*j + r] = sum over taps a with (r + b - a) % s == 0 of g[j + (r + b - a) / s] @ kernel[a]^T:
    # the transposed correlation with the flipped kernel and leading padding k - 1 - b.
    pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), strides, padding)  # the forward's (lo, hi)
    before = tuple(k - 1 - lo for k, (lo, _) in zip((kh, kw), pads))
    flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)  # (kh, kw, cout, cin)
    dx = subpixel_transposed(g, flipped, strides, before)
  else:
    dx = xla(g)[0]
  dw = xla(g)[1]
  return dx, dw


_conv.defvjp(_conv_fwd, _conv_bwd)

