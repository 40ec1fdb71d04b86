"""A transposed convolution whose weight gradient is fast on XLA:CPU.

`conv_transpose(x, kernel, strides, padding)` computes exactly `jax.lax.conv_transpose` (flax's
`nn.ConvTranspose`, transpose_kernel=False). Only its weight gradient differs in *how* it is computed.

Why: XLA:CPU computes the weight gradient of a strided transposed convolution (a convolution with
lhs_dilation) very slowly: ~0.5 s of the seed model's ~1 s training step at batch 128 on 2 cores, where
PyTorch takes ~60 ms for the whole layer (jax-ml/jax#23783, jax-ml/jax#31662, openxla/xla#34273).
Writing the dilation out explicitly does not help (the weight gradient becomes a convolution with a huge
window, just as slow). What is fast everywhere is a matrix product, so the custom VJP computes

    dW[kh, kw] = sum over (b, y, x) of  x_dilated_padded[b, y + kh, x + kw, :]^T  g[b, y, x, :]

tap by tap. x_dilated_padded is zero except on a stride-s lattice, so for each tap only the output
positions of one residue class mod s meet real input pixels: tap (kh, kw) is one (cin x N) @ (N x cout)
product over N = batch * h * w input pixels, with no zeros multiplied (s*s fewer FLOPs than the dilated
form). The input gradient stays XLA's own (it is a plain strided convolution, already fast).
"""

import functools
import math

import jax
import jax.numpy as jnp

_DN = ("NHWC", "HWIO", "NHWC")


def _padding(k: int, s: int, padding: str):
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


def _tap_range(tap: int, before: int, stride: int, n_in: int, n_out: int):
  """For one kernel tap along one axis: (first output index, first input index, count) of the output
  positions y (step `stride`) whose dilated-padded input position y + tap holds input pixel i."""
  y0 = (before - tap) % stride  # y + tap - before must be a multiple of the stride
  i0 = (y0 + tap - before) // stride
  if i0 < 0:  # skip outputs that fall in the leading padding
    y0, i0 = y0 + stride * (-i0), 0
  count = max(0, min(n_in - i0, (n_out - y0 + stride - 1) // stride))
  return y0, i0, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_transpose(x, kernel, strides, padding):
  """x (B, h, w, cin), kernel (kh, kw, cin, cout) -> (B, H, W, cout); = jax.lax.conv_transpose."""
  return jax.lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)


def _fwd(x, kernel, strides, padding):
  return conv_transpose(x, kernel, strides, padding), (x, kernel)


def use_tap_gradient(strides, features: int) -> bool:
  """Where the tap-wise weight gradient pays off on XLA:CPU (measured by
  experiments/conv_transpose_bench.py): strided layers with >= 16 output channels (seed model, batch
  128, 7x7x128 -> 14x14x64: 0.90 s -> 0.13 s). With 1 output channel (14x14x64 -> 28x28x1) both take
  ~12 ms, and XLA's is kept. Other backends keep XLA's (cuDNN on GPU)."""
  return max(strides) > 1 and features >= 16 and jax.default_backend() == "cpu"


def _bwd(strides, padding, residuals, g):
  x, kernel = residuals
  xla = lambda x_, k_: jax.lax.conv_transpose(x_, k_, strides, padding, dimension_numbers=_DN)
  if not use_tap_gradient(strides, kernel.shape[-1]):
    return jax.vjp(xla, x, kernel)[1](g)
  (dx,) = jax.vjp(lambda x_: xla(x_, kernel), x)[1](g)
  kh, kw = kernel.shape[:2]
  (bh, _), (bw, _) = _padding(kh, strides[0], padding), _padding(kw, strides[1], padding)
  rows = []
  for a in range(kh):
    y0, i0, ny = _tap_range(a, bh, strides[0], x.shape[1], g.shape[1])
    cols = []
    for b in range(kw):
      x0, j0, nx = _tap_range(b, bw, strides[1], x.shape[2], g.shape[2])
      if ny == 0 or nx == 0:
        cols.append(jnp.zeros(kernel.shape[2:], kernel.dtype))
        continue
      xs = x[:, i0:i0 + ny, j0:j0 + nx, :]
      gs = g[:, y0:y0 + strides[0] * (ny - 1) + 1:strides[0], x0:x0 + strides[1] * (nx - 1) + 1:strides[1], :]
      cols.append(jnp.einsum("byxi,byxo->io", xs, gs, preferred_element_type=jnp.float32)
                  .astype(kernel.dtype))
    rows.append(jnp.stack(cols))
  return dx, jnp.stack(rows)


conv_transpose.defvjp(_fwd, _bwd)
