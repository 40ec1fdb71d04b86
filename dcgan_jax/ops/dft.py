"""Stride-1 correlations on small maps in a real DFT form (XLA:CPU only; reached through cpu_kernels).

The seed generator's 7x7x256 -> 7x7x128 layer (5x5 kernel): XLA:CPU's (Eigen's) convolution does 25
multiply-adds per output pixel and channel pair, padding taps included (49 * 25 = 1225 per image and
channel pair), where this form does 4 * 45 = 180 plus the transforms, as batched matrix products that
run at the same speed.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

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
  """The DFT form for this stride-1 correlation: in float32, where it needs at most DFT_MAX_COST_RATIO
  of the direct convolution's multiplications, transforms included (the kernel's is per call, so small
  batches keep XLA's: the seed's layer takes it from batch ~8 on)."""
  if not (x.dtype == jnp.float32 and kernel.dtype == jnp.float32):
    return False
  in_hw, kernel_hw, before, out_hw = geometry
  n, cin, cout = x.shape[0], x.shape[-1], kernel.shape[-1]
  p, k, q = math.prod(in_hw), math.prod(kernel_hw), math.prod(out_hw)
  lh, lw = map(_circular_length, in_hw, out_hw, kernel_hw, before)
  f = lh * (lw // 2 + 1)
  dft = n * (4 * f * p * cin + 4 * f * cin * cout + 2 * f * q * cout) + 2 * f * k * cin * cout
  return dft <= DFT_MAX_COST_RATIO * n * q * k * cin * cout


def correlate_where_it_pays(x, kernel, pads):
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
# each at batch 128; experiments/conv_bench.py compares this form with XLA's). The residuals are the
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
