"""Runs one training run as N processes on this machine, the way a pod runs it on N hosts.

    python -m dcgan_jax.launch --num_processes=2 -- --flagfile=fashion_mnist.flags --workdir=/tmp/run
    python -m dcgan_jax.launch --num_processes=4 --gpus_per_process=2 -- --flagfile=...   # 8 GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m dcgan_jax.launch --num_processes=2 -- ...

Everything after `--` goes to every `python -m dcgan_jax.main`, with --coordinator_address (a free port
on 127.0.0.1), --num_processes and --process_id added. The processes' output comes through with a
"[i] " prefix. SIGTERM or Ctrl-C here reaches every process (they stop together after the same step
and checkpoint); when one process fails or is killed, the others are ended (SIGUSR1: each ends at once
with one line naming the step to resume from; SIGKILL after --grace_seconds for one that does not),
one line names the failed process and the step the run resumes from, and the exit status is the
failure's (128 + signal for a killed one).
No JAX in this process: it never holds a device.
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags

from dcgan_jax import workdir as workdir_lib
from dcgan_jax.cli import exit_with_error

flags.DEFINE_integer("num_processes", 2, "Processes to start, one run together.",
                     lower_bound=1, upper_bound=256)
flags.DEFINE_integer("gpus_per_process", 0, "Give each process its own GPUs (CUDA_VISIBLE_DEVICES): "
                     "process i gets GPUs [i * n, (i + 1) * n). 0: every process sees what this one sees.",
                     lower_bound=0, upper_bound=64)
flags.DEFINE_integer("grace_seconds", 10, "After one process failed: how long the others may take to "
                     "end on SIGUSR1 (the lost-process line) before they are killed. They cannot go on "
                     "without it (every step and every save is collective).",
                     lower_bound=0, upper_bound=3600)
FLAGS = flags.FLAGS


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now (the coordinator's)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _die_with_parent() -> None:
  """In the child, before exec: SIGTERM when the launcher dies (SIGKILL included), so no process of a
  run outlives its launcher and waits forever for the others. Linux only; elsewhere a no-op."""
  try:
    import ctypes  # pylint: disable=g-import-not-at-top
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def start(main_args: list, num_processes: int, gpus_per_process: int = 0) -> list:
  """Starts the processes of one run; returns their Popen objects (stdout: pipes, stderr merged).
  Each is its own process group, so that a terminal's Ctrl-C reaches them once, through the launcher."""
  port, procs = free_port(), []
  for i in range(num_processes):
    env = dict(os.environ)
    if gpus_per_process:
      env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(i * gpus_per_process,
                                                                    (i + 1) * gpus_per_process))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dcgan_jax.main", *main_args, f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={num_processes}", f"--process_id={i}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        start_new_session=True, preexec_fn=_die_with_parent))  # pylint: disable=subprocess-popen-preexec-fn
  return procs


def child_pid(launcher_pid: int, process_id: int) -> int:
  """The pid of process `process_id` of a run a launcher started (for a signal to one process of a run,
  as a pod's preemption sends it). Linux (/proc); LookupError when there is none."""
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      with open(f"/proc/{pid}/cmdline") as f:
        cmdline = f.read().split("\0")
    except (OSError, IndexError, ValueError):
      continue
    if ppid == launcher_pid and f"--process_id={process_id}" in cmdline:
      return int(pid)
  raise LookupError(f"no process {process_id} under launcher {launcher_pid}")


def _forward_output(i: int, proc: subprocess.Popen) -> threading.Thread:
  def copy():
    for line in proc.stdout:
      sys.stderr.write(f"[{i}] {line}")
      sys.stderr.flush()
  thread = threading.Thread(target=copy, daemon=True)
  thread.start()
  return thread


def _describe(returncode: int) -> str:
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}"
  return f"exited with status {returncode}"


def supervise(procs: list, grace_seconds: float, workdir=None) -> int:
  """Waits for every process; ends the others once one fails. Returns the exit status for the launcher:
  0 when all exited 0, else the first failure's (128 + signal number for a killed process)."""
  failed, deadline = None, None
  while None in [p.poll() for p in procs]:  # every process polled each time (any() would stop early)
    if failed is None:
      failed = _cause(procs)
      if failed is not None:
        deadline = time.time() + grace_seconds
        print(f"launch: process {failed[0]} {_describe(failed[1])}; ending the other processes",
              file=sys.stderr, flush=True)
        # Not SIGTERM (a stop with a checkpoint, which a survivor blocked in a collective with the dead
        # process never reaches): stopping.LOST_A_PROCESS ends each at once with its one line.
        _signal_all(procs, signal.SIGUSR1)
    elif time.time() > deadline:
      _signal_all(procs, signal.SIGKILL)
    time.sleep(0.1)
  if failed is None:
    failed = _cause(procs)
  if failed is None:
    return 0
  i, code = failed
  print(f"error: process {i} of {len(procs)} {_describe(code)}; the others were ended; run the same "
        "command again to resume from " + (workdir_lib.resume_point([workdir]) if workdir else
                                           "the newest checkpoint"), file=sys.stderr, flush=True)
  return 128 - code if code < 0 else code


def _cause(procs: list):
  """(i, returncode) of the failed process that most likely caused the others to fail, or None. Seen
  in one poll, a killed process comes before one that exited with an error, and that before one that
  exited 3 (main.py's "lost another process": a consequence)."""
  failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
  return min(failed, key=lambda f: (f[1] == 3, f[1] > 0, f[0]), default=None)


def _signal_all(procs: list, sig: int) -> None:
  for p in procs:
    if p.poll() is None:
      try:
        p.send_signal(sig)
      except ProcessLookupError:
        pass


def forward_stop_signals(procs: list) -> None:
  """SIGTERM (preemption) or Ctrl-C to this process goes on to every process of the run: they agree on
  one step to stop after and checkpoint it together (stopping.py)."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda signum, frame: _signal_all(procs, signum))


def main(argv):
  main_args = argv[1:]
  if FLAGS.num_processes < 1:
    exit_with_error(f"--num_processes={FLAGS.num_processes}: must be at least 1")
  if any(a.split("=")[0] in ("--coordinator_address", "--num_processes", "--process_id") for a in main_args):
    exit_with_error("--coordinator_address, --num_processes and --process_id after `--` are the "
                    "launcher's to set; pass --num_processes before `--`")
  procs = start(main_args, FLAGS.num_processes, FLAGS.gpus_per_process)
  threads = [_forward_output(i, p) for i, p in enumerate(procs)]
  forward_stop_signals(procs)
  workdir = next((a.split("=", 1)[1] for a in reversed(main_args) if a.startswith("--workdir=")), None)
  status = supervise(procs, FLAGS.grace_seconds, workdir)
  for t in threads:
    t.join(timeout=5)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main)
