"""The exact patches form of a convolution (--invariant_groups): one-hot patch extraction, then plain
matrix products, in both directions of autodiff.

Why: XLA:CPU's convolutions, and its matrix products with a transposed operand, block their sums by a
plan that depends on the process (a batch-1 convolution's weight gradient differs in the last bits
between a process with 1 and one with 4 virtual CPU devices, on the same HLO). Here the only inexact
operations are matrix products of the plain (rows x k) @ (k x cols) form, which XLA:CPU hands to its dot
library (YNNPACK) and whose results do not depend on the process (tests/test_topology.py).
"""

import functools

import jax
import jax.numpy as jnp

from dcgan_jax.ops.cpu_kernels import transpose_padding

def _patches(x, kernel_hw, strides, pads, lhs_dilation, channels_first=False):
  """The windows of x that a convolution multiplies with its kernel: (B, oh, ow, cin*kh*kw), features in
  (c, i, j) order, or with channels_first (cin*kh*kw, B*oh*ow), built in that layout (a transpose would
  be folded by XLA into the matrix product as a transposed operand). lax.conv_general_dilated_patches
  is a convolution with a one-hot kernel, so exact: each output is one input value (plus zeros)."""
  out_spec = "CNHW" if channels_first else "NHWC"
  patches = jax.lax.conv_general_dilated_patches(x, kernel_hw, strides, pads, lhs_dilation=lhs_dilation,
                                                 dimension_numbers=("NHWC", "HWIO", out_spec))
  return patches.reshape(patches.shape[0], -1) if channels_first else patches


def _kernel_matrix(kernel):
  """(kh, kw, cin, cout) -> (cin*kh*kw, cout), rows in the patches' (c, i, j) order."""
  kh, kw, cin, cout = kernel.shape
  return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def patches_conv(x, kernel, strides, pads, lhs_dilation=(1, 1)):
  """= lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation) (NHWC, HWIO): exact patches
  (B, H', W', cin*kh*kw) @ kernel (cin*kh*kw, cout), and the same form for both gradients.

  Costs: the patches' memory (kh*kw times the input), and for lhs_dilation the zeros of the dilated input
  are multiplied too.
  """
  return jnp.dot(_patches(x, kernel.shape[:2], strides, pads, lhs_dilation), _kernel_matrix(kernel))


def _patches_fwd(x, kernel, strides, pads, lhs_dilation):
  return patches_conv(x, kernel, strides, pads, lhs_dilation), (x, kernel)


def _patches_bwd(strides, pads, lhs_dilation, residuals, g):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  # Weight gradient: (cin*kh*kw, N) @ (N, cout), the patches built channels-first.
  dw = jnp.dot(_patches(x, (kh, kw), strides, pads, lhs_dilation, channels_first=True), g.reshape(-1, cout))
  dw = jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  # Input gradient: a convolution of g with the flipped, in/out-swapped kernel, strides and dilation
  # exchanged (as jax's own conv VJP), in patches form again.
  in_hw, out_hw = x.shape[1:3], g.shape[1:3]
  back_pads = []
  for n, k, s, d, (lo, _), o in zip(in_hw, (kh, kw), strides, lhs_dilation, pads, out_hw):
    before = k - lo - 1
    back_pads.append((before, (n - 1) * d + 1 + k - 1 - ((o - 1) * s + 1) - before))
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  dx = patches_conv(g, flipped, tuple(lhs_dilation), tuple(back_pads), tuple(strides))
  return dx, dw


patches_conv.defvjp(_patches_fwd, _patches_bwd)


def patches_conv_2d(x, kernel, strides, padding):
  """= conv(x, kernel, strides, padding) (flax's nn.Conv), in patches form."""
  pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  return patches_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)))


def patches_conv_transpose(x, kernel, strides, padding):
  """= conv_transpose(x, kernel, strides, padding) (flax's nn.ConvTranspose), in patches form: a
  stride-1 convolution of the stride-dilated input with the (unflipped) kernel."""
  pads = [transpose_padding(k, s, padding) for k, s in zip(kernel.shape[:2], strides)]
  return patches_conv(x, kernel, (1, 1), tuple(map(tuple, pads)), tuple(strides))