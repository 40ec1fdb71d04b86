"""dcgan_jax.launch's supervision, with stand-in processes (the real runs: tests/test_topology.py)."""
import os
import signal
import subprocess
import sys
import time

from dcgan_jax import launch

# A process that ignores SIGTERM, as one blocked in a collective with a dead peer effectively does.
STUCK = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
         "signal.signal(signal.SIGUSR1, signal.SIG_IGN); print('up', flush=True); time.sleep(30)")


def start(*scripts):
  procs = [subprocess.Popen([sys.executable, "-c", s], stdout=subprocess.PIPE, text=True) for s in scripts]
  for p, s in zip(procs, scripts):
    if "print('up'" in s:
      assert p.stdout.readline() == "up\n"  # its SIGTERM handler is in place
  return procs


def test_a_killed_later_process_ends_a_stuck_first_one_after_the_grace(tmp_path, capsys):
  """Process 1 is killed while process 0 ignores the launcher's signals (it sits in a collective):
  supervise() returns 128 + 9 within the grace
  period plus a little, process 0 is gone, and the last line names process 1, the kill and the newest
  checkpoint's step. Catches polling that stops at the first live process (process 1's death unseen
  until process 0 ends: here never), no SIGKILL after the grace, and blaming the process that was
  ended rather than the one that failed."""
  os.makedirs(tmp_path / "checkpoints" / "40")
  os.makedirs(tmp_path / "checkpoints" / "20")
  procs = start(STUCK, "import os, signal, time; time.sleep(0.5); os.kill(os.getpid(), signal.SIGKILL)")
  t0 = time.time()
  status = launch.supervise(procs, grace_seconds=1, workdir=str(tmp_path))
  assert status == 128 + signal.SIGKILL
  assert time.time() - t0 < 10
  assert procs[0].returncode == -signal.SIGKILL
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.startswith("error: process 1 of 2 was killed by SIGKILL; the others were ended") and \
      "resume from step 40 (the newest checkpoint)" in last, last


def test_the_process_that_failed_is_named_not_the_one_that_followed(capsys):
  """Process 1 exits 2 (bad input) and process 0 then exits 3 ("lost another process", a consequence),
  both before supervise() looks: the status is 2 and the line names process 1. All exiting 0 gives 0.
  Catches blaming the lowest index."""
  procs = start("import sys; sys.exit(3)", "import sys; sys.exit(2)")
  for p in procs:
    p.wait()
  assert launch.supervise(procs, grace_seconds=1) == 2
  assert "error: process 1 of 2 exited with status 2" in capsys.readouterr().err
  assert launch.supervise(start("pass", "pass"), grace_seconds=1) == 0


def test_a_sigterm_or_ctrl_c_to_the_launcher_reaches_every_process():
  """With forward_stop_signals() in place, SIGTERM and then SIGINT to the launcher's own process reach
  each of the run's processes (stand-ins that print the signal they got and exit 0). Catches a
  launcher that dies on the signal itself (its processes are left to PR_SET_PDEATHSIG's SIGTERM, and a
  Ctrl-C is turned into a SIGTERM) or passes it to one process only."""
  waiter = ("import signal, sys\n"
            "def stop(signum, frame):\n"
            "  print(signal.Signals(signum).name, flush=True); sys.exit(0)\n"
            "signal.signal(signal.SIGTERM, stop); signal.signal(signal.SIGINT, stop)\n"
            "print('up', flush=True); signal.pause()")
  previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
  try:
    for sig in (signal.SIGTERM, signal.SIGINT):
      procs = start(waiter, waiter)
      launch.forward_stop_signals(procs)
      os.kill(os.getpid(), sig)
      try:
        got = [p.communicate(timeout=10)[0] for p in procs]
      finally:
        for p in procs:
          p.kill()
      assert got == [f"{sig.name}\n"] * 2 and [p.returncode for p in procs] == [0, 0]
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
