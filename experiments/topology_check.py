"""Same run on different topologies, real data: prints one JSON line of relative L2 distances.

    python experiments/topology_check.py --data_dir=data/tfds [--workdir=/tmp/topology_check] \
        [--invariant_groups=8]

Runs `--flagfile=fashion_mnist.flags --batch_size=32 --num_steps=20` with 1 and 4 (virtual CPU) devices
and as 2 processes x 2 devices (gloo on 127.0.0.1, one shared workdir; the 2-process run stops at step
10 and resumes to 20, which exercises multi-process checkpoint restore), then compares the newest
checkpoints' parameters (weights and BatchNorm statistics) with the 4-device run's, and the logged
losses (steps 10 and 20). With --invariant_groups=8 (two groups per device on 4 devices) the runs are
expected to be bitwise identical.
"""
import argparse
import json
import os
import shutil
import socket
import subprocess
import sys

from dcgan_jax import checkpoints

p = argparse.ArgumentParser()
p.add_argument("--data_dir", required=True)
p.add_argument("--workdir", default="/tmp/topology_check")
p.add_argument("--invariant_groups", type=int, default=0)
a = p.parse_args()
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmd(workdir, steps):
  return [sys.executable, "-m", "dcgan_jax.main", "--flagfile=fashion_mnist.flags", f"--data_dir={a.data_dir}",
          f"--workdir={workdir}", "--batch_size=32", f"--num_steps={steps}", "--checkpoint_every=10",
          "--log_every=10", "--sample_every=20", f"--invariant_groups={a.invariant_groups}"]


def env(devices):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def two_processes(workdir, steps):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(cmd(workdir, steps) + [f"--coordinator_address=127.0.0.1:{port}",
                                                   "--num_processes=2", f"--process_id={i}"],
                            cwd=root, env=env(2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for i in (1, 0)]
  for proc in procs:
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]


def parameters(state):
  return {"g": state["g"]["params"], "d": state["d"]["params"], "g_bn": state["g"]["batch_stats"]}


shutil.rmtree(a.workdir, ignore_errors=True)
runs = {"1x1": os.path.join(a.workdir, "d1"), "1x4": os.path.join(a.workdir, "d4"),
        "2x2": os.path.join(a.workdir, "p2")}
for name, devices in (("1x1", 1), ("1x4", 4)):
  subprocess.run(cmd(runs[name], 20), cwd=root, env=env(devices), check=True, capture_output=True)
two_processes(runs["2x2"], 10)
two_processes(runs["2x2"], 20)
reference, _ = checkpoints.read_state_numpy(runs["1x4"])


def losses(workdir):
  lines = map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
  return [(m["step"], m["d_loss"], m["g_loss"]) for m in lines if "d_loss" in m]  # (not evaluation lines)


result = {"invariant_groups": a.invariant_groups}
for name, workdir in runs.items():
  state, step = checkpoints.read_state_numpy(workdir)
  result[f"{name}_step"] = step
  result[f"{name}_rel_l2_vs_1x4"] = checkpoints.relative_l2(parameters(state), parameters(reference))
  result[f"{name}_losses_equal_1x4"] = losses(workdir) == losses(runs["1x4"])
print(json.dumps(result))
