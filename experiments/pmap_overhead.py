"""The per-call cost of pmap across processes: since JAX 0.10 `jax.pmap` is jit over shard_map, and in a
multi-process run it converts every argument from host-local to global arrays and the results back, on
every call (JAX's pmap migration guide). This times one call of the trainer's pmapped step
(parallel.pmap_step) on 1 process x 4 CPU devices and on 2 processes x 2 (jax.distributed on
127.0.0.1, gloo), with K=1 and K=16 steps per call (one lax.scan); on 1 process also the same
program called as a jit over global arrays (parallel.step_program).

    python experiments/pmap_overhead.py [--calls=200]

The step does almost nothing (the mnist preset's TrainState passed through, its step + 1, one
all-reduced scalar), so the time per call is the call's overhead plus a tiny program. One JSON line per topology,
form and K: microseconds per call (median of 5 timed blocks of --calls calls).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def worker(args):
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from dcgan_jax import parallel  # pylint: disable=g-import-not-at-top
  from dcgan_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from dcgan_jax.config import Config  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  mesh = parallel.global_mesh()
  config = Config(batch_size=8 * jax.device_count()).resolved()
  state = parallel.replicate(step_lib.create_train_state(config, 1), mesh)
  positions = parallel.batch_positions(mesh, 8)
  data = parallel.replicate(np.zeros((64, 28, 28, 1), np.uint8), mesh)

  def tiny_step(state, positions, data):
    loss = jax.lax.pmean(jnp.sum(positions).astype(jnp.float32) + data[0, 0, 0, 0], parallel.AXIS)
    return state.replace(step=state.step + 1), {"loss": loss}  # (the rest: donated, returned as is)

  topology = f"{jax.process_count()}x{jax.local_device_count()}"
  for k in (1, 16):
    step = tiny_step if k == 1 else parallel.scanned_steps(tiny_step, k, True)
    forms = [("pmap", parallel.pmap_step(step, True))]
    if jax.process_count() == 1:  # (across processes the jitted form waited forever here, in gloo)
      forms.append(("jit_shard_map", parallel.step_program(step, True, mesh)))
    for form, call in forms:
      for _ in range(10):  # compile and warm up
        state, metrics = call(state, positions, data)
      jax.block_until_ready((state, metrics))
      blocks = []
      for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.calls):
          state, metrics = call(state, positions, data)
        jax.block_until_ready((state, metrics))
        blocks.append((time.perf_counter() - t0) / args.calls * 1e6)
      if jax.process_index() == 0:
        print(json.dumps(dict(topology=topology, form=form, steps_per_call=k,
                              us_per_call=round(statistics.median(blocks), 1),
                              us_per_call_blocks=[round(b, 1) for b in blocks],
                              state_leaves=len(jax.tree.leaves(state)), jax=jax.__version__)), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--calls", type=int, default=200, help="calls per timed block (1..100000)")
  parser.add_argument("--process_id", type=int, default=-1, help=argparse.SUPPRESS)
  parser.add_argument("--num_processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if not 1 <= args.calls <= 100_000:
    sys.exit(f"error: --calls={args.calls}: must be in 1..100000")
  if args.process_id >= 0:
    worker(args)
    return
  sys.path.insert(0, ROOT)
  from dcgan_jax import launch  # pylint: disable=g-import-not-at-top  (no JAX)
  me = [sys.executable, os.path.abspath(__file__), f"--calls={args.calls}"]
  env = lambda devices: dict(os.environ, JAX_PLATFORMS="cpu",
                             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  subprocess.run(me + ["--process_id=0"], env=env(4), check=True)
  port = launch.free_port()
  procs = [subprocess.Popen(me + [f"--process_id={i}", "--num_processes=2",
                                  f"--coordinator=127.0.0.1:{port}"], env=env(2)) for i in range(2)]
  if any(p.wait() for p in procs):
    sys.exit("error: a process of the 2-process run failed (its output is above)")


if __name__ == "__main__":
  main()
