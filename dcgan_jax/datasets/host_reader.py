"""The random-access data path: this process's examples of each step, read on host threads by index,
in exactly the order the in-memory path gathers on the devices.

    reader = HostReader(read, num_examples, config, positions, put)  # read(indices) -> uint8 (n, H, W, C)
    data = reader.for_call(step, k)  # uint8 (local devices, [k,] d_steps, per_device_batch, H, W, C)

For step t and D update k, the examples at this process's global positions are
`randomness.batch_indices(data_key, t, k, d_steps, positions, batch_size, N)`, evaluated here on the
host CPU (integer arithmetic: the same indices as inside the step on any device). So for one seed the
in-memory and the random-access path train on the same images in the same order, resuming at step t
needs only t, and every process reads only its own positions.

The next `prefetch` calls are read ahead by `workers` threads, each handed to `put` (parallel.put_batch:
the copy to the devices) on its thread, so the copy overlaps the running step; host memory holds at
most `prefetch` calls' batches, whatever the dataset's size.
"""

import collections
import concurrent.futures
from typing import Callable

import jax
import numpy as np

from dcgan_jax import platforms
from dcgan_jax import randomness
from dcgan_jax.config import Config

WORKERS = 2  # reader threads: decoding is light (images are stored at training resolution)
PREFETCH = 4  # steps read ahead


class HostReader:

  def __init__(self, read: Callable[[np.ndarray], np.ndarray], num_examples: int, config: Config,
               positions: np.ndarray, put: Callable = lambda x: x, workers: int = WORKERS,
               prefetch: int = PREFETCH):
    """read(indices int (n,)) -> uint8 images (n, H, W, C); positions: int32 (local devices,
    per_device_batch), this process's global batch positions; put: host batch -> what the step takes."""
    self._read, self._positions, self._put = read, np.asarray(positions, np.int32), put
    self._d_steps, self._prefetch = config.d_steps, prefetch
    cpu = jax.local_devices(backend="cpu")[0]  # this process's own: never another process's device
    key = jax.device_put(jax.random.key(config.seed), cpu)
    # Compiled for this host's CPU, whatever the accelerator.
    indices = jax.jit(lambda key, step, k, positions: randomness.batch_indices(
        randomness.purpose_key(key, randomness.DATA), step, k, config.d_steps, positions, config.batch_size,
        num_examples, platforms.HOST), static_argnums=2)
    flat = jax.device_put(self._positions.reshape(-1), cpu)
    self._indices = lambda step, k: np.asarray(indices(key, jax.device_put(np.int32(step), cpu), k, flat))
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                       thread_name_prefix="dcgan_jax_reader")
    self._pending = collections.OrderedDict()  # (step, k) -> Future of that call's data

  def indices(self, step: int) -> np.ndarray:
    """int32 (d_steps, local devices * per_device_batch): the dataset indices of step `step`."""
    return np.stack([self._indices(step, k) for k in range(self._d_steps)])

  def _load(self, step: int) -> np.ndarray:
    idx = self.indices(step)
    images = self._read(idx.reshape(-1))  # one read for all D updates of the step
    n_local, b = self._positions.shape
    images = images.reshape((self._d_steps, n_local, b) + images.shape[1:])
    return np.ascontiguousarray(np.swapaxes(images, 0, 1))  # (local devices, d_steps, b, H, W, C)

  def batch(self, step: int) -> np.ndarray:
    """uint8 (local devices, d_steps, per_device_batch, H, W, C): the batch of step `step` (0-based: the
    step that takes the state from step to step + 1), read now, on the host."""
    return self._load(step)

  def _load_call(self, step: int, k: int):
    if k == 1:
      return self._put(self._load(step))
    return self._put(np.stack([self._load(step + i) for i in range(k)], axis=1))

  def for_call(self, step: int, k: int):
    """The step's `data` for a call of k steps from state step `step`: one batch (k = 1), or k batches
    stacked after the device axis; reads the next `prefetch` calls of k steps ahead."""
    if (step, k) not in self._pending:  # a jump (resume, first call, a shorter last call): start over
      for future in self._pending.values():
        future.cancel()
      self._pending.clear()
    for ahead in range(step, step + (self._prefetch + 1) * k, k):
      if (ahead, k) not in self._pending:
        self._pending[(ahead, k)] = self._pool.submit(self._load_call, ahead, k)
    return self._pending.pop((step, k)).result()

  def close(self) -> None:
    for future in self._pending.values():
      future.cancel()
    self._pool.shutdown(wait=True)
