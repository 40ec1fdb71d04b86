"""Where the seed model's CPU time goes in G, with XLA's and ops.py's transposed-convolution weight
gradient. Prints one JSON line per measurement.

    python experiments/conv_transpose_bench.py [--batch 128]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp

from dcgan_jax import models, ops
from dcgan_jax.config import Config

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--repeats", type=int, default=5)
a = p.parse_args()


def seconds(f, *args):
  jax.block_until_ready(f(*args))  # compile
  t0 = time.perf_counter()
  for _ in range(a.repeats):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / a.repeats


def emit(**kw):
  print(json.dumps(dict(kw, batch=a.batch, backend=jax.default_backend())), flush=True)


xla = lambda s: lambda x, w: jax.lax.conv_transpose(x, w, s, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
ours = lambda s: lambda x, w: ops.conv_transpose(x, w, s, "SAME")
# The seed generator's strided layers: 7x7x128 -> 14x14x64 and 14x14x64 -> 28x28x1 (5x5 kernels).
for h, cin, cout in [(7, 128, 64), (14, 64, 1)]:
  x = jax.random.normal(jax.random.key(0), (a.batch, h, h, cin))
  w = 0.05 * jax.random.normal(jax.random.key(1), (5, 5, cin, cout))
  for name, f in (("xla", xla((2, 2))), ("ops", ours((2, 2)))):
    dw = jax.jit(jax.grad(lambda w, x: jnp.sum(f(x, w) ** 2)))
    emit(what="weight_gradient", layer=f"{h}x{h}x{cin}->{2*h}x{2*h}x{cout}", impl=name,
         seconds=seconds(dw, w, x), used_by_models=ops.use_tap_gradient((2, 2), cout) == (name == "ops"))

config = Config().resolved()
generator, _ = models.build_models(config, 1)
variables = generator.init(jax.random.key(0), jnp.zeros((1, 100)), train=False)
z = jax.random.normal(jax.random.key(2), (a.batch, 100))


def g_loss(params):
  out, _ = generator.apply({"params": params, "batch_stats": variables["batch_stats"]}, z, train=True,
                           mutable=["batch_stats"])
  return jnp.sum(out ** 2)


emit(what="generator_forward_backward", impl="models (ops where it pays)",
     seconds=seconds(jax.jit(jax.grad(g_loss)), variables["params"]))
use = ops.use_tap_gradient
ops.use_tap_gradient = lambda *args: False  # the plain XLA gradient everywhere
emit(what="generator_forward_backward", impl="xla", seconds=seconds(jax.jit(jax.grad(g_loss)), variables["params"]))
ops.use_tap_gradient = use
