"""Many runs in one program (--seeds): each member is the single run of its seed."""
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax import members
from dcgan_jax import train
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import Config, ConfigError
from helpers import child_pid, launch, launched_output, read_json, read_jsonl, run_cli, wait_until

pytestmark = pytest.mark.slow  # end-to-end runs: not in the fast tier


def settings(data_dir, **overrides):
  """The main job's kind of run, small: the mnist preset (dropout), EMA."""
  return Config(**dict(dict(dataset="fashion_mnist", data_dir=data_dir, batch_size=8, latent_dim=16,
                            preset="mnist", g_ema_decay=0.9, log_every=1, sample_every=1000,
                            checkpoint_every=2), **overrides))


def assert_same_state(a, b, what):
  assert jax.tree.structure(a) == jax.tree.structure(b), what
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=what)


def without_speed(workdir):
  return [{k: v for k, v in m.items() if k not in ("steps_per_sec", "images_per_sec")}
          for m in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def test_members_are_the_single_runs_of_their_seeds_and_resume_from_the_step_all_have(tiny_data_dir, tmp_path):
  """--seeds=3,5 for 4 steps; seed_3's newest checkpoint then removed (a run killed between the members'
  saves of one step); continued to 8 steps, both members resume from step 2 and end bitwise equal (EMA
  and BatchNorm statistics included) to single runs with --seed=3 and --seed=5, with the same metrics
  lines. A member directory then continues alone as a single run, equal to the single run continued;
  the study table over the workdir pools the two members in one row. Catches members sharing a key, a
  data order, BatchNorm statistics or optimizer state; members resumed from different steps (they would
  drift apart from their single runs' step numbers); member directories that are not ordinary runs."""
  multi = str(tmp_path / "multi")
  train.train_and_evaluate(settings(tiny_data_dir, seeds="3,5", num_steps=4), multi)
  assert sorted(os.listdir(multi)) == ["seed_3", "seed_5"]  # no run of its own
  shutil.rmtree(os.path.join(multi, "seed_3", "checkpoints", "4"))
  train.train_and_evaluate(settings(tiny_data_dir, seeds="3,5", num_steps=8), multi)
  for seed in (3, 5):
    member, single = os.path.join(multi, f"seed_{seed}"), str(tmp_path / f"single_{seed}")
    train.train_and_evaluate(settings(tiny_data_dir, seed=seed, num_steps=8), single)
    saved = read_json(os.path.join(member, "config.json"))["config"]
    assert saved["seed"] == seed and saved["seeds"] == ""
    assert_same_state(checkpoints.read_state_numpy(member, 8)[0], checkpoints.read_state_numpy(single, 8)[0],
                      f"seed {seed}")
    assert without_speed(member) == without_speed(single), seed
    assert [m["step"] for m in read_jsonl(os.path.join(member, "metrics.jsonl"))] == list(range(1, 9))
  table = members.study_table(multi)
  assert table.splitlines()[2].startswith("| 2 | 3-5 |"), table
  for workdir in (os.path.join(multi, "seed_5"), str(tmp_path / "single_5")):
    train.train_and_evaluate(settings(tiny_data_dir, seed=5, num_steps=10), workdir)
  assert_same_state(checkpoints.read_state_numpy(os.path.join(multi, "seed_5"), 10)[0],
                    checkpoints.read_state_numpy(str(tmp_path / "single_5"), 10)[0], "seed_5 continued alone")


def test_swept_members_are_the_single_runs_of_their_values_and_a_new_member_is_refused(tiny_data_dir, tmp_path):
  """--sweep=learning_rate_d:1e-4,3e-3 with --seeds=3 for 3 steps: each member ends bitwise equal to the
  single run with that learning rate (its own compiled program), and the study table has one row per
  value. The same run with a seed added is refused in one line naming the new member, and both members'
  checkpoints are untouched. Catches members run with the first member's program (one learning rate
  for all), swept values missing from the members' config.json (study would pool them), and a new
  member restarting its run from step 0 over the others' results."""
  multi = str(tmp_path / "multi")
  swept = dict(sweep="learning_rate_d:1e-4,3e-3", seeds="3", num_steps=3, checkpoint_every=3)
  train.train_and_evaluate(settings(tiny_data_dir, **swept), multi)
  for lr in (1e-4, 3e-3):
    member, single = os.path.join(multi, f"learning_rate_d={lr!r}_seed_3"), str(tmp_path / f"single_{lr}")
    train.train_and_evaluate(settings(tiny_data_dir, seed=3, learning_rate_d=lr, num_steps=3,
                                      checkpoint_every=3), single)
    assert_same_state(checkpoints.read_state_numpy(member, 3)[0], checkpoints.read_state_numpy(single, 3)[0],
                      f"learning_rate_d={lr}")
  rows = members.study_table(multi).splitlines()[2:]
  assert [r.split(" | ")[:3] for r in rows] == [["| 0.0001", "1", "3"], ["| 0.003", "1", "3"]], rows
  before = sorted(os.listdir(multi))
  with pytest.raises(ConfigError, match="seed_4: a new member of a run whose other members are at step 3"):
    train.train_and_evaluate(settings(tiny_data_dir, **dict(swept, seeds="3,4", num_steps=6)), multi)
  assert sorted(os.listdir(multi)) == before
  for lr in (1e-4, 3e-3):
    assert workdir_lib.checkpoint_steps(os.path.join(multi, f"learning_rate_d={lr!r}_seed_3")) == [3]


def test_a_killed_two_process_multi_member_run_restarts_to_the_single_runs_with_invariant_groups(
    tiny_data_dir, tmp_path):
  """`--seeds=0,1 --invariant_groups=8 --in_memory=false` (a reader per member) on 2 processes x 2
  devices (the launcher, gloo), process 1 SIGKILLed once seed_1 has its first checkpoint, then launched
  again: each member ends bitwise equal (state, metrics lines) to the single run of its seed on 1
  device. Catches members sharing one reader (another data order), a host reader that does not resume
  at the step, a restart that loses or repeats a member's steps, metrics lines a killed run wrote after
  its checkpoint, members that save on one process only, members' saves of one step colliding in
  orbax's multi-process barriers (a hang, then an error), a member program that depends on the
  topology, and (each member being the single run's code) --invariant_groups not bitwise between 1
  device and 2 processes, a process or device reading another's positions by index, a data order that
  depends on the device or process count, or logs written by both processes. (In memory on 2 processes
  against 1 device: test_topology.py's killed-process test; 2 and 4 devices of one process:
  test_invariant.py; evaluation on 2 processes: test_topology.py.)"""
  def cli(workdir, steps, seeds):
    return ["--dataset=fashion_mnist", f"--data_dir={tiny_data_dir}", f"--workdir={workdir}", seeds,
            "--batch_size=8", "--latent_dim=16", "--g_ema_decay=0.9", "--invariant_groups=8",
            f"--num_steps={steps}", "--checkpoint_every=3", "--log_every=1", "--sample_every=1000",
            "--in_memory=false"]
  multi = str(tmp_path / "multi")
  launcher = launch(cli(multi, 100_000, "--seeds=0,1"), tmp_path / "killed.log")
  try:
    wait_until(launcher, lambda: os.path.exists(os.path.join(multi, "seed_1", "checkpoints", "3")))
    os.kill(child_pid(launcher, 1), signal.SIGKILL)
  finally:
    out = launched_output(launcher, timeout=45)
  assert launcher.returncode == 128 + signal.SIGKILL, out[-3000:]
  launcher = launch(cli(multi, 8, "--seeds=0,1"), tmp_path / "restarted.log")
  out = launched_output(launcher, timeout=600)
  assert launcher.returncode == 0 and "Resuming seed 0 from step" in out, out[-3000:]
  for seed in (0, 1):
    single, member = str(tmp_path / f"single_{seed}"), os.path.join(multi, f"seed_{seed}")
    r = run_cli(cli(single, 8, f"--seed={seed}"), devices=1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_state(checkpoints.read_state_numpy(single, 8)[0], checkpoints.read_state_numpy(member, 8)[0],
                      seed)
    assert without_speed(single) == without_speed(member), seed


def test_vmapped_members_follow_the_single_runs_within_the_rounding_band(tiny_data_dir, tmp_path):
  """--members_form=vmap (one program over a leading member axis), --seeds=3,5 for 10 steps with a stop
  and resume at 5, against the dispatched members (bitwise the single runs, above): per member, step
  1's losses within 1e-6 and the rest within the band of the device-count test (test_topology.py:
  Adam amplifies rounding), relative L2 of the parameters <= 5e-3. Catches a BatchNorm statistic or
  gradient mean taken over the member axis, members sharing a key or optimizer state, and a resume
  that restacks the members in another order (each would be ~1e-1 off, from step 1)."""
  common = dict(seeds="3,5", latent_dim=32, checkpoint_every=5, g_ema_decay=0.9)
  vmapped, dispatched = str(tmp_path / "vmapped"), str(tmp_path / "dispatched")
  train.train_and_evaluate(settings(tiny_data_dir, members_form="vmap", num_steps=5, **common), vmapped)
  train.train_and_evaluate(settings(tiny_data_dir, members_form="vmap", num_steps=10, **common), vmapped)
  train.train_and_evaluate(settings(tiny_data_dir, members_form="dispatch", num_steps=10, **common), dispatched)
  for seed in (3, 5):
    v, d = os.path.join(vmapped, f"seed_{seed}"), os.path.join(dispatched, f"seed_{seed}")
    gaps = [max(abs(a["d_loss"] - b["d_loss"]), abs(a["g_loss"] - b["g_loss"]))
            for a, b in zip(read_jsonl(os.path.join(v, "metrics.jsonl")), read_jsonl(os.path.join(d, "metrics.jsonl")))]
    state, ref = checkpoints.read_state_numpy(v, 10)[0], checkpoints.read_state_numpy(d, 10)[0]
    gap = checkpoints.relative_l2({k: state[k]["params"] for k in "gd"}, {k: ref[k]["params"] for k in "gd"})
    print(f"seed {seed}: per-step loss gaps vmap vs dispatch", " ".join(f"{x:.0e}" for x in gaps),
          f"| relative L2 after 10 steps {gap:.2e}")
    assert len(gaps) == 10 and gaps[0] < 1e-6 and gaps[1] < 1e-3 and max(gaps) < 3e-2, gaps
    assert gap <= 5e-3, gap
    assert read_json(os.path.join(v, "config.json"))["config"]["seed"] == seed
  with pytest.raises(ConfigError, match="^--members_form=vmap: the members share one dataset in device memory"):
    train.train_and_evaluate(settings(tiny_data_dir, members_form="vmap", in_memory="false", **common),
                             str(tmp_path / "by_index"))
