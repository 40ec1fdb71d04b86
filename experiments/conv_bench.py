"""Per layer of the seed model, XLA's own convolution vs the CPU form's (cpu_kernels.py, dft.py), in
each direction that it rewrites (forward, input gradient, weight gradient). One JSON line per measurement.

    python experiments/conv_bench.py [--batch 128] [--repeats 10]

The generator's layers run at the batch size, the discriminator's at twice it (D's update sees a real
and a fake batch). `used` says whether the models' "cpu" form uses its rewrite for that direction here. Then
the step's other large convolutions (G's stride-1 first layer, D's second layer) in every direction,
with their GFLOP/s, and a plain matrix product for scale; G's first layer also in the DFT form. Last,
the transposed convolutions' weight gradient in sub-pixel form against XLA's, for the strided layers of
both presets.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax.ops import convolutions
from dcgan_jax.ops import cpu_kernels as ops
from dcgan_jax.ops import dft

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--repeats", type=int, default=10)
a = p.parse_args()
convolutions.configure_xla_cpu()  # what dcgan_jax's programs run with
DN = ("NHWC", "HWIO", "NHWC")


def median_seconds(f, *args):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))  # compile
  times = []
  for _ in range(a.repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def directions(f):
  return {"forward": lambda x, w, g: f(x, w),
          "input_gradient": lambda x, w, g: jax.vjp(lambda x_: f(x_, w), x)[1](g)[0],
          "weight_gradient": lambda x, w, g: jax.vjp(lambda w_: f(x, w_), w)[1](g)[0]}


def compare(layer, xla, ours, x, w, used):
  g = jax.random.normal(jax.random.key(2), jax.eval_shape(xla, x, w).shape)
  for direction, f_xla in directions(xla).items():
    f_ours = directions(ours)[direction]
    if direction not in used:
      continue
    t_xla, t_ours = median_seconds(f_xla, x, w, g), median_seconds(f_ours, x, w, g)
    err = float(jnp.max(jnp.abs(f_xla(x, w, g) - f_ours(x, w, g))) / jnp.max(jnp.abs(f_xla(x, w, g))))
    print(json.dumps(dict(layer=layer, direction=direction, xla_ms=round(1e3 * t_xla, 1),
                          ops_ms=round(1e3 * t_ours, 1), speedup=round(t_xla / t_ours, 2),
                          max_relative_difference=err, used=used[direction], batch=a.batch,
                          backend=jax.default_backend())), flush=True)


key = jax.random.key(0)
# Generator: the stride-2 transposed convolutions (5x5 kernels).
for h, cin, cout in [(7, 128, 64), (14, 64, 1)]:
  x = jax.random.normal(key, (a.batch, h, h, cin))
  w = 0.05 * jax.random.normal(jax.random.key(1), (5, 5, cin, cout))
  compare(f"G ConvTranspose {h}x{h}x{cin} -> {2*h}x{2*h}x{cout}",
          lambda x, w: jax.lax.conv_transpose(x, w, (2, 2), "SAME", dimension_numbers=DN),
          lambda x, w: ops.conv_transpose(x, w, (2, 2), "SAME"), x, w,
          used={"forward": ops.use_subpixel_forward((2, 2), "SAME", cout),
                "weight_gradient": ops.use_subpixel_forward((2, 2), "SAME", cout)})
# Discriminator: the stride-2 convolutions (5x5 kernels), real and fake batch.
for h, cin, cout in [(28, 1, 64), (14, 64, 128)]:
  x = jax.random.normal(key, (2 * a.batch, h, h, cin))
  w = 0.05 * jax.random.normal(jax.random.key(1), (5, 5, cin, cout))
  compare(f"D Conv {h}x{h}x{cin} -> {h//2}x{h//2}x{cout}",
          lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=DN),
          lambda x, w: ops.conv(x, w, (2, 2), "SAME"), x, w,
          used={"input_gradient": ops.use_subpixel_input_gradient((h, h), (2, 2), "SAME", cin)})


# The rest of the step's large convolutions, as the models run them (XLA's Eigen convolutions, except
# D's input gradient: sub-pixel, above), with their speed in GFLOP/s (2 * multiply-adds; 'SAME' borders
# counted as full windows), next to a plain matrix product of the first layer's size.
def plain(layer, f, x, w, flop):
  g = jax.random.normal(jax.random.key(2), jax.eval_shape(f, x, w).shape)
  for direction, fd in directions(f).items():
    t = median_seconds(fd, x, w, g)
    print(json.dumps(dict(layer=layer, direction=direction, ms=round(1e3 * t, 1),
                          gflop_per_sec=round(flop / t / 1e9, 1), batch=a.batch,
                          backend=jax.default_backend())), flush=True)


x = jax.random.normal(key, (a.batch, 7, 7, 256))
w = 0.05 * jax.random.normal(jax.random.key(1), (5, 5, 256, 128))
xla_first = lambda x, w: jax.lax.conv_transpose(x, w, (1, 1), "SAME", dimension_numbers=DN)
plain("G ConvTranspose 7x7x256 -> 7x7x128 (stride 1), XLA", xla_first, x, w, 2 * a.batch * 49 * 25 * 256 * 128)
# ... and in the DFT form (what the models use here when `used`), every direction and all three
# together (forward, then both gradients: what a generator update runs).
first = lambda x, w: ops.conv_transpose(x, w, (1, 1), "SAME")
dft_used = dft.use_dft(x, w, dft.correlation_geometry((7, 7), (5, 5), ((2, 2), (2, 2))))
compare("G ConvTranspose 7x7x256 -> 7x7x128 (stride 1)", xla_first, first, x, w,
        used=dict.fromkeys(["forward", "input_gradient", "weight_gradient"], dft_used))
both = lambda f: lambda x, w, g: (lambda y, vjp: (y, vjp(g)))(*jax.vjp(f, x, w))
g = jax.random.normal(jax.random.key(2), x.shape[:3] + (128,))
t_xla, t_ours = median_seconds(both(xla_first), x, w, g), median_seconds(both(first), x, w, g)
print(json.dumps(dict(layer="G ConvTranspose 7x7x256 -> 7x7x128 (stride 1)", direction="forward_and_gradients",
                      xla_ms=round(1e3 * t_xla, 1), ops_ms=round(1e3 * t_ours, 1),
                      speedup=round(t_xla / t_ours, 2), used=dft_used, batch=a.batch)), flush=True)
m, k = jax.random.normal(key, (a.batch * 49, 25 * 256)), jax.random.normal(key, (25 * 256, 128))
t = median_seconds(lambda m, k: m @ k, m, k)
print(json.dumps(dict(layer=f"matrix product {a.batch * 49}x{25 * 256} @ {25 * 256}x128", ms=round(1e3 * t, 1),
                      gflop_per_sec=round(2 * a.batch * 49 * 25 * 256 * 128 / t / 1e9, 1))), flush=True)
x = jax.random.normal(key, (2 * a.batch, 14, 14, 64))
w = 0.05 * jax.random.normal(jax.random.key(1), (5, 5, 64, 128))
plain("D Conv 14x14x64 -> 7x7x128", lambda x, w: ops.conv(x, w, (2, 2), "SAME"), x, w,
      2 * 2 * a.batch * 49 * 25 * 64 * 128)


# conv_transpose's weight gradient, sub-pixel form (what 'SAME' layers use) against XLA's (over the
# zeros of the dilated input), for the strided layers of both presets: the seed's at --batch, the dcgan
# preset's (64x64 images, base width 64) at --batch // 2.
for b, h, cin, cout, k in [(a.batch, 7, 128, 64, 5), (a.batch // 2, 4, 512, 256, 4),
                           (a.batch // 2, 8, 256, 128, 4), (a.batch // 2, 16, 128, 64, 4)]:
  x = jax.random.normal(key, (b, h, h, cin))
  w = 0.05 * jax.random.normal(jax.random.key(1), (k, k, cin, cout))
  g = jax.random.normal(jax.random.key(2), (b, 2 * h, 2 * h, cout))
  xla = lambda x, w, g: jax.vjp(lambda w_: jax.lax.conv_transpose(x, w_, (2, 2), "SAME", dimension_numbers=DN),
                                w)[1](g)[0]
  sub = lambda x, w, g: ops.subpixel_weight_gradient(x, g, w, (2, 2), "SAME")
  t_xla, t_sub = median_seconds(xla, x, w, g), median_seconds(sub, x, w, g)
  ref = jax.jit(xla)(x, w, g)
  err = float(jnp.max(jnp.abs(jax.jit(sub)(x, w, g) - ref)) / jnp.max(jnp.abs(ref)))
  print(json.dumps(dict(layer=f"ConvTranspose {h}x{h}x{cin} -> {2*h}x{2*h}x{cout}, {k}x{k}",
                        direction="weight_gradient", batch=b, xla_ms=round(1e3 * t_xla, 1),
                        subpixel_ms=round(1e3 * t_sub, 1), speedup=round(t_xla / t_sub, 2),
                        max_relative_difference=err)), flush=True)
