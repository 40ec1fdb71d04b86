"""The exact patches form of a convolution (--invariant_groups): one-hot patch extraction, then plain
matrix products, in both directions of autodiff; an input dilation is split into its output phases
first, so its zeros are never copied or multiplied.

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


def _patches(x, kernel_hw, strides, pads, channels_first=False):
  """The windows of x that a convolution multiplies with its kernel: (B, oh, ow, cin*kh*kw), features in
  (c, i, j) order, or with channels_first (cin*kh*kw, B*oh*ow), built in that layout (a transpose would
  be folded by XLA into the matrix product as a transposed operand). lax.conv_general_dilated_patches
  is a convolution with a one-hot kernel, so exact: each output is one input value (plus zeros)."""
  out_spec = "CNHW" if channels_first else "NHWC"
  patches = jax.lax.conv_general_dilated_patches(x, kernel_hw, strides, pads,
                                                 dimension_numbers=("NHWC", "HWIO", out_spec))
  return patches.reshape(patches.shape[0], -1) if channels_first else patches


def _kernel_matrix(kernel):
  """(kh, kw, cin, cout) -> (cin*kh*kw, cout), rows in the patches' (c, i, j) order."""
  kh, kw, cin, cout = kernel.shape
  return jnp.transpose(kernel, (2, 0, 1, 3)).reshape(cin * kh * kw, cout)


def patches_conv(x, kernel, strides, pads, lhs_dilation=(1, 1)):
  """= lax.conv_general_dilated(x, kernel, strides, pads, lhs_dilation) (NHWC, HWIO), in patches form.

  x (B, H, W, cin), kernel (kh, kw, cin, cout), both float; pads ((lo, hi), (lo, hi)), may be negative.
  An input dilation (the forward pass of a strided transposed convolution, the input gradient of a
  strided convolution) is computed by output phases (`_phase_conv`): the dilated input would make the
  patches s*s times larger, and their products with its zeros the bulk of the work. Everything else is
  `_dense_conv`.
  """
  if tuple(lhs_dilation) == (1, 1):
    return _dense_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)))
  if tuple(strides) != (1, 1):
    raise ValueError(f"patches_conv: strides {strides} with lhs_dilation {lhs_dilation}: no layer needs both")
  return _phase_conv(x, kernel, tuple(map(tuple, pads)), tuple(lhs_dilation))


def _phase_conv(x, kernel, pads, dilation):
  """The stride-1 convolution of the `dilation`-dilated x, without the dilation's zeros.

  Output o = s * q + p (per spatial axis, phase p in [0, s)) meets only the taps a = a0, a0 + s, ... with
  a0 = (lo - p) mod s, at undilated input rows q + (p + a0 - lo) / s, ...: per phase, a stride-1
  convolution of x with the sub-kernel kernel[a0::s]. All phases are computed by one convolution of x:
  each phase's sub-kernel is placed at its row offsets in a common window (zero taps elsewhere) and the
  phases are stacked as output channels, which then interleave (depth-to-space). The window's zero taps
  cost 1.44x the products of the sub-kernels for 5x5 kernels at stride 2 and 2.25x for 4x4 ones, against
  4x for the dilated input. Only exact data movement is added (pads, strided slices, stacks, reshapes),
  and the gradient of each is a slice or a pad, never a scatter. (cpu_kernels.subpixel_transposed is the
  same idea for the "cpu" form, but it gathers its sub-kernels, whose gradient is a scatter-add, and
  calls XLA's convolutions.)
  """
  b, h, w, _ = x.shape
  kh, kw, cin, cout = kernel.shape
  (sy, sx), ((lo_y, hi_y), (lo_x, hi_x)) = dilation, pads
  out_h, out_w = (h - 1) * sy + 1 + lo_y + hi_y - kh + 1, (w - 1) * sx + 1 + lo_x + hi_x - kw + 1
  qh, qw = -(-out_h // sy), -(-out_w // sx)  # outputs per phase (the last phases padded to this)

  def phases(k, s, lo):  # per phase: (first tap, number of taps, input offset of the first tap)
    return [((lo - p) % s, len(range((lo - p) % s, k, s)), (p + (lo - p) % s - lo) // s) for p in range(s)]

  def window(ph):  # the offsets all phases' taps span: (first, length)
    first = min(offset for _, taps, offset in ph if taps)
    return first, max(offset + taps for _, taps, offset in ph if taps) - first

  ph_y, ph_x = phases(kh, sy, lo_y), phases(kw, sx, lo_x)
  (oy, ny), (ox, nx) = window(ph_y), window(ph_x)
  rows = []
  for y0, ty, off_y in ph_y:
    cols = []
    for x0, tx, off_x in ph_x:
      sub = kernel[y0::sy, x0::sx][:ty, :tx]  # (ty, tx, cin, cout); ty or tx may be 0
      cols.append(jnp.pad(sub, ((off_y - oy, ny - (off_y - oy) - ty), (off_x - ox, nx - (off_x - ox) - tx),
                                (0, 0), (0, 0))))
    rows.append(jnp.stack(cols, 3))  # (ny, nx, cin, sx, cout)
  merged = jnp.stack(rows, 3).reshape(ny, nx, cin, sy * sx * cout)  # channels (phase y, phase x, cout)
  y = _dense_conv(x, merged, (1, 1), ((-oy, qh - 1 + oy + ny - h), (-ox, qw - 1 + ox + nx - w)))
  y = y.reshape(b, qh, qw, sy, sx, cout).transpose(0, 1, 3, 2, 4, 5).reshape(b, qh * sy, qw * sx, cout)
  return y[:, :out_h, :out_w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dense_conv(x, kernel, strides, pads):
  """= lax.conv_general_dilated(x, kernel, strides, pads): exact patches (B, H', W', cin*kh*kw) @ kernel
  (cin*kh*kw, cout), and the same form for both gradients. Costs the patches' memory (kh*kw / stride^2
  times the input)."""
  return jnp.dot(_patches(x, kernel.shape[:2], strides, pads), _kernel_matrix(kernel))


def _dense_conv_fwd(x, kernel, strides, pads):
  return _dense_conv(x, kernel, strides, pads), (x, kernel)


def _dense_conv_bwd(strides, pads, residuals, g):
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  # Weight gradient: (cin*kh*kw, N) @ (N, cout), the patches built channels-first.
  dw = jnp.dot(_patches(x, (kh, kw), strides, pads, channels_first=True), g.reshape(-1, cout))
  dw = jnp.transpose(dw.reshape(cin, kh, kw, cout), (1, 2, 0, 3))
  # Input gradient: a convolution of g with the flipped, in/out-swapped kernel, the stride turned into
  # an input dilation (as jax's own conv VJP), in patches form again.
  in_hw, out_hw = x.shape[1:3], g.shape[1:3]
  back_pads = []
  for n, k, s, (lo, _), o in zip(in_hw, (kh, kw), strides, pads, out_hw):
    before = k - lo - 1
    back_pads.append((before, n + k - 1 - ((o - 1) * s + 1) - before))
  flipped = jnp.swapaxes(kernel[::-1, ::-1], 2, 3)
  return patches_conv(g, flipped, (1, 1), tuple(back_pads), tuple(strides)), dw


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


def patches_conv_2d(x, kernel, strides, padding):
  """= conv(x, kernel, strides, padding) (flax's nn.Conv), in patches form."""
  pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  return patches_conv(x, kernel, tuple(strides), tuple(map(tuple, pads)))


def patches_conv_transpose(x, kernel, strides, padding):
  """= conv_transpose(x, kernel, strides, padding) (flax's nn.ConvTranspose), in patches form: a
  stride-1 convolution of the stride-dilated input with the (unflipped) kernel."""
  pads = [transpose_padding(k, s, padding) for k, s in zip(kernel.shape[:2], strides)]
  return patches_conv(x, kernel, (1, 1), tuple(map(tuple, pads)), tuple(strides))