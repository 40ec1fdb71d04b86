"""The training loop's one seam to its images: what it passes to the step, call by call.

    data = open_training_data(config, mesh, per_device_batch)
    data.in_memory, data.num_examples, data.channels, data.image_shape, data.exact_order
    state, metrics = steps(state, positions, data.for_call(step, k))    # k steps from state step `step`

Three paths, one order:
  * in memory (`--in_memory=true`, or auto when the decoded split fits --max_in_memory_mb): the whole
    split as uint8 on every device, placed once; the step gathers each batch in an order that is a pure
    function of (seed, step, position) (randomness.batch_indices);
  * random access (otherwise, for datasets stored as array_record): host threads read this process's
    examples by index in exactly that order (host_reader.py), so both paths train on the same images
    in the same order, and resume is exact;
  * tf.data streaming (datasets stored as tfrecord only): seeded, but not a function of the step.
The step itself takes its real batches; `feeding` puts the in-memory path's gather in front of it, told
by `step_num_examples` (the dataset size in memory, None otherwise).
"""

import dataclasses
import time
from typing import Callable, Optional

from absl import logging
import numpy as np

from dcgan_jax import parallel
from dcgan_jax import randomness
from dcgan_jax.config import Config, ConfigError


@dataclasses.dataclass
class TrainingData:
  in_memory: bool
  num_examples: Optional[int]  # None: unknown (a streamed dataset without size metadata)
  channels: int
  image_shape: tuple  # (H, W, C) at model resolution
  for_call: Callable[[int, int], object]  # (step, k) -> the step's `data` for k steps from state step
  exact_order: bool = True  # the data order is a function of (seed, step): exact resume
  path: str = "in_memory"  # "in_memory", "by_index" or "tf_data" (recorded in config.json)
  close: Callable[[], None] = lambda: None

  @property
  def replicated(self) -> bool:
    """How the step's `data` lies on the devices (parallel.pmap_step's replicated_data): the whole
    dataset, the same on every device and for every step of a call (in memory), or one block of
    batches per device and per step (read by index or streamed)."""
    return self.in_memory

  @property
  def step_num_examples(self) -> Optional[int]:
    """What step.make_train_step takes: the dataset size in memory, None when streamed."""
    return self.num_examples if self.in_memory else None


def feeding(train_step: Callable, config: Config, num_examples: Optional[int], policy=None) -> Callable:
  """The step as the data path calls it, step(state, positions, data), from train_step(state, positions,
  batches) whose batches are uint8 (d_steps, per_device_batch, H, W, C). Streamed (num_examples None):
  `data` is those batches. In memory: `data` is the whole dataset, uint8 (N, H, W, C), the same on every
  device, and each D update's batch is gathered inside the step in the order randomness.batch_indices
  draws (a function of the seed, the step and the positions: the random-access reader's order too)."""
  if num_examples is None:
    return train_step

  def gathering(state, positions, dataset):
    data_key = randomness.purpose_key(state.key, randomness.DATA)
    batches = [dataset[randomness.batch_indices(data_key, state.step, k, config.d_steps, positions,
                                                config.batch_size, num_examples, policy)]
               for k in range(config.d_steps)]
    return train_step(state, positions, batches)

  return gathering


def open_training_data(config: Config, mesh, per_device: int) -> TrainingData:
  """Finds the dataset (downloading it if tfds can), decides in memory or streaming, and loads or opens
  it. Raises input_pipeline.DataUnavailableError or ConfigError with one line saying what to do."""
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top  (tfds, lazily)
  builder = input_pipeline.get_builder(config)
  spec = input_pipeline.dataset_spec(config, builder)
  channels = input_pipeline.dataset_channels(spec, config.channels)
  shape = config.image_shape(channels)
  in_memory = input_pipeline.choose_in_memory(config, spec, shape)
  source = None if in_memory else input_pipeline.data_source(builder, config.split)
  if in_memory:
    t0 = time.time()
    images = input_pipeline.load_in_memory(config, shape, builder)
    on_device = parallel.replicate(images, mesh)
    logging.info("Loaded %s:%s into device memory: %s uint8 in %.1fs.", config.dataset, config.split,
                 on_device.shape, time.time() - t0)
    data = TrainingData(True, len(images), channels, shape, lambda step, k: on_device)
  elif source is not None:
    from dcgan_jax.datasets import host_reader  # pylint: disable=g-import-not-at-top
    def read(indices):
      with input_pipeline.damaged_data(builder, config.split):  # on the reader's threads
        return input_pipeline.read_examples(source, indices, config.dataset, shape)
    reader = host_reader.HostReader(read, len(source), config, parallel.local_positions(per_device),
                                    lambda batch: parallel.put_batch(batch, mesh))
    logging.info("Reading %s:%s by index on the host (%d examples), in the in-memory path's order.",
                 config.dataset, config.split, len(source))
    data = TrainingData(False, len(source), channels, shape, reader.for_call, close=reader.close,
                        path="by_index")
  else:
    n_local = len(mesh.local_devices)
    stream = input_pipeline.stream_batches(config, shape, n_local, per_device * config.d_steps,
                                           *_process(), builder)
    # (devices, d_steps * b, H, W, C) -> (devices, d_steps, b, H, W, C)
    def next_batch():
      with input_pipeline.damaged_data(builder, config.split):
        return next(stream).reshape((n_local, config.d_steps, per_device) + shape)
    # One streamed batch per step; a call of k > 1 steps takes them stacked after the device axis.
    for_call = lambda step, k: (next_batch() if k == 1 else
                                np.stack([next_batch() for _ in range(k)], axis=1))
    logging.warning("%s:%s is stored as tfrecord only: streaming it with tf.data, whose order is seeded "
                    "but not a function of the step (a resumed run sees other batches). For the exact "
                    "order: python -m dcgan_jax.prepare_data --convert=%s", config.dataset, config.split,
                    builder.data_dir)
    data = TrainingData(False, spec.num_examples, channels, shape, for_call, exact_order=False,
                        path="tf_data")
  if data.num_examples is not None and config.batch_size > data.num_examples:
    raise ConfigError(f"--batch_size={config.batch_size}: larger than the {data.num_examples} examples of "
                      f"{config.dataset}:{config.split}; use a smaller batch.")
  return data


def _process():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()
