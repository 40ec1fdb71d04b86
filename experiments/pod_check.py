"""The main job on 2 processes, on real data: stopped by a signal to one process, resumed, compared
bitwise with an uninterrupted run; and the time one evaluation takes on 1 and on 2 processes. Prints
one JSON line.

    python experiments/pod_check.py --data_dir=data/tfds [--steps=300] [--workdir=/tmp/pod_check]

Runs `--flagfile=fashion_mnist.flags` (the mnist preset with dropout, EMA, --eval_every with best/) with
--invariant_groups=4 (bitwise on any topology of up to 2 devices):
  straight:  1 process x 2 CPU devices, --num_steps=STEPS in one go;
  stopped:   2 processes x 1 device (python -m dcgan_jax.launch), SIGTERM to process 1 only once STEPS/3
             steps are logged; then the launcher again, to STEPS;
and compares the final checkpoints (every leaf, EMA included), the evaluation lines of metrics.jsonl and
the best/ step. Evaluation times come from the console lines ("evaluated in X s").
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from dcgan_jax import checkpoints
from dcgan_jax import launch as launch_lib
from dcgan_jax import workdir as workdir_lib

p = argparse.ArgumentParser()
p.add_argument("--data_dir", required=True)
p.add_argument("--steps", type=int, default=300)
p.add_argument("--workdir", default="/tmp/pod_check")
a = p.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
every = a.steps // 3


def flags(workdir):
  return ["--flagfile=fashion_mnist.flags", f"--data_dir={a.data_dir}", f"--workdir={workdir}",
          f"--num_steps={a.steps}", "--batch_size=64", "--invariant_groups=4", f"--eval_every={every}",
          f"--checkpoint_every={every}", "--log_every=10", f"--sample_every={a.steps}"]


def env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONUNBUFFERED="1")


def launch(workdir, log):
  with open(log, "w") as out:
    return subprocess.Popen([sys.executable, "-m", "dcgan_jax.launch", "--num_processes=2", "--"] +
                            flags(workdir), cwd=root, env=env(1), stdout=out, stderr=subprocess.STDOUT)


def eval_seconds(text):
  return [float(x) for x in re.findall(r"evaluated in ([0-9.]+) s", text)]


def evaluations(workdir):
  return [m for m in workdir_lib.read_jsonl(workdir_lib.path(workdir, workdir_lib.METRICS)) if "fid" in m]


shutil.rmtree(a.workdir, ignore_errors=True)
os.makedirs(a.workdir)
straight, stopped = os.path.join(a.workdir, "straight"), os.path.join(a.workdir, "stopped")
t0 = time.time()
r = subprocess.run([sys.executable, "-m", "dcgan_jax.main"] + flags(straight), cwd=root, env=env(2),
                   capture_output=True, text=True)
assert r.returncode == 0, r.stderr[-3000:]
straight_seconds, straight_evals = time.time() - t0, eval_seconds(r.stderr)

t0 = time.time()
log1 = os.path.join(a.workdir, "stopped_1.log")
launcher = launch(stopped, log1)
metrics = workdir_lib.path(stopped, workdir_lib.METRICS)
while not (os.path.exists(metrics) and len(workdir_lib.read_jsonl(metrics)) >= every // 10 + 2):
  assert launcher.poll() is None, open(log1).read()[-3000:]
  time.sleep(0.1)
os.kill(launch_lib.child_pid(launcher.pid, 1), signal.SIGTERM)
launcher.wait(timeout=600)
first = open(log1).read()
assert launcher.returncode == 0, first[-3000:]
stop_steps = sorted(set(int(s) for s in re.findall(r"Stopped by SIGTERM at step (\d+)", first)))
log2 = os.path.join(a.workdir, "stopped_2.log")
launcher = launch(stopped, log2)
launcher.wait(timeout=3600)
second = open(log2).read()
assert launcher.returncode == 0, second[-3000:]
stopped_seconds = time.time() - t0
two_process_evals = [s for s in eval_seconds(first + second)]

x, y = checkpoints.read_state_numpy(straight), checkpoints.read_state_numpy(stopped)
bitwise = x[1] == y[1] and all(np.array_equal(u, v) for u, v in
                               zip(jax.tree.leaves(x[0]), jax.tree.leaves(y[0]), strict=True))
drop = lambda ms: [{k: v for k, v in m.items() if k not in ("steps_per_sec", "images_per_sec")} for m in ms]
print(json.dumps(dict(
    steps=a.steps, stop_steps_per_process=re.findall(r"Stopped by SIGTERM at step (\d+)", first),
    stopped_at=stop_steps, bitwise_final_state=bool(bitwise),
    same_evaluation_lines=drop(evaluations(straight)) == drop(evaluations(stopped)),
    evaluation_steps=[m["step"] for m in evaluations(stopped)],
    best_straight=os.listdir(os.path.join(straight, "best")), best_stopped=os.listdir(os.path.join(stopped, "best")),
    fid=[round(m["fid"], 4) for m in evaluations(stopped)],
    eval_seconds_1_process=straight_evals, eval_seconds_2_processes=two_process_evals,
    wall_seconds_straight=round(straight_seconds, 1), wall_seconds_stopped_and_resumed=round(stopped_seconds, 1))))
