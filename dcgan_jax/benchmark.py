"""Training-step throughput on synthetic data; prints one JSON line. Needs no TensorFlow or tfds.

    python -m dcgan_jax.benchmark --preset=mnist --batch_size=128 --steps=30
    python -m dcgan_jax.benchmark --preset=mnist --batch_size=128 --steps=30 --seeds=0-3   # 4 members

Times the real pmapped training step (the in-memory path: a uint8 dataset on the devices, batches
gathered inside the step in the (seed, step) order) after warm-up, with block_until_ready around the
timed calls. With --seeds, every call runs the members as the training loop does (--members_form:
each member's step in turn, or one vmapped step over the stacked members): `images_per_sec` is the
total over the members, `images_per_sec_per_member` one member's share.
`compile_sec` is the first call (tracing + XLA compilation + one execution). The model and
training settings are the trainer's own flags (config.py), with the same defaults.
"""

import hashlib
import json
import os
import resource
import time
from typing import Optional

from absl import flags
import jax
import numpy as np

from dcgan_jax import cli
from dcgan_jax import config as config_lib
from dcgan_jax import members
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config, ConfigError
from dcgan_jax.cli import exit_with_error

# The Config fields a benchmark varies; every other one keeps its default.
CONFIG_FLAGS = ("preset", "image_size", "base_width", "latent_dim", "batch_size", "seed", "optimizer",
                "loss", "d_steps", "g_ema_decay", "compute_dtype", "steps_per_call", "invariant_groups",
                "seeds", "members_form", "gp_weight", "r1_weight", "r1_every", "d_norm")
config_lib.define_flags(CONFIG_FLAGS)
flags.DEFINE_integer("channels", 1, "Image channels.",
                     lower_bound=1, upper_bound=3)
flags.DEFINE_integer("steps", 30, "Timed training steps.",
                     lower_bound=1, upper_bound=10**6)
flags.DEFINE_integer("warmup", 2, "Untimed calls after the compiling one.",
                     lower_bound=0, upper_bound=10**4)
flags.DEFINE_integer("num_examples", 60000, "Synthetic dataset size (the data order permutes it).",
                     lower_bound=1, upper_bound=10**8)
flags.DEFINE_enum("multi_step", "auto", ["auto", "scan", "dispatch"],
                  "With --steps_per_call > 1: one lax.scan per call, or one dispatch of the single "
                  "step per step (auto: dispatch on CPU, scan elsewhere).")
flags.DEFINE_bool("stop_agreement", True, "After each call, agree on stopping as the training loop does "
                  "(--nostop_agreement: the steps alone, to measure what the agreement costs).")
flags.DEFINE_enum("xla_cpu_convolutions", "eigen", ["eigen", "ynnpack"],
                  "XLA:CPU's convolution library: eigen (what dcgan_jax's programs choose, "
                  "convolutions.configure_xla_cpu) or ynnpack (jaxlib 0.10's default).")
FLAGS = flags.FLAGS


def peak_memory_bytes():
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return "device", int(stats["peak_bytes_in_use"])
  return "host_max_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU backend


def run(config: Config, channels: int, steps: int, warmup: int, num_examples: int,
        scan: Optional[bool] = None, stop_agreement: bool = True) -> dict:
  """Times `steps` training steps (rounded up to whole calls of --steps_per_call); returns the JSON
  record. scan: for --steps_per_call > 1 (None: the platform's default). stop_agreement: after each
  call, the training loop's agreement on stopping (parallel.StopAgreement), as the loop runs it."""
  config = config.resolved()
  mesh = parallel.global_mesh()
  n_dev = mesh.devices.size
  parallel.check_devices(config, n_dev)
  policy = platforms.of_mesh(mesh)
  rng = np.random.default_rng(0)
  data = parallel.replicate(rng.integers(0, 256, (num_examples, config.image_size, config.image_size,
                                                  channels), np.uint8), mesh)
  positions = parallel.batch_positions(mesh, config.batch_size // n_dev)
  member_runs = members.runs(config, workdir="")  # the members' configs (or the run's own)
  states = [parallel.replicate(step_lib.create_train_state(r.config, channels), mesh) for r in member_runs]
  state_bytes = step_lib.state_bytes(states[0])
  train_step = step_lib.make_train_step(config, channels, num_examples, policy)
  form = policy.members_form(config.members_form) if config.seeds else None
  if form == "vmap":  # one state with a leading member axis, one program
    states, train_step = [parallel.stack_members(states)], parallel.over_members(train_step)
  k = config.steps_per_call
  if scan is None:
    scan = policy.scan_steps
  call = (parallel.pmap_step(train_step, replicated_data=True) if k == 1 else
          parallel.make_multi_step(train_step, k, replicated_data=True, scan=scan))
  calls = -(-steps // k)  # the timed steps, rounded up to whole calls
  steps = calls * k
  agree = parallel.StopAgreement(mesh) if stop_agreement else lambda request: 0

  def one_call():
    out = [call(state, positions, data) for state in states]
    agree(0)
    return [state for state, _ in out], out[-1][1]

  t0 = time.perf_counter()
  states[0], metrics = call(states[0], positions, data)
  jax.block_until_ready((states[0], metrics))
  compile_sec = time.perf_counter() - t0
  for _ in range(warmup):
    states, metrics = one_call()
  jax.block_until_ready((states, metrics))
  t0 = time.perf_counter()
  for _ in range(calls):
    states, metrics = one_call()
  jax.block_until_ready((states, metrics))
  elapsed = time.perf_counter() - t0
  final = jax.tree.map(lambda x: np.asarray(x).reshape(-1)[-1], jax.device_get(metrics))  # last step
  kind, peak = peak_memory_bytes()
  return dict(impl="dcgan_jax", preset=config.preset, image_size=config.image_size,
              batch_size=config.batch_size, steps=steps, steps_per_call=k,
              multi_step=None if k == 1 else ("scan" if scan else "dispatch"),
              invariant_groups=config.invariant_groups, stop_agreement=stop_agreement,
              compute_dtype=config.compute_dtype, xla_flags=os.environ.get("XLA_FLAGS", ""),
              loss=config.loss, gp_weight=config.gp_weight, r1_weight=config.r1_weight,
              r1_every=config.r1_every, d_norm=config.d_norm, d_steps=config.d_steps,
              members=len(member_runs), members_form=form, state_bytes_per_member=state_bytes,
              sec_per_step=elapsed / steps,
              images_per_sec=len(member_runs) * config.batch_size * steps / elapsed,
              images_per_sec_per_member=config.batch_size * steps / elapsed,
              compile_sec=compile_sec, backend=platforms.backend_name(),
              device_kind=jax.local_devices()[0].device_kind, devices=n_dev, jax=jax.__version__,
              peak_memory_kind=kind, peak_memory_bytes=peak,
              final_d_loss=float(final["d_loss"]), final_g_loss=float(final["g_loss"]),
              finite=bool(final["finite"] == 1.0), state_sha256=state_digest(states))


def state_digest(states) -> str:
  """sha256 of every leaf of the final states in tree order (keys by their data): two runs with equal
  digests ended bitwise equal (--invariant_groups on an accelerator, experiments/bench_gpu.py)."""
  digest = hashlib.sha256()
  as_data = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  for leaf in jax.tree.leaves(jax.device_get(jax.tree.map(as_data, states))):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()


def main(argv):
  del argv
  config = config_lib.from_flags(CONFIG_FLAGS, dataset="synthetic")
  try:
    result = run(config, FLAGS.channels, FLAGS.steps, FLAGS.warmup, FLAGS.num_examples,
                 scan=None if FLAGS.multi_step == "auto" else FLAGS.multi_step == "scan",
                 stop_agreement=FLAGS.stop_agreement)
  except ConfigError as e:
    exit_with_error(str(e))
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  cli.run(main, xla_cpu_convolutions=lambda: FLAGS.xla_cpu_convolutions,
          deterministic=lambda: FLAGS.invariant_groups > 0)
