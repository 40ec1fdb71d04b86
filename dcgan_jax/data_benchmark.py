"""Data-path throughput on a real dataset; prints one JSON line.

    python -m dcgan_jax.data_benchmark --dataset=fashion_mnist --data_dir=data/tfds --batch_size=128

Measures, for the dataset and model of the flags:
  * `reader_images_per_sec`: the random-access reader alone (host_reader.py: decoding, preprocessing,
    its worker threads), reading --steps steps in order;
  * `train_images_per_sec` per path: the training step fed in memory, and fed by the reader
    (`--in_memory=false`), each timed over --steps steps after --warmup, and their ratio;
  * `peak_rss_mb`: the process's peak resident memory. With --nocompare_in_memory only the random-access
    path runs, so it is the memory that path needs (host memory bounded by the prefetch depth, not the
    dataset's size: compare two datasets).
"""

import dataclasses
import json
import resource
import time

from absl import flags
import jax

from dcgan_jax import cli
from dcgan_jax import config as config_lib
from dcgan_jax.datasets import data as data_lib
from dcgan_jax.datasets import host_reader
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config, ConfigError
from dcgan_jax.cli import exit_with_error

CONFIG_FLAGS = ("dataset", "data_dir", "split", "preset", "image_size", "batch_size", "d_steps", "seed")
config_lib.define_flags(CONFIG_FLAGS)
flags.DEFINE_integer("steps", 30, "Timed steps per measurement.",
                     lower_bound=1, upper_bound=10**6)
flags.DEFINE_integer("warmup", 3, "Untimed steps before each training measurement (the first compiles).",
                     lower_bound=0, upper_bound=10**4)
flags.DEFINE_bool("compare_in_memory", True, "Also time training from device memory (loads the whole split).")
FLAGS = flags.FLAGS


def time_reader(config: Config, steps: int):
  """(Images per second of the random-access reader alone over `steps` steps (all local devices), the
  dataset's size)."""
  mesh = parallel.global_mesh()
  data = data_lib.open_training_data(dataclasses.replace(config, in_memory="false"), mesh,
                                     config.batch_size // mesh.devices.size)
  if data.path != "by_index":
    raise ConfigError(f"--dataset={config.dataset}: stored as tfrecord only, so there is no random-access "
                      "reader to time; prepare it as array_record")
  try:
    data.for_call(0, 1)  # the first read starts the threads and compiles the index computation
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
      data.for_call(step, 1)
    return config.batch_size * config.d_steps * steps / (time.perf_counter() - t0), data.num_examples
  finally:
    data.close()


def time_training(config: Config, steps: int, warmup: int) -> float:
  """Images per second of training steps fed by the config's data path."""
  mesh = parallel.global_mesh()
  per_device = config.batch_size // mesh.devices.size
  data = data_lib.open_training_data(config, mesh, per_device)
  try:
    train_step = step_lib.make_train_step(config, data.channels, data.step_num_examples,
                                          platforms.of_mesh(mesh))
    p_step = parallel.pmap_step(train_step, data.replicated)
    positions = parallel.batch_positions(mesh, per_device)
    state = parallel.replicate(step_lib.create_train_state(config, data.channels), mesh)
    for step in range(warmup):
      state, metrics = p_step(state, positions, data.for_call(step, 1))
    jax.block_until_ready((state, metrics))
    t0 = time.perf_counter()
    for step in range(warmup, warmup + steps):
      state, metrics = p_step(state, positions, data.for_call(step, 1))
    jax.block_until_ready((state, metrics))
    return config.batch_size * steps / (time.perf_counter() - t0)
  finally:
    data.close()


def main(argv):
  del argv
  try:
    config = config_lib.from_flags(CONFIG_FLAGS).resolved()
    parallel.check_devices(config, jax.device_count())
    reader, num_examples = time_reader(config, FLAGS.steps)
    by_index = time_training(dataclasses.replace(config, in_memory="false"), FLAGS.steps, FLAGS.warmup)
    in_memory = (time_training(dataclasses.replace(config, in_memory="true"), FLAGS.steps, FLAGS.warmup)
                 if FLAGS.compare_in_memory else None)
  except ConfigError as e:
    exit_with_error(str(e))
  train = dict(by_index=round(by_index, 1))
  if in_memory:
    train["in_memory"] = round(in_memory, 1)
  print(json.dumps(dict(
      dataset=config.dataset, num_examples=num_examples, preset=config.preset,
      image_size=config.image_size, batch_size=config.batch_size, steps=FLAGS.steps,
      devices=jax.device_count(), backend=platforms.backend_name(), reader_workers=host_reader.WORKERS,
      reader_images_per_sec=round(reader, 1), train_images_per_sec=train,
      by_index_over_in_memory=round(by_index / in_memory, 3) if in_memory else None,
      peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))), flush=True)


if __name__ == "__main__":
  cli.run(main)
