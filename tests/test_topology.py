"""Results depend on (seed, global batch), not on the number of devices or processes."""
import os
import signal

import jax
import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax import workdir as workdir_lib
from helpers import (child_pid, launch, launched_output, logged_so_far, process_output, read_jsonl, run_cli,
                     wait_until)

pytestmark = pytest.mark.slow  # end-to-end and multi-device runs: not in the fast tier


def args(data_dir, workdir, batch_size=8, invariant_groups=0, num_steps=20):
  return ["--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--workdir={workdir}",
          f"--batch_size={batch_size}", f"--invariant_groups={invariant_groups}", "--latent_dim=32",
          f"--num_steps={num_steps}", f"--checkpoint_every={num_steps}", "--log_every=1",
          "--sample_every=1000"]


def losses(workdir):
  return [(l["d_loss"], l["g_loss"]) for l in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def parameters(state):
  """All parameters: weights and BatchNorm statistics (not the optimizer moments)."""
  return {"g": state["g"]["params"], "d": state["d"]["params"], "g_bn": state["g"]["batch_stats"]}


def run_topologies(cli_args, tmp_path, devices):
  """Runs the same command on 1 process x n devices for each n. Returns {"1xn": workdir}."""
  runs = {}
  for n in devices:
    workdir = str(tmp_path / f"devices{n}")
    r = run_cli(cli_args(workdir), devices=n)
    assert r.returncode == 0, r.stderr[-3000:]
    runs[f"1x{n}"] = workdir
  return runs


def test_without_groups_topologies_differ_by_amplified_rounding(tiny_data_dir, tmp_path):
  """The default (fastest) mode: the same math on 1 and 4 devices, other float rounding.
  Catches topologies that differ by more than rounding (gradients or BatchNorm statistics not averaged
  over the global batch)."""
  runs = run_topologies(lambda w: args(tiny_data_dir, w), tmp_path, devices=(1, 4))
  reference, _ = checkpoints.read_state_numpy(runs["1x4"])
  state, step = checkpoints.read_state_numpy(runs["1x1"])
  assert step == 20
  gap = checkpoints.relative_l2(parameters(state), parameters(reference))
  loss_gaps = [max(abs(d - d_ref), abs(g - g_ref))
               for (d, g), (d_ref, g_ref) in zip(losses(runs["1x1"]), losses(runs["1x4"]))]
  print("per-step loss gaps 1x1 vs 1x4:", " ".join(f"{x:.0e}" for x in loss_gaps))
  print("relative L2 1x1 vs 1x4 after 20 steps:", gap)
  assert len(loss_gaps) == 20
  # Step 1's losses (D's first update; G's loss already sees it) agree to rounding: the data, noise,
  # dropout masks and BatchNorm statistics are those of the global batch on both, and D's gradients are
  # averaged over it. Measured 1.2e-7; 1e-2 with the gradients not averaged over devices (step.py's
  # `average` made the identity); ~1e-2 for a per-device BatchNorm, key or data order.
  assert loss_gaps[0] < 1e-6, loss_gaps
  # From then on Adam turns the rounding noise of near-zero gradients into full lr-sized steps (its
  # first step is +-lr for every gradient, whose sign rounding may flip), and GAN training amplifies the
  # difference ~1.5x per step, by an amount that depends on the batches drawn. Measured (python -m pytest
  # -s prints them): step 2 3e-5, the largest gap over 20 steps 8e-3, relative L2 after 20 steps 1.9e-3.
  # Not averaging the gradients (above): 2e-2 at step 2, 0.1 at most, relative L2 1.3e-2. This is what
  # --invariant_groups removes.
  assert loss_gaps[1] < 1e-3 and max(loss_gaps) < 3e-2, loss_gaps
  assert 0 < gap <= 5e-3, gap


def test_a_process_that_dies_ends_the_others_and_a_sigterm_to_one_stops_all_then_any_topology_resumes(
    tiny_data_dir, tmp_path):
  """2 processes x 2 devices (dcgan_jax.launch, --invariant_groups=8):
  1. SIGKILL to process 1: the launcher ends process 0, which prints its own one line naming the step
     to resume from, well before JAX's heartbeat timeout would abort it (a survivor with no line, or one
     that waits for the grace's SIGKILL, fails), and exits 137 with one line naming process 1 and the
     step to resume from (no hang, no stack trace);
  2. launched again, both resume from that checkpoint; SIGTERM to process 1 only: both stop after the
     same step, write one checkpoint together and exit 0;
  3. the run continued on 1 process x 1 device ends bitwise equal to an uninterrupted 1-device run.
  Catches survivors that wait forever, an abort with a C++ stack trace, a half-written checkpoint that
  blocks the resume, a process that stops on its own signal alone (the other waits forever in a
  collective, or they checkpoint different steps), and a resume that cannot change topology. (The
  launcher passing its own SIGTERM on to every process: test_launch.py.)"""
  workdir = str(tmp_path / "run")
  run = lambda steps: args(tiny_data_dir, workdir, invariant_groups=8, num_steps=steps) + [
      "--checkpoint_every=10", "--heartbeat_timeout=90"]
  metrics = os.path.join(workdir, "metrics.jsonl")

  launcher = launch(run(100_000), tmp_path / "killed.log")
  try:
    # Between saves, so that the newest complete checkpoint is known (10): a step takes ~0.5 s here.
    wait_until(launcher, lambda: len(logged_so_far(metrics)) >= 12
             and os.path.exists(os.path.join(workdir, "checkpoints", "10")))
    os.kill(child_pid(launcher, 1), signal.SIGKILL)
  finally:
    out = launched_output(launcher, timeout=45)  # the launcher's grace: 10 s; JAX's heartbeat: 90 s
  assert launcher.returncode == 128 + signal.SIGKILL, out[-3000:]
  assert "Traceback" not in out and "Fatal Python error" not in out, out[-3000:]
  # Process 0 either saw its collective fail, or sat in it until the launcher told it (SIGUSR1; gloo
  # does not always notice a dead peer): either way its one line names the step to resume from.
  errors = [l for l in process_output(out, 0).splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "process 0 of 2: lost another process" in errors[0] and \
      "resume from step 10 " in errors[0], out[-3000:]
  assert out.splitlines()[-1].startswith("error: process 1 of 2 was killed by SIGKILL; the others were "
                                         "ended; run the same command again to resume from step 10 "), out[-3000:]

  launcher = launch(run(100_000), tmp_path / "stopped.log")
  try:
    wait_until(launcher, lambda: max([l["step"] for l in logged_so_far(metrics)] or [0]) > 12)
    os.kill(child_pid(launcher, 1), signal.SIGTERM)
  finally:
    out = launched_output(launcher, timeout=120)
  assert launcher.returncode == 0, out[-3000:]
  assert all("Resuming from step 10" in process_output(out, i) for i in (0, 1))
  stopped = [int(process_output(out, i).split("Stopped by SIGTERM at step ")[1].split()[0].rstrip(";"))
             for i in (0, 1)]
  assert stopped[0] == stopped[1] > 12, stopped
  step = stopped[0]
  assert workdir_lib.checkpoint_steps(workdir)[-1] == step

  total = step + 4
  r = run_cli(run(total), devices=1)  # the same run, continued on 1 process x 1 device
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from step {step}" in r.stderr
  assert "Topology changed: the checkpoint of step" in r.stderr and "by 2 process(es) with 4" in r.stderr
  straight = str(tmp_path / "straight")
  r = run_cli(args(tiny_data_dir, straight, invariant_groups=8, num_steps=total), devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = checkpoints.read_state_numpy(workdir)[0], checkpoints.read_state_numpy(straight)[0]
  assert int(a["step"]) == total
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_evaluation_split_over_2_processes_gives_the_1_process_numbers(tiny_data_dir, tmp_path):
  """--eval_every with --invariant_groups=8 (the same generator on every topology), first on 2
  processes x 2 devices with an empty evaluator cache: process 0 trains and caches the evaluator while
  process 1 waits, then loads it (one evaluator in the cache, no temporary leftovers). Their FID, KID and
  class metrics, each process generating and embedding half of the 17 samples, then equal a single
  process's on all of them. Catches every process training the evaluator at once and racing to rename
  its copy into the cache (the loser crashed), a process scoring only its own share (another sample
  set: another FID), and shares that overlap or drop the odd sample. (Row order is not checked: these
  metrics do not depend on it.)"""
  cache = tmp_path / "evaluators"
  cli_args = lambda w: args(tiny_data_dir, w, batch_size=8, invariant_groups=8, num_steps=4) + [
      "--eval_every=2", "--eval_samples=17", f"--evaluator_dir={cache}"]
  launcher = launch(cli_args(str(tmp_path / "processes2")), tmp_path / "cold.log")
  out = launched_output(launcher, timeout=600)
  assert launcher.returncode == 0, out[-3000:]
  outs = [process_output(out, i) for i in (0, 1)]
  assert "Training the fashion_mnist evaluator" in outs[0]
  assert "Training the fashion_mnist evaluator" not in outs[1] and "Waiting for process 0" in outs[1]
  assert len(os.listdir(cache)) == 1 and not os.listdir(cache)[0].startswith(".tmp")
  runs = dict(run_topologies(cli_args, tmp_path, devices=(1,)),
              **{"2x2": str(tmp_path / "processes2")})
  scored = {name: [l for l in read_jsonl(os.path.join(w, "metrics.jsonl")) if "fid" in l]
            for name, w in runs.items()}
  assert [l["step"] for l in scored["2x2"]] == [2, 4]
  for one, two in zip(scored["1x1"], scored["2x2"], strict=True):
    for key in ("fid", "kid", "coverage", "class_kl"):
      assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), (key, one, two)


def test_a_non_finite_loss_stops_every_process_at_the_same_step(tiny_data_dir, tmp_path):
  """2 processes x 2 devices with learning rates that diverge: each process ends with the same one line
  naming the same first non-finite step, exit 2, and the launcher with exit 2; no checkpoint of that
  step or later. Catches a per-process check that lets one process stop while the other waits in the
  next step's collectives, and a non-finite state written by some process."""
  workdir = str(tmp_path / "run")
  launcher = launch(args(tiny_data_dir, workdir, num_steps=20) + [
      "--checkpoint_every=1", "--learning_rate_d=1e35", "--learning_rate_g=1e35"], tmp_path / "nan.log")
  out = launched_output(launcher, timeout=300)
  assert launcher.returncode == 2, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  errors = [[l for l in process_output(out, i).splitlines() if l.startswith("error: ")] for i in (0, 1)]
  assert all(len(e) == 1 and e[0].startswith("error: training diverged at step ") for e in errors), out[-3000:]
  assert errors[0] == errors[1]
  bad_step = int(errors[0][0].split("at step ")[1].split(":")[0])
  assert all(s < bad_step for s in workdir_lib.checkpoint_steps(workdir)), bad_step
