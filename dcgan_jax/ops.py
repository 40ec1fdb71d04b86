"""Convolutions whose slow XLA:CPU code paths are replaced by equivalent fast ones.

`conv_transpose(x, kernel, strides, padding)` computes exactly `jax.lax.conv_transpose` (flax's
`nn.ConvTranspose`, transpose_kernel=False), and `conv(x, kernel, strides, padding)` exactly
`jax.lax.conv_general_dilated` (flax's `nn.Conv`). What differs is *how* they are computed on the CPU
backend; elsewhere (cuDNN on GPU, TPU) both are XLA's own ops.

Why: XLA:CPU runs a convolution with lhs_dilation (the forward pass of a strided transposed convolution,
and the input gradient of a strided convolution) and the weight gradient of a strided transposed
convolution over the zeros of the dilated input. In the seed model at batch 128 on 2 cores the
7x7x128 -> 14x14x64 weight gradient alone took ~0.5 s of a ~1 s step, where PyTorch takes ~60 ms for the
whole layer (jax-ml/jax#23783, jax-ml/jax#31662, openxla/xla#34273). Writing the dilation out explicitly
does not help: the zeros are still multiplied. Two rewrites multiply no zeros; a third needs fewer
multiplications than a direct convolution:

* Sub-pixel form (forward of conv_transpose, input gradient of conv). A stride-s transposed correlation
  splits into s*s output phases: output pixel s*m + p only meets the kernel taps a with
  (p + a - before) divisible by s, at input pixel m + (p + a - before) / s. Each phase is a *stride-1*
  convolution with a sub-kernel, and the phases interleave (depth-to-space) into the output. When the
  phases' tap offsets line up (5x5 kernels, stride 2: at most 1.44x the exact FLOPs) one convolution
  with s*s*cout output channels computes them all; otherwise (4x4 kernels: 2.25x) one per phase.
  The weight gradient of conv_transpose is the sub-pixel form's own (autodiff): stride-1 convolution
  weight gradients over the real input pixels, scatter-added back onto the kernel.
* Tap-wise weight gradient (conv_transpose with 'VALID' padding, which has no sub-pixel form here):
  dW[kh, kw] = sum over (b, y, x) of x_dilated_padded[b, y + kh, x + kw, :]^T g[b, y, x, :]. For each
  tap only the output positions of one residue class mod s meet real input pixels, so tap (kh, kw) is
  one (cin x N) @ (N x cout) matmul over the N = batch * h * w input pixels.
* DFT form (stride-1 layers on small maps: the seed generator's 7x7x256 -> 7x7x128, 5x5): no zeros
  there, but Eigen's convolution does 25 multiply-adds per output pixel and channel pair, the padding's
  included; a real DFT of the 7x7 maps (length 9 per axis) does 4 * 45 = 180 per *image* and channel
  pair instead of 49 * 25 = 1225, as per-frequency matrix products (see the section below).
Which convolution library XLA:CPU calls matters as much: jaxlib 0.10 hands convolutions to YNNPACK,
and for this model Eigen's are faster (`configure_xla_cpu`, called first by every entry point).

Measured per layer by experiments/conv_bench.py, and per step by dcgan_jax.benchmark; each rewrite is
tested against XLA's formulation in outputs and gradients (tests/test_models.py).
"""

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

_DN = ("NHWC", "HWIO", "NHWC")

# jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK; this leaves it the matrix products only, and
# convolutions go to Eigen. Seed model, batch 128, 2 cores: ~150 -> ~195 images/s (python -m
# dcgan_jax.benchmark with and without --xla_cpu_convolutions=ynnpack).
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
_FLAG_CHECKED_JAXLIB = "0.10."  # the flag's name is XLA-internal; an unknown XLA flag aborts the process


def configure_xla_cpu(convolutions: str = "eigen") -> bool:
  """Chooses XLA:CPU's convolution library ("eigen" or "ynnpack", jaxlib's default) through XLA_FLAGS.

  Must run before JAX initialises its backends (first thing in a program's main; jax may be imported).
  Changes nothing, and returns False, when the choice is already in XLA_FLAGS (the user's wins), for
  "ynnpack", once backends are up, or on a jaxlib whose flags were not checked (e.g. 0.11 on the GPU
  machine; the flag only concerns the CPU backend anyway). Returns True when it set the flag."""
  import jaxlib  # the installed jaxlib's version, without initialising a backend
  from jax._src import xla_bridge
  flags = os.environ.get("XLA_FLAGS", "")
  if (convolutions != "eigen" or "xla_cpu_experimental_ynn_fusion_type" in flags
      or not jaxlib.__version__.startswith(_FLAG_CHECKED_JAXLIB)
      or getattr(xla_bridge, "backends_are_initialized", lambda: False)()):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
  return True


def _on_cpu() -> bool:
  return jax.default_backend() == "cpu"


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
# conv_transpose: sub-pixel forward and weight gradient ('VALID': tap-wise weight gradient)
# --------------------------------------------------------------------------------------------------
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


def _lax_conv_transpose(x, kernel, strides, padding):
  return jax.lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)


# The rewrites pay off for layers with many channels on the rewritten side; with 1 channel (the image
# layers) XLA's own ops are as fast or faster (experiments/conv_bench.py).
MIN_CHANNELS = 16


def use_subpixel_forward(strides, padding: str, features: int) -> bool:
  """conv_transpose's forward pass in sub-pixel form: strided 'SAME' layers with >= MIN_CHANNELS output
  channels on XLA:CPU (seed model, batch 128: 7x7x128 -> 14x14x64 65 -> 31 ms)."""
  return max(strides) > 1 and padding == "SAME" and features >= MIN_CHANNELS and _on_cpu()


def conv_transpose(x, kernel, strides, padding):
  """x (B, h, w, cin), kernel (kh, kw, cin, cout) -> (B, H, W, cout); = jax.lax.conv_transpose."""
  if tuple(strides) == (1, 1):  # a correlation with the kernel as it is, padded as lax pads it
    y = _dft_where_it_pays(x, kernel, [_padding(k, 1, padding) for k in kernel.shape[:2]])
    if y is not None:
      return y
  return _conv_transpose(x, kernel, tuple(strides), padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_transpose(x, kernel, strides, padding):
  if use_subpixel_forward(strides, padding, kernel.shape[-1]):
    return _subpixel_conv_transpose(x, kernel, strides, padding)
  return _lax_conv_transpose(x, kernel, strides, padding)


def _subpixel_conv_transpose(x, kernel, strides, padding):
  before = tuple(_padding(k, s, padding)[0] for k, s in zip(kernel.shape[:2], strides))
  return subpixel_transposed(x, kernel, strides, before)


def _fwd(x, kernel, strides, padding):
  return _conv_transpose(x, kernel, strides, padding), (x, kernel)


def use_tap_gradient(strides, features: int) -> bool:
  """Where the tap-wise weight gradient pays off on XLA:CPU (measured by
  experiments/conv_bench.py): strided layers with >= 16 output channels (seed model, batch
  128, 7x7x128 -> 14x14x64: 0.90 s -> 0.13 s). With 1 output channel (14x14x64 -> 28x28x1) both take
  ~12 ms, and XLA's is kept. Other backends keep XLA's (cuDNN on GPU)."""
  return max(strides) > 1 and features >= MIN_CHANNELS and _on_cpu()


def tap_weight_gradient(x, g, kernel, strides, padding):
  """conv_transpose's weight gradient tap by tap: for kernel tap (a, b), one (cin x N) @ (N x cout)
  product over the N input pixels that meet it (see the module docstring). x (B, h, w, cin), g the
  output gradient (B, H, W, cout), kernel (kh, kw, cin, cout) (its shape and dtype) -> like kernel."""
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
  return jnp.stack(rows)


def subpixel_weight_gradient(x, g, kernel, strides, padding):
  """conv_transpose's weight gradient as the sub-pixel form's own: stride-1 convolution weight
  gradients over the real input pixels, then the sub-kernel gather's scatter-add back onto the kernel
  ('SAME' padding). 2.5-4.5x faster than tap by tap for the seed's and the dcgan preset's larger layers,
  whose strided slices of g are copies; about even (0.9x) for the smallest, 4x4x512 -> 8x8x256
  (experiments/conv_bench.py compares the two)."""
  return jax.vjp(lambda k_: _subpixel_conv_transpose(x, k_, strides, padding), kernel)[1](g)[0]


def _bwd(strides, padding, residuals, g):
  x, kernel = residuals
  xla = lambda x_, k_: _lax_conv_transpose(x_, k_, strides, padding)
  if not use_tap_gradient(strides, kernel.shape[-1]):
    return jax.vjp(xla, x, kernel)[1](g)
  (dx,) = jax.vjp(lambda x_: xla(x_, kernel), x)[1](g)  # a plain strided convolution: fast
  if use_subpixel_forward(strides, padding, kernel.shape[-1]):
    return dx, subpixel_weight_gradient(x, g, kernel, strides, padding)
  return dx, tap_weight_gradient(x, g, kernel, strides, padding)


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
  return (max(strides) > 1 and padding == "SAME" and in_features >= MIN_CHANNELS and _on_cpu()
          and all(n % s == 0 for n, s in zip(in_hw, strides)))


def conv(x, kernel, strides, padding):
  """x (B, H, W, cin), kernel (kh, kw, cin, cout) -> (B, H', W', cout); = lax.conv_general_dilated."""
  if tuple(strides) == (1, 1):
    y = _dft_where_it_pays(x, kernel, jax.lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], (1, 1), padding))
    if y is not None:
      return y
  return _conv(x, kernel, tuple(strides), padding)


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


# --------------------------------------------------------------------------------------------------
# Stride-1 correlations on small maps in a real DFT form (the seed generator's 7x7x256 -> 7x7x128)
# --------------------------------------------------------------------------------------------------
# A stride-1 convolution (either kind) is a correlation y[i] = sum_a x[i + a - before] @ w[a] per axis, x
# zero outside its n_in pixels. Along an axis of circular length L >= max(n_out + k - 1 - before,
# n_in + before) it equals the circular correlation (indices that wrap around land in the zero padding),
# so the DFT turns it into one product per frequency: Y[u] = X[u] W[u], X[u] = sum_h x[h] e^(-2 pi i u h/L),
# W[u] = sum_a w[a] e^(2 pi i u (a - before)/L). x is real, so half the 2-D spectrum suffices:
# F = Lh * (Lw // 2 + 1) frequencies. Per frequency the complex (N x cin) @ (cin x cout) product is two
# real ones of (2N x cin) @ (cin x cout):  [Re Y; Im Y] = [Re X; Im X] @ Re W + [-Im X; Re X] @ Im W.
# The maps are a few pixels wide, so the transforms are constant matrices (the DFT evaluated at the
# map's pixels, built by numpy once per shape) applied as matrix products. Why: XLA:CPU's (Eigen's)
# convolution does kh*kw multiply-adds per output pixel and channel pair, padding taps included (49 * 25
# = 1225 for the seed's layer), where this form does 4 * F = 180 plus the transforms; its matrix
# products run at the same speed. Rounding differs from XLA's convolution (relative error ~4e-7 in
# float32, tests/test_models.py); float32 only, where it pays (`use_dft`).
DFT_MAX_COST_RATIO = 0.5  # use the DFT form where it needs at most this fraction of the multiplications


def correlation_geometry(in_hw, kernel_hw, pads):
  """(in_hw, kernel_hw, before, out_hw) of a stride-1 correlation with (lo, hi) padding per axis."""
  out_hw = tuple(n + lo + hi - k + 1 for n, k, (lo, hi) in zip(in_hw, kernel_hw, pads))
  return tuple(in_hw), tuple(kernel_hw), tuple(lo for lo, _ in pads), out_hw


def _circular_length(n_in: int, n_out: int, k: int, before: int) -> int:
  """The shortest L at which no index of the correlation wraps around onto a real input pixel."""
  return max(n_out + k - 1 - before, n_in + before)


def _dft_axis(n_in: int, n_out: int, k: int, before: int):
  """One axis: the circular length L and the DFT factors at the input's pixels (L, n_in), the kernel's
  taps (L, k) and, inverse, at the output's pixels (L, n_out)."""
  length = _circular_length(n_in, n_out, k, before)
  u = np.arange(length)[:, None] * (2j * np.pi / length)
  return (length, np.exp(-u * np.arange(n_in)), np.exp(u * (np.arange(k) - before)),
          np.exp(u * np.arange(n_out)))


@functools.lru_cache(maxsize=None)
def _dft_matrices(geometry):
  """float32 numpy matrices of the 2-D real DFT form, frequencies (u, v) with v in [0, Lw // 2]:
  to_xs (F, 2, P) and to_xs2 (F, 2, P) give [Re X; Im X] and [-Im X; Re X] from the P input pixels;
  to_wr, to_wi (F, kh*kw) give Re W and Im W from the taps; from_ys (Q, F, 2) gives the Q output pixels
  from [Re Y; Im Y] (each v in (0, Lw/2) stands for itself and its mirror -v, hence weight 2)."""
  in_hw, kernel_hw, before, out_hw = geometry
  lh, xh, wh, yh = _dft_axis(in_hw[0], out_hw[0], kernel_hw[0], before[0])
  lw, xw, ww, yw = _dft_axis(in_hw[1], out_hw[1], kernel_hw[1], before[1])
  half = lw // 2 + 1
  x = np.einsum("uh,vw->uvhw", xh, xw[:half]).reshape(lh * half, -1)
  w = np.einsum("ua,vb->uvab", wh, ww[:half]).reshape(lh * half, -1)
  v = np.arange(half)
  mirrored = np.where((v == 0) | (2 * v == lw), 1.0, 2.0) / (lh * lw)
  y = np.einsum("ui,vj,v->ijuv", yh, yw[:half], mirrored).reshape(out_hw[0] * out_hw[1], lh * half)
  matrices = (np.stack([x.real, x.imag], 1), np.stack([-x.imag, x.real], 1), w.real, w.imag,
              np.stack([y.real, -y.imag], 2))
  return tuple(m.astype(np.float32) for m in matrices)


def use_dft(x, kernel, geometry) -> bool:
  """The DFT form for this stride-1 correlation: on XLA:CPU, in float32, where it needs at most
  DFT_MAX_COST_RATIO of the direct convolution's multiplications, transforms included (the kernel's is
  per call, so small batches keep XLA's: the seed's layer takes it from batch ~8 on)."""
  if not (_on_cpu() and x.dtype == jnp.float32 and kernel.dtype == jnp.float32):
    return False
  in_hw, kernel_hw, before, out_hw = geometry
  n, cin, cout = x.shape[0], x.shape[-1], kernel.shape[-1]
  p, k, q = math.prod(in_hw), math.prod(kernel_hw), math.prod(out_hw)
  lh, lw = map(_circular_length, in_hw, out_hw, kernel_hw, before)
  f = lh * (lw // 2 + 1)
  dft = n * (4 * f * p * cin + 4 * f * cin * cout + 2 * f * q * cout) + 2 * f * k * cin * cout
  return dft <= DFT_MAX_COST_RATIO * n * q * k * cin * cout


def _dft_where_it_pays(x, kernel, pads):
  """The stride-1 correlation with (lo, hi) `pads` in the DFT form where use_dft chooses it, else None."""
  geometry = correlation_geometry(x.shape[1:3], kernel.shape[:2], pads)
  return dft_correlate(x, kernel, geometry) if use_dft(x, kernel, geometry) else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dft_correlate(x, kernel, geometry):
  """x (N, h, w, cin) float32, kernel (kh, kw, cin, cout) -> (N, out_h, out_w, cout): the stride-1
  correlation of `geometry` (correlation_geometry) in the real DFT form above."""
  return _dft_fwd(x, kernel, geometry)[0]


# Every product below is a plain (batch, rows, k) x (batch, k, cols) one, frequency-major, with the
# operands in the layout it wants; only x, y and their gradients are transposed (pixel-major). Written
# out rather than left to autodiff, whose transposes made XLA copy the frequency-domain arrays (11.8 MB
# each at batch 128): 131 -> 112 ms forward + backward for the seed's layer, measured once with a
# script not kept (experiments/conv_bench.py compares this form with XLA's). The residuals are the
# transformed x and kernel (x's: 2 * 2 * 45 / 49 = 3.7x its size for the seed's layer), so the
# backward pass does not transform them again.
def _dft_fwd(x, kernel, geometry):
  to_xs, to_xs2, to_wr, to_wi, from_ys = _dft_matrices(geometry)
  n, cin, cout, f = x.shape[0], x.shape[-1], kernel.shape[-1], to_xs.shape[0]
  xp = jnp.transpose(x.reshape(n, -1, cin), (1, 0, 2))  # (P, N, cin)
  xs = jnp.einsum("frp,pnc->frnc", to_xs, xp).reshape(f, 2 * n, cin)  # [Re X; Im X] per frequency
  xs2 = jnp.einsum("frp,pnc->frnc", to_xs2, xp).reshape(f, 2 * n, cin)  # [-Im X; Re X]
  taps = kernel.reshape(-1, cin, cout)
  wr = jnp.einsum("fk,kco->fco", to_wr, taps)
  wi = jnp.einsum("fk,kco->fco", to_wi, taps)
  ys = (jnp.matmul(xs, wr) + jnp.matmul(xs2, wi)).reshape(f, 2, n, cout)  # [Re Y; Im Y]
  yq = jnp.einsum("qfs,fsno->qno", from_ys, ys)  # (Q, N, cout)
  y = jnp.transpose(yq, (1, 0, 2)).reshape(n, *geometry[3], cout)
  return y, (xs, xs2, wr, wi)


def _dft_bwd(geometry, residuals, g):
  xs, xs2, wr, wi = residuals
  to_xs, to_xs2, to_wr, to_wi, from_ys = _dft_matrices(geometry)
  in_hw, kernel_hw = geometry[:2]
  f, n, cin, cout = xs.shape[0], xs.shape[1] // 2, xs.shape[2], wr.shape[2]
  gq = jnp.transpose(g.reshape(n, -1, cout), (1, 0, 2))  # (Q, N, cout)
  dys = jnp.einsum("qfs,qno->fsno", from_ys, gq).reshape(f, 2 * n, cout)
  dxs = jnp.einsum("fmo,fco->fmc", dys, wr).reshape(f, 2, n, cin)
  dxs2 = jnp.einsum("fmo,fco->fmc", dys, wi).reshape(f, 2, n, cin)
  dxp = jnp.einsum("frp,frnc->pnc", to_xs, dxs) + jnp.einsum("frp,frnc->pnc", to_xs2, dxs2)
  dx = jnp.transpose(dxp, (1, 0, 2)).reshape(n, *in_hw, cin)
  dwr = jnp.einsum("fmc,fmo->fco", xs, dys)
  dwi = jnp.einsum("fmc,fmo->fco", xs2, dys)
  dw = jnp.einsum("fk,fco->kco", to_wr, dwr) + jnp.einsum("fk,fco->kco", to_wi, dwi)
  return dx, dw.reshape(*kernel_hw, cin, cout)


dft_correlate.defvjp(_dft_fwd, _dft_bwd)


# --------------------------------------------------------------------------------------------------
# Patches form: slices, pads and one matrix product (--invariant_groups)
# --------------------------------------------------------------------------------------------------
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

  Why: XLA:CPU's convolutions, and its matrix products with a transposed operand, block their sums by a
  plan that depends on the process (measured: a batch-1 convolution's weight gradient differs in the
  last bits between a process with 1 and one with 4 virtual CPU devices, on the same HLO). Here the only
  inexact operations are matrix products of the plain (rows x k) @ (k x cols) form, which XLA:CPU hands
  to its dot library (YNNPACK) and whose results did not depend on it. Costs: the patches' memory
  (kh*kw times the input), and for lhs_dilation the zeros of the dilated input are multiplied too.
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
  pads = [_padding(k, s, padding) for k, s in zip(kernel.shape[:2], strides)]
  return patches_conv(x, kernel, (1, 1), tuple(map(tuple, pads)), tuple(strides))
