"""The command line, end to end, in subprocesses (as a user runs it)."""
import glob
import json
import os

import jax
import numpy as np
import pytest

from helpers import read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end and multi-device runs: not in the fast tier

run = run_cli


def test_training_run_under_mock_data_writes_metrics_events_and_samples(tmp_path):
  # A bare flagfile name is looked up in experiments/; later flags override it.
  """The main command under tfds.testing.mock_data with a shipped flagfile (later flags override it) writes
  metrics at each log step with no NaN, the final evaluation, config.json (settings, devices, the code's git
  commit) and the EMA and raw sample grids with the GIF. Catches flags after --flagfile ignored, a first
  rate written as NaN, and missing outputs."""
  r = run(["--flagfile=mnist.flags", f"--workdir={tmp_path}", "--batch_size=16", "--num_steps=4",
           "--log_every=2", "--sample_every=3", "--num_samples=9"], mocked_examples=64)
  assert r.returncode == 0, r.stderr[-3000:]
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  evals = [l for l in lines if "fid" in l]  # mnist.flags evaluates every 500 steps and at the end
  lines = [l for l in lines if "fid" not in l]
  assert [l["step"] for l in lines] == [2, 4] and [l["step"] for l in evals] == [4]
  for l in lines:
    for k in ("d_loss", "g_loss", "d_real", "d_fake", "steps_per_sec", "images_per_sec"):
      assert k in l
    assert all(v == v for v in l.values())  # no NaN
  assert lines[0]["d_loss"] != lines[1]["d_loss"]
  config = read_json(tmp_path / "config.json")
  assert config["config"]["batch_size"] == 16 and config["config"]["image_size"] == 28
  assert config["run"]["devices"] == 2
  from dcgan_jax import checkpoints  # the code's version, for dcgan_jax.study's grouping
  assert config["run"]["git_commit"] == checkpoints.git_commit()
  # mnist.flags keeps an EMA generator: its grids, the raw generator's, and the GIF of the former.
  assert sorted(os.listdir(tmp_path / "samples")) == ["progress.gif", "raw_step_00000003.png",
                                                       "raw_step_00000004.png", "step_00000003.png",
                                                       "step_00000004.png"]
  from PIL import Image
  with Image.open(tmp_path / "samples" / "step_00000004.png") as grid:
    assert grid.size == (3 * 30 + 2, 3 * 30 + 2)
  events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 1000  # scalars and an image
  assert "step 4/4" in r.stderr and "ETA" in r.stderr
  # The console: our own lines, not tfds' or orbax's INFO chatter (--verbosity=1 would show it).
  assert "Load dataset info" not in r.stderr and "orbax" not in r.stderr


@pytest.mark.parametrize("args,expected", [
    (["--dataset=no_such_dataset"], "--dataset='no_such_dataset': not a tfds dataset"),
    (["--preset=resnet"], "--preset='resnet': unknown value; use one of mnist, dcgan"),
    (["--image_size=32"], "--image_size=32: the mnist preset"),
    (["--preset=dcgan", "--image_size=48"], "--image_size=48: the dcgan preset needs a power of two"),
    (["--batch_size=0"], "--batch_size=0: must be a whole number in [1, 1,048,576]"),
    (["--batch_size=abc"], "--batch_size"),
    (["--learning_rate_g=-1"], "--learning_rate_g=-1.0: must be > 0"),
    (["--loss=relativistic"], "--loss='relativistic': unknown value"),
    (["--flagfile=nope.flags"], "--flagfile=nope.flags: file not found"),
    (["--batch_size=7"], "must be divisible by the number of devices"),
])
def test_bad_input_gives_one_line_error_and_nonzero_exit(tmp_path, args, expected):
  """Each kind of bad command-line input ends with one `error:` line containing the expected text, exit 2
  and no traceback. Catches a bad value that surfaces as a traceback from deep inside JAX or tfds, or exits
  0."""
  mocked = 64 if args == ["--batch_size=7"] else None
  r = run([f"--workdir={tmp_path}", "--num_steps=1"] + args, mocked_examples=mocked, timeout=300)
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and expected in errors[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_download_failure_names_the_offline_command(monkeypatch):
  """A dataset that cannot be downloaded is one DataUnavailableError line naming the prepare_data command
  that imports it offline. Catches tfds's own multi-line exception reaching the user."""
  import tensorflow_datasets as tfds
  from dcgan_jax.datasets import input_pipeline
  from dcgan_jax.config import Config

  def offline(*args, **kwargs):
    raise ConnectionError("Failed to resolve 'storage.googleapis.com'")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(input_pipeline.DataUnavailableError) as e:
    input_pipeline.get_builder(Config(dataset="mnist", data_dir="/nonexistent/tfds"))
  assert "python -m dcgan_jax.prepare_data --dataset=mnist" in str(e.value) and "\n" not in str(e.value)


def test_benchmark_prints_one_json_line_without_tensorflow():
  """The benchmark runs with TensorFlow, tfds and tensorboardX made unimportable (as on the GPU machine) and
  prints one JSON line with its measurements and settings. Catches the training core importing TensorFlow or
  tfds, a benchmark that ignores --compute_dtype, --steps_per_call or --invariant_groups, and groups
  without XLA:GPU's deterministic mode."""
  import subprocess
  import sys
  from helpers import ROOT, cli_env
  code = ("import sys, runpy; sys.argv = ['benchmark', '--batch_size=8', '--steps=2', '--warmup=0', "
          "'--num_examples=64', '--compute_dtype=bfloat16', '--steps_per_call=2', '--invariant_groups=4']; "
          "runpy.run_module('dcgan_jax.benchmark', run_name='__main__')\n")
  # Poison TensorFlow, tfds and tensorboardX (the GPU machine has none of them): the training core and
  # the benchmark must not import them.
  code = ("import sys; sys.modules.update(tensorflow=None, tensorflow_datasets=None, tensorboardX=None)\n"
          + code)
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(2), capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  for key in ("images_per_sec", "sec_per_step", "compile_sec", "backend", "device_kind", "batch_size",
              "peak_memory_bytes"):
    assert key in result
  assert result["batch_size"] == 8 and result["devices"] == 2 and result["finite"]
  assert result["compute_dtype"] == "bfloat16" and result["steps"] == 2 and result["steps_per_call"] == 2
  assert result["multi_step"] == "dispatch"  # the CPU default
  # --invariant_groups turns on XLA:GPU's deterministic mode before JAX starts (cli.run); the final
  # state's digest is what two accelerator runs compare.
  assert result["invariant_groups"] == 4 and "--xla_gpu_deterministic_ops=true" in result["xla_flags"]
  assert len(result["state_sha256"]) == 64


@pytest.mark.parametrize("name", ["mnist.flags", "fashion_mnist.flags", "cifar10.flags", "celeb_a.flags"])
def test_every_shipped_flagfile_parses_and_trains_one_step_at_its_resolution(name, tmp_path):
  """Each flagfile in dcgan_jax/flagfiles parses into a valid Config and trains one step on mock data of
  its dataset, at its resolution and with its model (only the batch is made small and evaluation left
  out). Catches a flagfile with an unknown or misspelt flag, an invalid value, or a model that does not
  build or train at the flagfile's size."""
  import tensorflow_datasets as tfds
  from absl import flags
  from dcgan_jax import cli
  from dcgan_jax import config as config_lib
  from dcgan_jax import train
  values = flags.FlagValues()
  config_lib.define_flags(flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(["prog", f"--flagfile={os.path.join(cli.FLAGFILES_DIR, name)}"])
  config = config_lib.from_flags(flag_values=values)
  expected_size = {"mnist.flags": 28, "fashion_mnist.flags": 28, "cifar10.flags": 32, "celeb_a.flags": 64}
  assert config.resolved().image_size == expected_size[name] and values["workdir"].value
  import dataclasses
  config = dataclasses.replace(config, batch_size=4, num_steps=1, eval_every=0, sample_every=1,
                               num_samples=4)
  with tfds.testing.mock_data(num_examples=8):
    [state] = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 1
  line = read_jsonl(tmp_path / "metrics.jsonl")[0]
  assert line["step"] == 1 and np.isfinite(line["d_loss"]) and np.isfinite(line["g_loss"])


def test_diverging_run_exits_with_one_line_and_no_checkpoint_of_the_bad_state(tmp_path):
  """A run whose losses become non-finite stops with exit status 2 and one line naming the first bad
  step, and never checkpoints a state from that step on (checkpoints every step here). Catches a
  non-finite check that runs after the checkpoint is written, or not at all."""
  r = run([f"--workdir={tmp_path}", "--dataset=mnist", "--batch_size=8", "--latent_dim=16",
           "--num_steps=20", "--checkpoint_every=1", "--log_every=1", "--sample_every=1000",
           "--learning_rate_d=1e35", "--learning_rate_g=1e35"], mocked_examples=32)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and errors[0].startswith("error: training diverged at step "), r.stderr[-2000:]
  bad_step = int(errors[0].split("at step ")[1].split(":")[0])
  assert "Traceback" not in r.stderr
  from dcgan_jax import checkpoints
  from dcgan_jax import workdir
  saved = workdir.checkpoint_steps(str(tmp_path))
  assert all(s < bad_step for s in saved), (saved, bad_step)
  for s in saved:
    state, _ = checkpoints.read_state_numpy(str(tmp_path), s)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state) if np.asarray(x).dtype.kind == "f")


def test_git_commit_is_what_git_says():
  """checkpoints.git_commit() records HEAD of this checkout, with -dirty exactly when git reports
  modified tracked files. Catches a commit read from the wrong directory or a wrong dirty flag."""
  import subprocess
  from dcgan_jax import checkpoints
  from helpers import ROOT
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
  if head.returncode:
    pytest.skip("not a git checkout")
  dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()
  assert checkpoints.git_commit() == head.stdout.strip() + ("-dirty" if dirty else "")


def test_offline_download_fails_within_seconds(tmp_path, monkeypatch):
  """A dataset that is not on disk, on a machine without network (here: no host resolves), ends with
  the one-line error naming the offline command within seconds, not after tfds' minutes of retries with
  backoff. Catches a download attempted with tfds' full retries while offline."""
  import socket
  import time
  from dcgan_jax.datasets import input_pipeline
  from dcgan_jax.config import Config

  def no_network(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  t0 = time.time()
  with pytest.raises(input_pipeline.DataUnavailableError, match="python -m dcgan_jax.prepare_data"):
    input_pipeline.get_builder(Config(dataset="mnist", data_dir=str(tmp_path)))
  assert time.time() - t0 < 30


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  """--workdir naming an existing file: one line, exit 2, and the file untouched. Catches a run that
  ends in a NotADirectoryError traceback (or writes over the file)."""
  path = tmp_path / "notes.txt"
  path.write_text("keep me")
  r = run([f"--workdir={path}", "--num_steps=1"], timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "is a file, not a directory" in errors[0]
  assert path.read_text() == "keep me"


def test_closed_loop_noise_is_dropped_and_other_unraisable_errors_are_not(capsys, monkeypatch):
  """cli's unraisable hook drops the "Event loop is closed" errors that orbax's callbacks raise while a
  failed save shuts down (a traceback each, after the run's one-line error), and passes every other
  unraisable error to Python's default hook. Catches a hook that hides everything, or nothing."""
  import gc
  import sys
  from dcgan_jax import cli
  monkeypatch.setattr(sys, "unraisablehook", cli._quiet_unraisable)  # pylint: disable=protected-access

  class RaisesWhenCollected:
    def __init__(self, error):
      self.error = error

    def __del__(self):
      raise self.error

  RaisesWhenCollected(RuntimeError("Event loop is closed"))
  gc.collect()
  assert "Event loop is closed" not in capsys.readouterr().err
  RaisesWhenCollected(ValueError("something else"))
  gc.collect()
  assert "something else" in capsys.readouterr().err


def test_a_second_trainer_on_a_workdir_in_use_is_refused_and_a_killed_one_holds_nothing(tmp_path):
  """While a process holds the workdir's lock (workdir.hold_lock, what every trainer takes), a trainer
  started on that workdir ends with one line naming the holder's pid, exit 2, and writes nothing; once
  the holder is SIGKILLed, the same command trains. Catches a trainer that takes no lock (two runs
  interleave checkpoints and metrics), and a lock file that outlives a killed process (a pid file that
  blocks every later run). A workdir below a file is one line too."""
  import subprocess
  import sys
  from helpers import ROOT
  workdir = tmp_path / "run"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dcgan_jax import workdir; "
                             "lock = workdir.hold_lock(sys.argv[1]); print('held', flush=True); "
                             "time.sleep(600)", str(workdir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    train = ["--flagfile=mnist.flags", f"--workdir={workdir}", "--batch_size=16", "--num_steps=2"]
    r = run(train, mocked_examples=64)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "in use by a training run" in errors[0] and f"pid {holder.pid} " in errors[0]
    assert sorted(os.listdir(workdir)) == ["run.lock"]
  finally:
    holder.kill()
    holder.wait()
  r = run(train, mocked_examples=64)
  assert r.returncode == 0, r.stderr[-2000:]
  assert os.path.exists(workdir / "checkpoints" / "2")
  (tmp_path / "notes.txt").write_text("keep me")
  r = run([f"--workdir={tmp_path / 'notes.txt' / 'run'}", "--num_steps=1"], timeout=300)
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert r.returncode == 2 and len(errors) == 1 and "cannot be written" in errors[0], r.stderr[-2000:]
