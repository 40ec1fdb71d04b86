"""Training-step throughput on synthetic data; prints one JSON line. Needs no TensorFlow or tfds.

    python -m dcgan_jax.benchmark --preset=mnist --batch_size=128 --steps=30

Times the real pmapped training step (the in-memory path: a uint8 dataset on the devices, batches
gathered inside the step in the (seed, step) order) after warm-up, with block_until_ready around the
timed calls. `compile_sec` is the first call (tracing + XLA compilation + one execution).
"""

import json
import os
import resource
import time
from typing import Optional

from absl import app
from absl import flags
import jax
import numpy as np

from dcgan_jax import ops
from dcgan_jax import train
from dcgan_jax.config import Config, ConfigError, exit_with_error

flags.DEFINE_enum("preset", "mnist", ["mnist", "dcgan"], "Model preset.")
flags.DEFINE_integer("image_size", None, "Image size (default: the preset's).")
flags.DEFINE_integer("channels", 1, "Image channels.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("steps", 30, "Timed training steps.")
flags.DEFINE_integer("warmup", 2, "Untimed calls after the compiling one.")
flags.DEFINE_integer("num_examples", 60000, "Synthetic dataset size (the data order permutes it).")
flags.DEFINE_integer("base_width", 64, "dcgan preset width.")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
flags.DEFINE_integer("steps_per_call", 1, "Training steps per call (train.make_steps_call).")
flags.DEFINE_enum("multi_step", "auto", ["auto", "scan", "dispatch"],
                  "With --steps_per_call > 1: one lax.scan per call, or one dispatch of the single "
                  "step per step (auto: dispatch on CPU, scan elsewhere).")
flags.DEFINE_integer("invariant_groups", 0, "Groups of --invariant_groups (0: off): the cost of results "
                     "that are bitwise the same on any device count.")
flags.DEFINE_enum("xla_cpu_convolutions", "eigen", ["eigen", "ynnpack"],
                  "XLA:CPU's convolution library: eigen (what dcgan_jax's programs choose, "
                  "ops.configure_xla_cpu) or ynnpack (jaxlib 0.10's default).")
FLAGS = flags.FLAGS


def peak_memory_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device", int(stats["peak_bytes_in_use"])
  return "host_max_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU backend


def run(config: Config, channels: int, steps: int, warmup: int, num_examples: int,
        scan: Optional[bool] = None) -> dict:
  config = config.resolved()
  mesh = train.global_mesh()
  n_dev = mesh.devices.size
  train.check_devices(config, n_dev)
  rng = np.random.default_rng(0)
  data = train.replicate(rng.integers(0, 256, (num_examples, config.image_size, config.image_size,
                                               channels), np.uint8), mesh)
  slots = train.device_slots(mesh, config.batch_size // n_dev)
  state = train.replicate(train.create_train_state(config, channels), mesh)
  step = train.make_train_step(config, channels, num_examples)
  k = config.steps_per_call
  if scan is None:
    scan = train.scan_steps_by_default()
  step = (train.pmap_train_step(step, in_memory=True) if k == 1 else
          train.make_steps_call(step, k, in_memory=True, scan=scan))
  calls = -(-steps // k)  # the timed steps, rounded up to whole calls
  steps = calls * k
  t0 = time.perf_counter()
  state, metrics = step(state, slots, data)
  jax.block_until_ready((state, metrics))
  compile_sec = time.perf_counter() - t0
  for _ in range(warmup):
    state, metrics = step(state, slots, data)
  jax.block_until_ready((state, metrics))
  t0 = time.perf_counter()
  for _ in range(calls):
    state, metrics = step(state, slots, data)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t0
  final = jax.tree.map(lambda x: np.asarray(x).reshape(-1)[-1], jax.device_get(metrics))  # last step
  kind, peak = peak_memory_bytes()
  return dict(impl="dcgan_jax", preset=config.preset, image_size=config.image_size,
              batch_size=config.batch_size, steps=steps, steps_per_call=k,
              multi_step=None if k == 1 else ("scan" if scan else "dispatch"),
              invariant_groups=config.invariant_groups,
              compute_dtype=config.compute_dtype, xla_flags=os.environ.get("XLA_FLAGS", ""),
              sec_per_step=elapsed / steps, images_per_sec=config.batch_size * steps / elapsed,
              compile_sec=compile_sec, backend=jax.default_backend(),
              device_kind=jax.local_devices()[0].device_kind, devices=n_dev, jax=jax.__version__,
              peak_memory_kind=kind, peak_memory_bytes=peak,
              final_d_loss=float(final["d_loss"]), final_g_loss=float(final["g_loss"]),
              finite=bool(final["finite"] == 1.0))


def main(argv):
  del argv
  ops.configure_xla_cpu(FLAGS.xla_cpu_convolutions)  # before JAX starts a backend
  config = Config(preset=FLAGS.preset, image_size=FLAGS.image_size, batch_size=FLAGS.batch_size,
                  base_width=FLAGS.base_width, dataset="synthetic", compute_dtype=FLAGS.compute_dtype,
                  steps_per_call=FLAGS.steps_per_call, invariant_groups=FLAGS.invariant_groups)
  try:
    result = run(config, FLAGS.channels, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples,
                 scan=None if FLAGS.multi_step == "auto" else FLAGS.multi_step == "scan")
  except ConfigError as e:
    exit_with_error(str(e))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
