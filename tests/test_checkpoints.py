"""Checkpoints: exact resume (also after SIGKILL), preemption, damaged and foreign checkpoints, export."""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax import models
from dcgan_jax import sampling
from dcgan_jax import train
from dcgan_jax.config import Config, ConfigError
from helpers import ROOT, cli_env, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end and multi-device runs: not in the fast tier


def settings(data_dir, **overrides):
  return dict(dict(dataset="fashion_mnist", data_dir=data_dir, batch_size=8, latent_dim=32,
                   preset="dcgan", image_size=32, base_width=8,
                   log_every=2, sample_every=1000, checkpoint_every=3), **overrides)


def saved_state(workdir, step):
  return checkpoints.read_state_numpy(workdir, step)[0]


def assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_checkpoint_of_other_settings_is_refused(tiny_data_dir, tmp_path):
  """Resuming with a setting that changes the computation (latent_dim) is one ConfigError naming the
  difference, and the checkpoint stays; the refusal comes before the dataset is opened (here from a
  data_dir that does not exist: its error would come first otherwise). Catches a resume that loads
  weights into another model or overwrites the run, and one refused only after the data load."""
  workdir = str(tmp_path)
  train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=3)), workdir)
  with pytest.raises(ConfigError, match=r"latent_dim: 32 -> 16.*another --workdir") as e:
    train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=6, latent_dim=16)), workdir)
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"latent_dim: 32 -> 16"):
    train.train_and_evaluate(Config(**settings(str(tmp_path / "no_data"), num_steps=6, latent_dim=16)), workdir)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))  # untouched


def test_provenance_and_generator_export(tiny_data_dir, tmp_path):
  """A checkpoint's provenance records package versions, the config, process and device counts; the
  generator export holds exactly G's parameters and statistics and its config, and its images equal the
  sampler's. Catches an export of the raw generator's or stale weights, and provenance without the versions
  needed to reproduce a run."""
  workdir = str(tmp_path)
  [state] = train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=3)), workdir)
  prov = read_json(os.path.join(workdir, "checkpoints", "3", "provenance", "metadata"))
  for key in ("jax", "jaxlib", "flax", "optax", "orbax", "numpy", "tensorflow_datasets"):
    assert prov["versions"][key]
  assert prov["config"]["latent_dim"] == 32 and prov["process_count"] == 1
  assert prov["device_count"] == 4 and prov["device_kind"]
  generator, variables, config, step = checkpoints.load_generator(os.path.join(workdir, "generator"))
  assert step == 3 and config.latent_dim == 32
  assert_bitwise_equal(jax.device_get(variables),
                       jax.device_get({"params": state.g.params, "batch_stats": state.g.batch_stats}))
  z = jax.random.normal(jax.random.key(0), (5, 32))
  images = generator.apply(variables, z, train=False)
  assert images.shape == (5, 32, 32, 1)
  np.testing.assert_allclose(images, sampling.make_sampler(models.build_models(config.resolved(), 1)[0])(state.g, z), atol=1e-5)


def start(args):
  return subprocess.Popen([sys.executable, "-m", "dcgan_jax.main"] + args, cwd=ROOT, env=cli_env(2),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path, proc, timeout=300):
  t0 = time.time()
  while not os.path.exists(path):
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    assert time.time() - t0 < timeout, f"{path} did not appear"
    time.sleep(0.05)


def _cli_args(data_dir, workdir, num_steps=12):
  return ["--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--workdir={workdir}", "--batch_size=8",
          "--preset=dcgan", "--image_size=32", "--base_width=8", "--latent_dim=32", f"--num_steps={num_steps}", "--checkpoint_every=2", "--log_every=4",
          "--sample_every=1000"]


def test_stop_and_resume_is_bitwise_with_every_stateful_variant_and_a_damaged_newest_is_skipped(
    tiny_data_dir, tmp_path, caplog):
  """Every piece of state a step carries at once: --compute_dtype=bfloat16, --d_norm=spectral with the
  wasserstein loss, the gradient penalty (its interpolation weights drawn per step and example) and lazy
  R1 every 3 steps. Stopped at step 2 and resumed to 4, the run is bitwise the uninterrupted one, with one
  metrics line per logged step; its checkpoints hold only float32 arrays (the tree of a float32 run's);
  every D layer's power-iteration vector `spectral_u` is in D's batch_stats and moves from step to step.
  A newest checkpoint whose files are emptied is moved aside with a warning and the run resumes from the
  one before, ending bitwise the same. Catches a resume that repeats or skips steps, metrics lines
  duplicated by the resume, a state cast to the compute dtype (smaller checkpoints that a float32 run
  could not resume, lost precision in the updates), spectral vectors left out of the state (a resume
  would restart them) or never advanced, interpolation weights drawn from a state a resume does not
  restore, the lazy R1's schedule counted from the resume instead of the step (2 is not a multiple of
  3), and a damaged checkpoint that ends the run."""
  variant = dict(compute_dtype="bfloat16", d_norm="spectral", loss="wasserstein", gp_weight=10.0,
                 r1_weight=1.0, r1_every=3, checkpoint_every=2, log_every=2)
  straight, resumed, f32 = str(tmp_path / "straight"), str(tmp_path / "resumed"), str(tmp_path / "f32")
  train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=4, **variant)), straight)
  train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=2, **variant)), resumed)
  with caplog.at_level("INFO"):
    train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=4, **variant)), resumed)
  assert "Resuming from step 2" in caplog.text
  final = saved_state(straight, 4)
  assert int(final["step"]) == 4
  assert_bitwise_equal(final, saved_state(resumed, 4))
  assert [l["step"] for l in read_jsonl(os.path.join(resumed, "metrics.jsonl"))] == [2, 4]

  train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=2, **dict(variant, compute_dtype="float32"))),
                           f32)
  dtypes = {str(np.asarray(x).dtype) for x in jax.tree.leaves(final)}
  assert dtypes == {"float32", "int32", "uint32"}, dtypes  # (step and Adam's count; the key's data)
  assert jax.tree.structure(final) == jax.tree.structure(saved_state(f32, 2))
  assert not np.array_equal(saved_state(f32, 2)["g"]["params"]["Dense_0"]["kernel"],
                            saved_state(straight, 2)["g"]["params"]["Dense_0"]["kernel"])  # it was bf16

  vectors = {name: v["spectral_u"] for name, v in final["d"]["batch_stats"].items() if "spectral_u" in v}
  assert sorted(vectors) == [f"Conv_{i}" for i in range(4)], final["d"]["batch_stats"].keys()
  first = saved_state(straight, 2)["d"]["batch_stats"]
  # (Conv_3 has one output feature: its vector is +-1, a fixed point.)
  assert all(not np.array_equal(first[name]["spectral_u"], u) for name, u in vectors.items() if u.size > 1)

  # Damage the newest checkpoint: it is moved aside with a warning, training resumes from step 2.
  for root, _, files in os.walk(os.path.join(resumed, "checkpoints", "4", "state")):
    for name in files:
      open(os.path.join(root, name), "wb").close()
  caplog.clear()
  with caplog.at_level("INFO"):
    train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=4, **variant)), resumed)
  assert "checkpoints/4 is unreadable" in caplog.text and "Resuming from step 2" in caplog.text
  assert os.path.isdir(os.path.join(resumed, "checkpoints", "4.unreadable"))
  assert_bitwise_equal(final, saved_state(resumed, 4))


def _main_job_args(data_dir, workdir, evaluators):
  """The main job's setup, small: the mnist preset (dropout), EMA, evaluation with best/."""
  return ["--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--workdir={workdir}", "--preset=mnist",
          "--batch_size=8", "--latent_dim=16", "--g_ema_decay=0.99", "--num_steps=60",
          "--checkpoint_every=15", "--log_every=15", "--sample_every=1000", "--eval_every=15",
          "--eval_samples=16", f"--evaluator_dir={evaluators}"]


def test_main_job_setup_resumes_exactly_after_sigterm_and_sigkill(tiny_data_dir, tmp_path):
  """The main job's own setup (mnist preset with dropout, EMA, --eval_every with best/): a run stopped
  by SIGTERM after its first checkpoint, restarted, SIGKILLed once it has a newer one and restarted
  again ends with the uninterrupted run's state bit for bit (EMA included), the same evaluation lines
  (no duplicated or lost ones) and the same best/ step. Catches an evaluation run at the stop step (an
  extra line, maybe another best/), a resume that loses EMA or dropout keys, evaluation lines the killed
  run wrote after its checkpoint, and best/ forgotten across a restart."""
  evaluators = str(tmp_path / "evaluators")
  straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
  r = run_cli(_main_job_args(tiny_data_dir, straight, evaluators))
  assert r.returncode == 0, r.stderr[-3000:]
  proc = start(_main_job_args(tiny_data_dir, interrupted, evaluators))
  wait_for(os.path.join(interrupted, "checkpoints", "15"), proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate()[0]
  assert proc.returncode == 0 and "Stopped by SIGTERM at step" in out, out[-3000:]
  stopped = int(out.split("Stopped by SIGTERM at step ")[1].split()[0].rstrip(";"))
  assert stopped < 30, "too late to test"
  proc = start(_main_job_args(tiny_data_dir, interrupted, evaluators))
  wait_for(os.path.join(interrupted, "checkpoints", "30"), proc)
  proc.send_signal(signal.SIGKILL)
  out = proc.communicate()[0]
  assert f"Resuming from step {stopped}" in out, out[-3000:]
  r = run_cli(_main_job_args(tiny_data_dir, interrupted, evaluators))
  assert r.returncode == 0 and "Resuming from step" in r.stderr, r.stderr[-3000:]
  evaluations = {w: [l for l in read_jsonl(os.path.join(w, "metrics.jsonl")) if "fid" in l]
                 for w in (straight, interrupted)}
  assert [l["step"] for l in evaluations[straight]] == [15, 30, 45, 60]
  assert evaluations[interrupted] == evaluations[straight]
  assert os.listdir(os.path.join(interrupted, "best")) == os.listdir(os.path.join(straight, "best"))
  assert_bitwise_equal(saved_state(straight, 60), saved_state(interrupted, 60))


def test_a_full_disk_is_one_line_and_the_workdir_resumes(tiny_data_dir, tmp_path):
  """The workdir on a 1 MB file system (room for one checkpoint): exit 2 with one line naming the
  directory and the step to resume from, no traceback; the workdir, moved to a disk with room, resumes
  from that step and finishes. Catches the ~70 tracebacks of orbax's writer threads ending in exit 1,
  and a failed save that leaves something the resume trips over. Needs permission to mount a tmpfs
  (root, as on the machines the suite is developed on); skipped elsewhere."""
  import shutil
  small = tmp_path / "small"
  small.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a small tmpfs here (needs root)")
  try:
    run_args = lambda w: _cli_args(tiny_data_dir, w, num_steps=40) + ["--checkpoint_every=5"]
    r = run_cli(run_args(str(small / "run")))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "the disk is full" in errors[0], r.stderr[-3000:]
    assert "resume from step " in errors[0], errors[0]
    resume_step = int(errors[0].split("resume from step ")[1])
    shutil.copytree(small / "run", tmp_path / "moved")
  finally:
    subprocess.run(["umount", str(small)], check=True)
  r = run_cli(run_args(str(tmp_path / "moved")))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"Resuming from step {resume_step}" in r.stderr
