"""Checks that resuming is exact on real data: prints one JSON line.

    python experiments/resume_check.py --data_dir=data/tfds [--steps=40] [--workdir=/tmp/resume_check]

Runs the same training three ways with the CLI (`--flagfile=fashion_mnist.flags` plus the overrides below):
  straight:  --num_steps=STEPS in one go;
  restarted: --num_steps=STEPS/2, then the same workdir with --num_steps=STEPS;
  killed:    --num_steps=STEPS, SIGKILLed as soon as its first checkpoint is complete, then rerun;
and compares the newest checkpoints bitwise.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dcgan_jax import checkpoints

p = argparse.ArgumentParser()
p.add_argument("--data_dir", required=True)
p.add_argument("--steps", type=int, default=40)
p.add_argument("--workdir", default="/tmp/resume_check")
a = p.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
half = a.steps // 2


def cmd(workdir, steps):
  return [sys.executable, "-m", "dcgan_jax.main", "--flagfile=fashion_mnist.flags", f"--data_dir={a.data_dir}",
          f"--workdir={workdir}", f"--num_steps={steps}", f"--checkpoint_every={half // 2}",
          "--log_every=10", f"--sample_every={a.steps}"]


def run(workdir, steps):
  subprocess.run(cmd(workdir, steps), cwd=root, check=True, capture_output=True)


def state(workdir):
  tree, step = checkpoints.read_state_numpy(workdir)
  return step, tree


shutil.rmtree(a.workdir, ignore_errors=True)
dirs = {k: os.path.join(a.workdir, k) for k in ("straight", "restarted", "killed")}
t0 = time.time()
run(dirs["straight"], a.steps)
run(dirs["restarted"], half)
run(dirs["restarted"], a.steps)
proc = subprocess.Popen(cmd(dirs["killed"], a.steps), cwd=root, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
first = os.path.join(dirs["killed"], "checkpoints", str(half // 2))
while not os.path.exists(first):
  assert proc.poll() is None, "training exited before its first checkpoint"
  time.sleep(0.05)
proc.send_signal(signal.SIGKILL)
proc.wait()
run(dirs["killed"], a.steps)

ref_step, ref = state(dirs["straight"])
result = {"steps": a.steps, "newest_step": ref_step}
for k in ("restarted", "killed"):
  step, other = state(dirs[k])
  same = step == ref_step and all(np.array_equal(x, y) for x, y in
                                  zip(jax.tree.leaves(ref), jax.tree.leaves(other)))
  result[f"{k}_bitwise_equal"] = bool(same)
result["seconds"] = round(time.time() - t0, 1)
print(json.dumps(result))
sys.exit(0 if result["restarted_bitwise_equal"] and result["killed_bitwise_equal"] else 1)
