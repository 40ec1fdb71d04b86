"""Throughput of the FID Inception network (inception_metrics.Features: every local device): images/s and
seconds per 1,000 images, for dataset images and for images generated on the devices; one JSON line.

    python experiments/inception_throughput.py                      # CPU: 200 images of 32x32x3
    python experiments/inception_throughput.py --images=5000 --per_device=200   # an accelerator

The weights are random (the speed does not depend on them; no weights file needed). The first call of
each program is timed apart (compile_sec); the timed calls follow it.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dcgan_jax.ops import convolutions  # noqa: E402

convolutions.configure_xla_cpu()  # XLA:CPU's convolution library, as every dcgan_jax tool sets it

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcgan_jax.evaluation import inception  # noqa: E402

from dcgan_jax.evaluation import inception_metrics  # noqa: E402


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--images", type=int, default=200)
  p.add_argument("--size", type=int, default=32, help="input images' height and width (RGB)")
  p.add_argument("--per_device", type=int, default=inception_metrics.PER_DEVICE)
  args = p.parse_args()
  variables = jax.jit(lambda: inception.FIDInceptionV3().init(
      jax.random.key(0), jnp.zeros((1, inception.SIZE, inception.SIZE, 3))))()
  features = inception_metrics.Features(inception_metrics.Weights("random", "0" * 64, variables),
                                        args.per_device)
  images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 3), np.uint8)
  chunk = args.per_device * jax.local_device_count()
  t0 = time.perf_counter()
  features.embed(images[:min(chunk, args.images)])
  compile_sec = time.perf_counter() - t0
  t0 = time.perf_counter()
  features.embed(images)
  seconds = time.perf_counter() - t0

  @jax.jit
  def sample(g, z):  # a stand-in generator: the cost is the network's
    return jnp.tanh(g * z.reshape(-1, args.size, args.size, 3))

  z = np.random.default_rng(1).standard_normal((args.images, args.size * args.size * 3)).astype(np.float32)
  features.embed_generated(sample, np.float32(1), z[:min(chunk, args.images)])
  t0 = time.perf_counter()
  features.embed_generated(sample, np.float32(1), z)
  generated_seconds = time.perf_counter() - t0
  device = jax.local_devices()[0]
  print(json.dumps(dict(
      images=args.images, size=args.size, per_device=args.per_device, devices=jax.local_device_count(),
      platform=device.platform, device_kind=device.device_kind, compile_sec=round(compile_sec, 1),
      images_per_sec=round(args.images / seconds, 1),
      sec_per_1000_images=round(1000 * seconds / args.images, 1),
      generated_images_per_sec=round(args.images / generated_seconds, 1))))


if __name__ == "__main__":
  main()
