"""Everything about running on many devices and processes, in one place: the mesh, jax.distributed,
the pmap of the step, K steps per call, global arrays, and values agreed by all processes.

The step itself (step.py) only names the axis (AXIS) its means run over; how it is mapped over devices
lives here, so moving from pmap to jit + shard_map is a change of this file.

Layout: one axis, AXIS, over all devices of all processes. The state is replicated (one jax.Array per
leaf, pmap in_axes/out_axes None: nothing is replicated or unreplicated by hand); the global batch is
cut into consecutive blocks, process p's local devices holding positions [p * L * b, (p + 1) * L * b).
"""

import os
from typing import Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dcgan_jax.config import Config, ConfigError

AXIS = "batch"  # the pmap axis: BatchNorm statistics and gradient means run over it


def initialize(coordinator_address=None, num_processes=None, process_id=None,
               heartbeat_timeout: int = 100) -> None:
  """jax.distributed.initialize from explicit settings (all three, or none), or from the cluster's
  environment when JAX can read it (TPU pods, SLURM, Open MPI). ConfigError for incomplete settings.

  heartbeat_timeout: seconds without a heartbeat after which the coordinator declares a process lost
  and the others end (non-zero); it bounds how long survivors wait for a dead process."""
  given = [coordinator_address, num_processes, process_id]
  # The run agrees on stops itself (StopAgreement, after stopping.py's SIGTERM/SIGINT handler);
  # JAX's preemption service would replace that handler with its own C++ one for SIGTERM.
  jax.config.update("jax_enable_preemption_service", False)
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ConfigError("--coordinator_address, --num_processes and --process_id go together; pass all three")
    if not 0 <= process_id < num_processes:
      raise ConfigError(f"--process_id={process_id}: must be in 0..{num_processes - 1}")
    # Cross-process collectives on CPU need gloo; the setting does nothing on GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout)
  elif _cluster_detected():
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout)
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local devices of %d.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def _cluster_detected() -> bool:
  """A multi-process launch that jax.distributed.initialize() can configure by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def global_mesh() -> Mesh:
  """All devices of all processes along AXIS (= the local devices in a single-process run)."""
  return Mesh(np.array(jax.devices()), (AXIS,))


def check_devices(config: Config, num_devices: int) -> None:
  """ConfigError unless the global batch (and --invariant_groups) split evenly over all devices."""
  if config.batch_size % num_devices:
    raise ConfigError(f"--batch_size={config.batch_size}: must be divisible by the number of devices "
                      f"({num_devices}); pick a multiple of it.")
  if config.invariant_groups % (2 * num_devices):
    # At least two groups per device: XLA:CPU fuses the per-group results of one group differently from
    # those of several (no concatenation), and its FMA contraction then rounds differently.
    raise ConfigError(f"--invariant_groups={config.invariant_groups}: must be a multiple of twice the "
                      f"number of devices ({2 * num_devices}); pick one that twice every device count "
                      "you compare divides, e.g. 16 for up to 8 devices.")


def over_members(train_step: Callable) -> Callable:
  """The step over a leading member axis of the state (--members_form=vmap); the members share the
  positions and the in-memory dataset, and their metrics gain a trailing member axis after pmap. Each
  member's BatchNorm statistics and gradient means stay its own: those collectives name AXIS (the
  devices), and vmap's member axis is never reduced over."""
  return jax.vmap(train_step, in_axes=(0, None, None))


@jax.jit
def stack_members(states: list):
  """Member states -> one state with a leading member axis (the same devices and layout)."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


@jax.jit
def member_of(stacked, index):
  """Member `index`'s state out of a stacked one: a complete single-run state (what it checkpoints)."""
  return jax.tree.map(lambda leaf: leaf[index], stacked)


def replicate(tree, mesh: Mesh):
  """Host or device values -> one jax.Array per leaf, replicated on every device of `mesh`. In a
  multi-process run every process must pass the same values (they do: same seed, same data)."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):  # device_put cannot target other processes' devices
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))

  return jax.tree.map(one, tree)


def global_replicated(tree):
  """The step's outputs (replicated over this process's devices) as arrays replicated over all devices
  of all processes: one logical array, which orbax writes once."""
  if jax.process_count() == 1:
    return tree
  sharding = NamedSharding(global_mesh(), P())
  return jax.tree.map(lambda x: jax.make_array_from_single_device_arrays(
      x.shape, sharding, [s.data for s in x.addressable_shards]), tree)


def local_positions(per_device: int) -> np.ndarray:
  """int32 (local devices, per_device): the global batch positions of this process's examples."""
  n_local = jax.local_device_count()
  first = jax.process_index() * n_local * per_device
  return np.arange(first, first + n_local * per_device, dtype=np.int32).reshape(n_local, per_device)


def batch_positions(mesh: Mesh, per_device: int) -> jax.Array:
  """int32 (global devices, per_device): the global batch positions of each device's examples, placed
  once (sharded over AXIS) and passed to every step."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), local_positions(per_device))


def put_batch(batch: np.ndarray, mesh: Mesh) -> jax.Array:
  """This process's batch, uint8 (local devices, ...), -> one global array sharded over AXIS like the
  positions: the copy to the devices, started at once (the data path calls it on a reader thread)."""
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(AXIS)), batch)


def pmap_step(train_step: Callable, replicated_data: bool) -> Callable:
  """pmaps a step: state and metrics replicated (in/out_axes None), positions mapped, and the step's
  `data` replicated (replicated_data: the same array on every device, e.g. the whole dataset) or
  mapped (one block of batches per device). datasets/data.py decides which (TrainingData.replicated).
  The input state's buffers are donated."""
  return jax.pmap(train_step, axis_name=AXIS, in_axes=(None, 0, None if replicated_data else 0),
                  out_axes=(None, None), donate_argnums=(0,))


def step_program(train_step: Callable, replicated_data: bool, mesh: Mesh) -> Callable:
  """The program pmap_step(train_step, replicated_data) compiles, written as pmap is built since JAX 0.10:
  jax.jit over jax.shard_map on `mesh`, each mapped argument's leading axis squeezed. jax.export and
  lowering for another platform take a jitted function (a pmapped one has no .trace): programs.py
  exports this one; tests/test_programs.py checks that it lowers to the pmapped step's operations."""
  mapped = (False, True, not replicated_data)  # (state, positions, data), as pmap_step's in_axes

  def per_device(*args):
    return train_step(*(jax.tree.map(lambda x: jax.lax.squeeze(x, [0]), a) if m else a
                        for a, m in zip(args, mapped)))

  specs = tuple(P(AXIS) if m else P() for m in mapped)
  return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False),
                 in_shardings=tuple(NamedSharding(mesh, s) for s in specs),
                 out_shardings=NamedSharding(mesh, P()), donate_argnums=(0,))


def scanned_steps(train_step: Callable, num_steps: int, replicated_data: bool) -> Callable:
  """`num_steps` steps as one lax.scan (the accelerators' --steps_per_call), to be pmapped like the step.
  Mapped data has a step axis first (in the per-device view); replicated data serves every step."""
  def scanned(state, positions, data):
    if replicated_data:
      return jax.lax.scan(lambda s, _: train_step(s, positions, data), state, None, length=num_steps)
    return jax.lax.scan(lambda s, batch: train_step(s, positions, batch), state, data)

  return scanned


def make_multi_step(train_step: Callable, num_steps: int, replicated_data: bool, scan: bool,
                    p_step: Optional[Callable] = None) -> Callable:
  """`num_steps` training steps per call, one host round trip: what --steps_per_call runs.

  Returns call(state, positions, data) -> (state, metrics with a leading (num_steps,) axis, on device).
  `data` as for the step when replicated, or with a step axis after the device axis when mapped
  ((devices, num_steps, d_steps, per_device_batch, H, W, C)).

  scan (platforms.Policy.scan_steps: accelerators): the steps are one pmapped `lax.scan`, so a fast
  accelerator is not kept waiting by the host between steps. The loop body is compiled apart from the
  single step: the same math, other rounding.

  Otherwise (XLA:CPU) the call dispatches the single-step program `p_step` (pmap_step(train_step); pass
  the one already in use to share its compilation) num_steps times, asynchronously, and stacks the
  metrics on device, so its results are bitwise those of num_steps single steps. Why not one program on
  XLA:CPU: inside a loop body its convolutions take a far slower path (jax-ml/jax#12868; 9-12x per
  step), and a program with the steps written out lets XLA fuse across steps (the BatchNorm running
  averages of consecutive steps become one fusion), which rounds differently; a dispatch costs
  microseconds against a CPU step's tens of milliseconds.
  """
  if scan:
    return pmap_step(scanned_steps(train_step, num_steps, replicated_data), replicated_data)
  p_step = p_step or pmap_step(train_step, replicated_data)
  stack = jax.jit(lambda history: jax.tree.map(lambda *x: jnp.stack(x), *history))

  def call(state, positions, data):
    history = []
    for i in range(num_steps):
      state, metrics = p_step(state, positions, data if replicated_data else data[:, i])
      history.append(metrics)
    return state, stack(history)

  return call


class StopAgreement:
  """A stop that one process asks for (a signal reaches processes of a pod at different moments),
  taken by all of them after the same call.

      agree = StopAgreement(mesh)
      ...after each call: if agree(local_signal_number): checkpoint together, then stop

  Each call every process contributes its local request (0, or a signal number) to a max over all
  devices, a tiny pmapped program dispatched behind the call's steps. Its result is read one call
  later, when it has long been computed, so the host never waits for it: every process reads the same
  value after the same call. A request therefore stops the run one call after it arrives."""

  def __init__(self, mesh: Mesh):
    self._mesh = mesh
    self._max = jax.pmap(lambda request: jax.lax.pmax(request, AXIS), axis_name=AXIS)
    self._pending = None

  def __call__(self, local_request: int) -> int:
    """This process's request now -> the request agreed after the previous call (0: none)."""
    agreed = 0
    if self._pending is not None:
      agreed = int(np.asarray(self._pending.addressable_shards[0].data).reshape(-1)[0])
    requests = np.full((jax.local_device_count(),), local_request, np.int32)
    self._pending = self._max(put_batch(requests, self._mesh))
    return agreed

  def finish(self) -> None:
    """Waits for the last agreement: no process may leave with its share of a collective not run,
    while another still waits in it."""
    if self._pending is not None:
      jax.block_until_ready(self._pending)


WAIT_MINUTES = 60  # how long process_0_first lets the others wait (an evaluator trains in minutes)
_barriers = iter(range(1 << 30))


def process_0_first(make: Callable, what: str):
  """make() on process 0 first, then on the others, and every process returns its own result once all
  are done: for work whose first run fills a shared cache that the others then read (the evaluator),
  instead of every process doing it at once and racing to write it. The waits are the coordination
  service's barriers, not device collectives, which give up after seconds (gloo: 30 s)."""
  if jax.process_count() == 1:
    return make()
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client, n = distributed.global_state.client, next(_barriers)
  timeout_ms = WAIT_MINUTES * 60 * 1000
  result = make() if jax.process_index() == 0 else None
  if jax.process_index() != 0:
    logging.info("Waiting for process 0: %s.", what)
  client.wait_at_barrier(f"dcgan_jax_{n}_process_0_done", timeout_in_ms=timeout_ms)
  if jax.process_index() != 0:
    result = make()
  client.wait_at_barrier(f"dcgan_jax_{n}_all_done", timeout_in_ms=timeout_ms)
  return result


def leave_together(timeout_s: int = 60) -> None:
  """Returns once every process of the run has called it (the coordination service's barrier; at once
  for one process), or after timeout_s: for an error every process raises at the same step (cli.end_run),
  so that no process exits, and with process 0 the coordination service, before the others have said
  their line. Late or lost processes are not waited for beyond timeout_s."""
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.global_state.client.wait_at_barrier("dcgan_jax_leave_together",
                                                    timeout_in_ms=timeout_s * 1000)
  except jax.errors.JaxRuntimeError:  # a process that never came: leave anyway
    pass


def over_local_devices(program: Callable, per_device: int) -> Callable:
  """call(shared, rows) -> numpy outputs: `program(shared, chunk)` (a function of rows that treats each
  row on its own, e.g. an inference network) on chunks of `per_device` rows per local device, each chunk
  split over this process's devices (a mesh of the local devices; `shared` replicated on them); fewer
  rows than that make one smaller chunk. The last chunk is padded with copies of its first row, which
  are dropped: one compiled shape per number of rows.
  `call.place(tree)` puts `shared` on the devices once, for trees used in many calls."""
  mesh = Mesh(np.array(jax.local_devices()), ("local",))
  rows_sharding, replicated = NamedSharding(mesh, P("local")), NamedSharding(mesh, P())
  jitted = jax.jit(program, out_shardings=rows_sharding)
  devices = mesh.devices.size

  def call(shared, rows):
    chunk = min(per_device, -(-len(rows) // devices)) * devices  # a few rows: no padding to per_device
    shared = jax.device_put(shared, replicated)
    outs = []
    for start in range(0, len(rows), chunk):
      part = rows[start:start + chunk]
      n = len(part)
      if n < chunk:
        xp = np if isinstance(part, np.ndarray) else jnp
        part = xp.concatenate([part, xp.repeat(part[:1], chunk - n, axis=0)])
      out = jitted(shared, jax.device_put(part, rows_sharding))
      outs.append(jax.tree.map(lambda o, n=n: np.asarray(o)[:n], out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outs)

  call.place = lambda tree: jax.device_put(tree, replicated)
  return call


def process_share(rows: np.ndarray) -> np.ndarray:
  """This process's contiguous share of `rows` (all of them in a single-process run): work that every
  process would otherwise repeat, split (e.g. the evaluation's samples)."""
  return np.array_split(rows, jax.process_count())[jax.process_index()]


def gather_shares(share: np.ndarray, total: int) -> np.ndarray:
  """The inverse of process_share for results: every process's share of `total` rows, concatenated in
  process order, on every process. (Shares differ by at most one row: padded for the all-gather.)"""
  if jax.process_count() == 1:
    return share
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sizes = [len(part) for part in np.array_split(np.empty(total), jax.process_count())]
  padded = np.zeros((max(sizes),) + share.shape[1:], share.dtype)
  padded[:len(share)] = share
  gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
  return np.concatenate([gathered[p, :n] for p, n in enumerate(sizes)])


def every_process(flag: bool) -> bool:
  """True when `flag` is true on every process (e.g. all have a cached result, so none computes a
  collective one)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def broadcast_from_process_0(value: float) -> float:
  """Process 0's value, on every process (decisions all processes must take together)."""
  if jax.process_count() == 1:
    return float(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return float(multihost_utils.broadcast_one_to_all(np.float32(value)))
