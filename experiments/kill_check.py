"""SIGKILL a short training run at random moments, restart it after each kill, and check that it ends
bitwise where an uninterrupted run ends.

    python experiments/kill_check.py --data_dir=data/tfds --kills=20 [--seed=0] [--out=/tmp/kill_check]

The run (the `mnist` preset on Fashion-MNIST, 40 steps of batch 32, EMA, a checkpoint every 5 steps,
evaluation every 10 with its best/ checkpoint, sample grids, the final export) is killed --kills times:
three times at chosen moments (while it evaluates, while a checkpoint is being written, while the
generator is exported) and otherwise after a random delay (seeded) within the time an uninterrupted run
takes. After each kill the same command is run again; the last one runs to the end. Prints one JSON
line per kill ({"kill", "after_s", "phase", "resumed_from"}) and a last line with the verdict:
{"kills", "bitwise_equal" (final state), "metrics_equal" (losses and scores of every logged step),
"best_equal" (the best/ checkpoint's step and FID), "phases"}.

Needs Fashion-MNIST prepared in --data_dir (README: prepare_data). Uses a persistent XLA compilation
cache in --out, so restarts do not compile again.
"""

import argparse
import glob
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUN = ["--dataset=fashion_mnist", "--preset=mnist", "--num_steps=40", "--batch_size=32", "--latent_dim=32",
       "--g_ema_decay=0.99", "--checkpoint_every=5", "--log_every=5", "--sample_every=10", "--eval_every=10",
       "--eval_samples=200"]
COMPARED = ("d_loss", "g_loss", "d_real", "d_fake", "fid", "kid", "fid_raw", "kid_raw")


def command(data_dir, workdir, cache_dir):
  args = [sys.executable, "-m", "dcgan_jax.main", *RUN, f"--data_dir={data_dir}", f"--workdir={workdir}",
          f"--evaluator_dir={cache_dir}/evaluators"]
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=f"{cache_dir}/xla",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
  return args, env


def start(data_dir, workdir, cache_dir, log):
  args, env = command(data_dir, workdir, cache_dir)
  with open(log, "w") as f:
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def phase(workdir, log, began) -> str:
  """What the run was doing when it was killed, from what it left since `began` (time.time())."""
  with open(log) as f:
    lines = f.read().splitlines()
  new = lambda pattern: [p for p in glob.glob(os.path.join(workdir, pattern)) if os.path.getmtime(p) >= began]
  if new("generator"):
    return "exporting"
  if new("*/*.orbax-checkpoint-tmp*"):
    return "checkpointing"
  steps = [l for l in lines if "/40 |" in l]
  if not steps:
    return "starting"
  last = lines[-1]
  if any(f"step {s}/40 |" in last for s in (10, 20, 30, 40)):
    return "evaluating"
  return "training"


def wait_until(proc, condition, timeout=600):
  t0 = time.time()
  while not condition():
    if proc.poll() is not None or time.time() - t0 > timeout:
      return False
    time.sleep(0.002)
  return True


def records(workdir):
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for r in workdir_lib.read_jsonl(workdir_lib.path(workdir, workdir_lib.METRICS)):
    out.setdefault(r["step"], {}).update({k: r[k] for k in COMPARED if k in r})
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="/tmp/kill_check")
  a = parser.parse_args()
  shutil.rmtree(a.out, ignore_errors=True)
  os.makedirs(a.out)
  cache, straight, killed = f"{a.out}/cache", f"{a.out}/straight", f"{a.out}/killed"

  for _ in range(2):  # the second time warm (evaluator and programs cached): the restarts' timescale
    shutil.rmtree(straight, ignore_errors=True)
    t0 = time.time()
    if start(a.data_dir, straight, cache, f"{a.out}/straight.log").wait() != 0:
      sys.exit(f"the uninterrupted run failed; see {a.out}/straight.log")
    total = time.time() - t0

  rng = random.Random(a.seed)
  chosen = {0: "evaluating", 1: "checkpointing", 2: "exporting"}
  phases, kill = [], 0
  while kill < a.kills:
    log = f"{a.out}/kill_{kill:02d}.log"
    proc = start(a.data_dir, killed, cache, log)
    began = time.time()
    target = chosen.get(kill)
    if target == "evaluating":
      hit = wait_until(proc, lambda: "step 10/40" in open(log).read() or "step 20/40" in open(log).read())
    elif target == "checkpointing":
      hit = wait_until(proc, lambda: glob.glob(os.path.join(killed, "checkpoints", "*.orbax-checkpoint-tmp*")))
    elif target == "exporting":
      hit = wait_until(proc, lambda: os.path.isdir(os.path.join(killed, "generator")))
    else:
      delay = rng.uniform(0.5, total)
      hit = wait_until(proc, lambda: time.time() - began > delay)
    if proc.poll() is not None:  # it finished before the moment came: start over from scratch
      shutil.rmtree(killed)
      continue
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = phase(killed, log, began)
    phases.append(seen)
    from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
    print(json.dumps(dict(kill=kill + 1, after_s=round(time.time() - began, 2), aimed=target, hit=bool(hit),
                          phase=seen, resumed_from=workdir_lib.resume_point([killed]))), flush=True)
    kill += 1
  proc = start(a.data_dir, killed, cache, f"{a.out}/final.log")
  status = proc.wait()

  from dcgan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  a_state, b_state = (checkpoints.read_state_numpy(w, 40)[0] for w in (straight, killed))
  equal = jax.tree.structure(a_state) == jax.tree.structure(b_state) and all(
      np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)))
  print(json.dumps(dict(kills=a.kills, final_status=status, bitwise_equal=bool(equal),
                        metrics_equal=records(straight) == records(killed),
                        best_equal=best_of(straight) == best_of(killed), best=best_of(killed),
                        phases={p: phases.count(p) for p in sorted(set(phases))},
                        uninterrupted_s=round(total, 1))), flush=True)


def best_of(workdir):
  """(step, fid) of the best/ checkpoint, from its score."""
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  steps = workdir_lib.checkpoint_steps(workdir, workdir_lib.BEST)
  if not steps:
    return None
  with open(os.path.join(workdir, "best", str(steps[-1]), "score", "metadata")) as f:
    return steps[-1], json.load(f)["fid"]


if __name__ == "__main__":
  main()
