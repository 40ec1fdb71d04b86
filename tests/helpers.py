"""Shared test helpers: synthetic IDX files and running the command line."""
import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np

from dcgan_jax.prepare_data import SPLIT_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tests' programs are compiled by XLA:CPU with LLVM's optimisation level 0: the same programs (the
# same HLO), compiled in about 60% of the time, most of a test's time on tiny models. Rounding moves
# (by 7e-5 relative in the golden trajectory, inside its band); every run a test compares with another
# (in process or CLI) is compiled the same way, so the bitwise tests compare like with like.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_jsonl(path):
  """The records of a JSON-lines file (e.g. a run's metrics.jsonl), in order."""
  with open(path) as f:
    return [json.loads(line) for line in f]


def logged_so_far(path):
  """The complete records of a JSON-lines file that a running process is appending to: [] before it
  exists, and without a last line still being written (a read can land in the middle of a write)."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def write_idx(path, array, magic, compress=True):
  header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  data = header + array.astype(np.uint8).tobytes()
  with (gzip.open(path + ".gz", "wb") if compress else open(path, "wb")) as f:
    f.write(data)


def make_idx_dir(root, n_train=24, n_test=8, compress=True, learnable=False):
  """Writes MNIST-format IDX files of random images and labels; returns {split: (images (n, 28, 28),
  labels (n,))}. learnable: each image shows its class instead, as a bright band at rows 2c+4, 2c+5 on
  dark noise (a classifier must learn it; random labels cannot be learnt)."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
    if learnable:
      images = rng.integers(0, 64, (n, 28, 28))
      for i, c in enumerate(labels):
        images[i, 2 * c + 4:2 * c + 6] = rng.integers(192, 256, (2, 28))
    img_name, lbl_name = SPLIT_FILES[split]
    write_idx(os.path.join(root, img_name), images, 2051, compress)
    write_idx(os.path.join(root, lbl_name), labels, 2049, compress)
    arrays[split] = (images.astype(np.uint8), labels)
  return arrays


def cli_env(devices=2, fast_compile=True):
  """Environment of a CLI subprocess: `devices` virtual CPU devices, and the test session's persistent
  XLA compilation cache (set in conftest.py), so repeated runs of one configuration compile once.
  fast_compile=False: XLA's default optimisation level instead of TEST_XLA_FLAGS' 0, for programs whose
  running costs more than their compiling (the Inception network on 299x299 images runs ~2x slower at
  level 0); only compare such a process's numbers bitwise with another such process's."""
  flags = f"--xla_force_host_platform_device_count={devices}" + (f" {TEST_XLA_FLAGS}" if fast_compile else "")
  return dict(os.environ, XLA_FLAGS=flags, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def run_cli(args, mocked_examples=None, timeout=600, devices=2, fast_compile=True):
  cmd = [sys.executable] + (["tests/mocked_main.py", str(mocked_examples)] if mocked_examples
                            else ["-m", "dcgan_jax.main"]) + args
  return subprocess.run(cmd, cwd=ROOT, env=cli_env(devices, fast_compile), capture_output=True, text=True,
                        timeout=timeout)


def launch(args, log, num_processes=2, devices=2):
  """`python -m dcgan_jax.launch --num_processes=N -- args`: one run as N local processes of `devices`
  CPU devices each. The output of all processes (prefixed "[i] ") and the launcher's own goes to the
  file `log` (a pipe that the test does not drain would fill up and block every process)."""
  with open(log, "w") as out:
    launcher = subprocess.Popen([sys.executable, "-m", "dcgan_jax.launch",
                                 f"--num_processes={num_processes}", "--"] + args, cwd=ROOT,
                                env=cli_env(devices), stdout=out, stderr=subprocess.STDOUT, text=True)
  launcher.log = log
  return launcher


def wait_until(proc, condition, timeout=300):
  """Polls condition() every 50 ms while `proc` (a run or its launcher) is alive; fails the test if the
  process ends first or `timeout` seconds pass."""
  t0 = time.time()
  while not condition():
    assert proc.poll() is None and time.time() - t0 < timeout, "the run ended or did not get there"
    time.sleep(0.05)


def launched_output(launcher, timeout):
  """Waits for a launch() to end; its output. Called from a `finally:` while the test's own error is
  on its way out, it kills the launcher at once, so that error is the one reported (not this wait's)."""
  try:
    if sys.exc_info()[0] is None:
      launcher.wait(timeout=timeout)
  finally:
    launcher.kill()
  with open(launcher.log) as f:
    return f.read()


def process_output(out, i):
  """Process i's lines of a launcher's output, without the prefix."""
  return "\n".join(l[len(f"[{i}] "):] for l in out.splitlines() if l.startswith(f"[{i}] "))


def child_pid(launcher, process_id):
  """The pid of process `process_id` of a launched run (a child of the launcher)."""
  from dcgan_jax import launch as launch_lib  # pylint: disable=g-import-not-at-top
  return launch_lib.child_pid(launcher.pid, process_id)
