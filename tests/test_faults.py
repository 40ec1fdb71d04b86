"""Faults: refused commands change nothing, half-written files, damaged data, repeated signals, bounds,
interrupted imports, console noise. One test per principle of docs/training.md's "Stops and faults"."""
import glob
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax import train
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import FIELDS, Config
from helpers import ROOT, cli_env, logged_so_far, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # subprocesses and end-to-end runs


def settings(data_dir, **overrides):
  return dict(dict(dataset="fashion_mnist", data_dir=data_dir, batch_size=8, latent_dim=32, preset="dcgan",
                   image_size=32, base_width=8, log_every=1, sample_every=2, checkpoint_every=2),
              **overrides)


def flags(data_dir, workdir, **overrides):
  return [f"--{k}={v}" for k, v in settings(data_dir, **overrides).items()] + [f"--workdir={workdir}"]


def snapshot(folder) -> dict:
  """Every path under folder -> the SHA-256 of its bytes (None for a folder)."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), folder)] = None
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), folder)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def error_lines(stderr: str) -> list:
  return [l for l in stderr.splitlines() if l.startswith("error: ")]


def assert_one_line(r, status, *needles):
  assert r.returncode == status and "Traceback" not in r.stderr, r.stderr[-3000:]
  errors = error_lines(r.stderr)
  assert len(errors) == 1, r.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], errors[0]
  return errors[0]


def tool(module, args, timeout=300):
  return subprocess.run([sys.executable, "-m", f"dcgan_jax.{module}"] + args, cwd=ROOT, env=cli_env(2),
                        capture_output=True, text=True, timeout=timeout)


EVALUATED = dict(eval_every=2, eval_samples=16, g_ema_decay=0.9)


@pytest.fixture(scope="module")
def finished_run(tiny_data_dir, tmp_path_factory):
  """A 4-step run with in-training evaluation (so best/, an evaluator cache and evaluations exist)."""
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train.train_and_evaluate(Config(**settings(tiny_data_dir, num_steps=4, **EVALUATED)), workdir)
  return workdir


def test_a_refused_command_leaves_every_file_as_it_was(tiny_data_dir, finished_run, tmp_path):
  """Principle 1. For each kind of refusal (settings that differ from the checkpoint, a bad flag value,
  data that cannot be had, a checkpoint step that does not exist, an output folder that cannot be
  written) the run's directory is byte-identical afterwards, and a refused new run creates no
  directory. Catches a trainer that writes config.json (or run.lock, samples/, TensorBoard events)
  before it checks the settings against the checkpoint, and tools that create outputs before
  validating."""
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  before = snapshot(workdir)
  refusals = [
      (lambda: run_cli(flags(tiny_data_dir, workdir, num_steps=6, latent_dim=16, **EVALUATED)),
       "was written with other settings"),
      (lambda: run_cli(flags(tiny_data_dir, workdir, num_steps=6, batch_size=0, **EVALUATED)), "--batch_size=0"),
      (lambda: run_cli(flags(str(tmp_path / "no_data"), workdir, num_steps=6, **EVALUATED)),
       "could not be downloaded"),
      (lambda: tool("sample", [f"--workdir={workdir}", f"--out={workdir}/x.png", "--step=5"]),
       "--step=5: no such checkpoint"),
      (lambda: tool("evaluate", [f"--workdir={workdir}", f"--data_dir={tiny_data_dir}", "--step=5"]),
       "--step=5: no such checkpoint"),
  ]
  for refuse, needle in refusals:
    assert_one_line(refuse(), 2, needle)
    assert snapshot(workdir) == before, needle
  assert not os.path.exists(tmp_path / "no_data")  # the failed download left nothing either
  new = str(tmp_path / "new")
  assert_one_line(run_cli(flags(str(tmp_path / "no_data"), new, num_steps=2)), 2, "could not be downloaded")
  assert_one_line(run_cli(flags(tiny_data_dir, new, num_steps=2, image_size=4096)), 2, "--image_size=4096")
  assert not os.path.exists(new)


def test_a_restart_survives_every_file_cut_short(tiny_data_dir, finished_run, tmp_path, caplog):
  """Principle 2. Every file a run writes or appends to is cut short (as a kill or a full disk leaves
  it): metrics.jsonl mid-line, config.json, the TensorBoard events, the newest sample grid, the
  generator export's JSON, the best checkpoint's score, the evaluator cache, a reference statistics
  file, evaluations.jsonl. The restart trains on, warns once per repaired file, and ends with the
  uninterrupted run's state, bit for bit; every file is whole again. Catches a metrics truncation that
  json-parses every line (one torn line made every restart fail), a GIF that opens every grid, a
  cache loaded without a check, appends glued onto a torn line."""
  from dcgan_jax import evaluate as evaluate_lib
  from dcgan_jax.evaluation import evaluator
  from dcgan_jax.evaluation import scoring
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  config = Config(**settings(tiny_data_dir, num_steps=6, **EVALUATED))
  train.train_and_evaluate(config, straight)

  def cut(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
      f.truncate(max(1, int(size * keep)))

  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics, "a") as f:
    f.write('{"step": 5, "d_lo')  # a line torn by a kill (no newline)
  cut(os.path.join(workdir, "config.json"))
  for events in glob.glob(os.path.join(workdir, "tensorboard", "events.*")):
    cut(events, 0.7)
  cut(sorted(glob.glob(os.path.join(workdir, "samples", "step_*.png")))[-1])
  cut(os.path.join(workdir, "generator", "generator.json"))
  cache = glob.glob(os.path.join(os.environ["XDG_CACHE_HOME"], "dcgan_jax", "evaluators", "fashion_mnist-32x32x1*"))
  assert len(cache) == 1
  cut(os.path.join(cache[0], evaluator.VARIABLES))
  evaluations = os.path.join(workdir, "evaluations.jsonl")
  with open(evaluations, "w") as f:
    f.write('{"step": 4, "fid": 1.0}\n{"step": 4, "fi')

  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, workdir)
  warned = caplog.text
  assert "metrics.jsonl:" in warned and "not a JSON line" in warned
  assert "Evaluator cache" in warned and "unreadable" in warned
  final = lambda w: checkpoints.read_state_numpy(w, 6)[0]
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, final(straight), final(workdir))
  assert [r["step"] for r in read_jsonl(metrics)] == [r["step"] for r in read_jsonl(os.path.join(straight, "metrics.jsonl"))]
  workdir_lib.read_config(workdir)  # whole again
  with open(os.path.join(workdir, "generator", "generator.json")) as f:
    assert json.load(f)["step"] == 6
  assert os.path.getsize(os.path.join(workdir, "samples", "progress.gif")) > 0

  # The reference statistics and evaluations.jsonl, through `evaluate`'s own functions.
  ev = evaluator.load_or_train("fashion_mnist", tiny_data_dir, (32, 32, 1))
  scorer = scoring.Scorer(ev, tiny_data_dir, kid_subsets=2)
  floor = scorer.reference(16)
  cut(os.path.join(ev.path, "reference_n16.json"))
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert scorer.reference(16) == floor
  assert "reference_n16.json is unreadable" in caplog.text
  evaluate_lib.record(workdir, {"step": 6, "fid": 2.0})
  assert [r["fid"] for r in workdir_lib.read_jsonl(evaluations)] == [1.0, 2.0]


def test_damaged_data_is_one_line_naming_the_file_and_the_import_command(tiny_data_dir, tmp_path):
  """Principle 3. A record file cut short ends the run with one line naming the shard and the
  prepare_data command that rebuilds it, exit 2, before compiling (within seconds), on both data
  paths; records damaged inside a shard (found only when read, on the reader's threads) end it the same
  way. Catches a Riegeli traceback (exit 1), a check made only after compiling, and a reader thread's
  error that escapes as a traceback."""
  data_dir = str(tmp_path / "tfds")
  shutil.copytree(tiny_data_dir, data_dir)
  shard, = glob.glob(os.path.join(data_dir, "fashion_mnist", "*", "fashion_mnist-train.array_record-*"))
  pristine = open(shard, "rb").read()
  with open(shard, "wb") as f:
    f.write(pristine[:len(pristine) // 3])
  for in_memory in ("true", "false"):
    t0 = time.time()
    r = run_cli(flags(data_dir, str(tmp_path / f"w_{in_memory}"), num_steps=4, in_memory=in_memory))
    assert_one_line(r, 2, shard, "damaged or incomplete", "python -m dcgan_jax.prepare_data --dataset=fashion_mnist")
    assert time.time() - t0 < 60 and "Compiling" not in r.stderr
    assert not os.path.exists(tmp_path / f"w_{in_memory}")
  damaged = bytearray(pristine)
  damaged[3000:3100] = bytes(b ^ 0xFF for b in damaged[3000:3100])  # inside the first chunk of records
  with open(shard, "wb") as f:
    f.write(bytes(damaged))
  for in_memory in ("true", "false"):
    r = run_cli(flags(data_dir, str(tmp_path / f"v_{in_memory}"), num_steps=8, in_memory=in_memory))
    assert_one_line(r, 2, "damaged records", "python -m dcgan_jax.prepare_data --dataset=fashion_mnist")


def _catches_sigterm(pid) -> bool:
  """Whether the process has a handler for SIGTERM (/proc: SigCgt), i.e. stopping.install() ran."""
  with open(f"/proc/{pid}/status") as f:
    caught = int(next(l for l in f if l.startswith("SigCgt:")).split()[1], 16)
  return bool(caught & (1 << (signal.SIGTERM - 1)))


def _start(args, log):
  """The trainer, once it takes SIGTERM (its first action); its stderr goes to the file `log`."""
  with open(log, "w") as err:
    proc = subprocess.Popen([sys.executable, "-m", "dcgan_jax.main"] + args, cwd=ROOT, env=cli_env(2),
                            stdout=subprocess.DEVNULL, stderr=err, text=True)
  proc.log = log
  t0 = time.time()
  while not _catches_sigterm(proc.pid):
    assert proc.poll() is None and time.time() - t0 < 60, _read(log)
    time.sleep(0.01)
  return proc


def _read(path):
  with open(path) as f:
    return f.read()


def _wait_for_line(proc, text, timeout=300):
  t0 = time.time()
  while text not in _read(proc.log):
    assert proc.poll() is None and time.time() - t0 < timeout, _read(proc.log)[-3000:]
    time.sleep(0.01)


def test_signals_at_start_up_and_twice_are_clean(tiny_data_dir, tmp_path):
  """Principle 4. SIGTERM while the run is still starting (imports, data, compilation) is not lost: the
  run stops after its first call with a checkpoint, exit 0. Two Ctrl-C: the second ends the process at
  once with one line naming the checkpoint to resume from, exit 130, no traceback; two SIGTERMs: exit
  143 the same way; the restart resumes. Catches a handler installed only when training starts (the
  early signal kills the run or is swallowed), a second signal that raises KeyboardInterrupt (a
  traceback, the steps since the checkpoint lost silently), and one that ends with no line."""
  workdir = str(tmp_path / "run")
  # Slow steps (batch 32): the second signal must arrive before the first one's clean stop is done.
  args = flags(tiny_data_dir, workdir, num_steps=100_000, checkpoint_every=5, log_every=5, batch_size=32)
  proc = _start(args, tmp_path / "first.log")
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=300)
  err = _read(proc.log)
  assert proc.returncode == 0, err[-3000:]
  # The stop is agreed one call after the request (parallel.StopAgreement): the first two calls run.
  assert "Stopped by SIGTERM at step 2;" in err and workdir_lib.checkpoint_steps(workdir) == [2], err[-3000:]

  for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
    proc = _start(args, tmp_path / f"{sig.name}.log")
    metrics = os.path.join(workdir, "metrics.jsonl")
    newest = workdir_lib.checkpoint_steps(workdir)[-1]
    _wait_for_line(proc, f"Resuming from step {newest}")  # (metrics.jsonl holds the last run's lines)
    while max([r["step"] for r in logged_so_far(metrics)] or [0]) < newest + 7:  # a newer checkpoint exists
      assert proc.poll() is None, _read(proc.log)
      time.sleep(0.05)
    proc.send_signal(sig)
    _wait_for_line(proc, f"{sig.name}: stopping after the current step")  # else the kernel merges them
    proc.send_signal(sig)
    proc.wait(timeout=60)
    err = _read(proc.log)
    resume = workdir_lib.checkpoint_steps(workdir)[-1]
    assert proc.returncode == status, err[-3000:]
    errors = error_lines(err)
    assert "Traceback" not in err and len(errors) == 1, err[-3000:]
    assert f"second {sig.name}" in errors[0] and f"resume from step {resume} " in errors[0], errors[0]
  r = run_cli(args[:-1] + [f"--num_steps={resume + 2}", f"--workdir={workdir}"])
  assert r.returncode == 0 and f"Resuming from step {resume}" in r.stderr, r.stderr[-3000:]


TOOLS = ("main", "prepare_data", "evaluate", "sample", "study", "benchmark", "data_benchmark", "launch")


@pytest.mark.parametrize("name", TOOLS)
def test_every_numeric_flag_of_every_tool_has_both_bounds(name):
  """Principle 5. Every integer and float flag that a tool defines (and every numeric Config setting)
  has a lower and an upper bound, so that a value needing gigabytes, or one that wraps around, is
  refused in one line before any work. Catches a new numeric flag or setting added without bounds
  (prepare_data --image_size=100000 once grew past 3 GB before anything said no)."""
  code = (f"import dcgan_jax.{name} as m\n"
          "getattr(m, 'define_flags', lambda: None)()\n"
          "from absl import flags\n"
          "for flag in flags.FLAGS.get_flags_for_module(m):\n"
          "  parser = flag.parser\n"
          "  if flag.flag_type() in ('int', 'float') and flag.name not in ('verbosity',):\n"
          "    bounds = (getattr(parser, 'lower_bound', None), getattr(parser, 'upper_bound', None))\n"
          "    if None in bounds:\n"
          "      print(flag.name)\n")
  r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(1), capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == [], f"flags of {name} without bounds: {r.stdout.split()}"
  if name == "main":  # its Config settings: validated from their declared bounds
    for field_name, field in FIELDS.items():
      if field.type in (int, float) or str(field.type).startswith("typing.Optional[int") or \
          str(field.type).startswith("typing.Optional[float"):
        assert field.metadata["bounds"] is not None, field_name


def test_bounds_refuse_in_one_line_before_any_work(tmp_path):
  """Principle 5, behaviour. A huge image size for an import, a huge sample count, a huge Config value
  and an unwritable destination (below a file; on a read-only mount, where the machine allows a bind
  mount) are each one line, exit 2, within seconds, and nothing is written. Catches bounds that are
  declared but not enforced, and an OSError traceback from an import or a run onto a read-only mount."""
  images = tmp_path / "images"
  images.mkdir()
  for args, needle in ((["--image_dir", str(images), "--dataset=mine", f"--data_dir={tmp_path / 'd'}",
                         "--image_size=100000"], "--image_size=100000"),):
    t0 = time.time()
    assert_one_line(tool("prepare_data", args), 2, needle)
    assert time.time() - t0 < 30
  assert_one_line(tool("evaluate", ["--samples=x.npy", "--num_samples=1000000000"]), 2, "--num_samples")
  assert_one_line(run_cli([f"--workdir={tmp_path / 'w'}", "--eval_samples=100000000"]), 2, "--eval_samples")
  (tmp_path / "file").write_text("x")
  assert_one_line(tool("prepare_data", ["--image_dir", str(images), "--dataset=mine",
                                        f"--data_dir={tmp_path / 'file' / 'd'}"]), 2, "cannot be written")
  assert sorted(os.listdir(tmp_path)) == ["file", "images"]
  # A read-only mount (root writes through file modes, not through a read-only mount).
  ro = tmp_path / "ro"
  ro.mkdir()
  mounted = subprocess.run(f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro}", shell=True,
                           capture_output=True).returncode == 0
  try:
    if mounted:
      for r in (tool("prepare_data", [f"--image_dir={images}", "--dataset=mine", f"--data_dir={ro}/d"]),
                run_cli([f"--workdir={ro}/w", "--num_steps=1"])):
        assert_one_line(r, 2, f"{ro}/", "cannot be written", "read-only")
  finally:
    subprocess.run(["umount", str(ro)], capture_output=True)


def _image_folder(folder, n=300):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(folder)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))


def test_an_interrupted_import_is_named_and_cleaned_up(tmp_path):
  """Principle 6. An image import SIGKILLed while it writes leaves its .incomplete folder; training on
  that dataset then ends with one line saying the import was interrupted and naming the command that
  redoes it (not "not a tfds dataset"); the next import removes the leftover and succeeds. The same for
  a tfds builder's "incomplete.*" folder of an IDX import. Catches leftovers that nothing removes and a
  message that sends the user looking for a typo."""
  images, data_dir = str(tmp_path / "images"), str(tmp_path / "tfds")
  _image_folder(images)
  proc = subprocess.Popen([sys.executable, "-m", "dcgan_jax.prepare_data", f"--image_dir={images}",
                           "--dataset=mine", f"--data_dir={data_dir}", "--image_size=32"], cwd=ROOT,
                          env=cli_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while not glob.glob(os.path.join(data_dir, "mine", ".incomplete-*", "import_started.json")):
    assert proc.poll() is None and time.time() - t0 < 120
    time.sleep(0.005)
  proc.kill()
  proc.wait()
  left = glob.glob(os.path.join(data_dir, "mine", ".incomplete-*"))
  assert len(left) == 1
  r = run_cli(["--dataset=mine", f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w'}", "--num_steps=1"])
  assert_one_line(r, 2, "import into", "was interrupted", f"--image_dir={images} --dataset=mine")
  r = tool("prepare_data", [f"--image_dir={images}", "--dataset=mine", f"--data_dir={data_dir}",
                            "--image_size=32"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.splitlines()[-1])["images"] == 300
  assert sorted(os.listdir(os.path.join(data_dir, "mine"))) == ["1.0.0"]

  from helpers import make_idx_dir  # pylint: disable=g-import-not-at-top
  os.makedirs(tmp_path / "idx")
  make_idx_dir(str(tmp_path / "idx"))
  os.makedirs(os.path.join(data_dir, "fashion_mnist", "incomplete.AB12CD_3.0.1"))
  r = run_cli(["--dataset=fashion_mnist", f"--data_dir={data_dir}", f"--workdir={tmp_path / 'w'}"])
  assert_one_line(r, 2, "was interrupted", "python -m dcgan_jax.prepare_data --dataset=fashion_mnist")
  r = tool("prepare_data", ["--dataset=fashion_mnist", f"--idx_dir={tmp_path / 'idx'}", f"--data_dir={data_dir}"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert sorted(os.listdir(os.path.join(data_dir, "fashion_mnist"))) == ["3.0.1"]


def test_the_console_shows_our_lines_for_conditions_we_handle(tiny_data_dir, tmp_path):
  """Principle 7. A run that resumes past an unreadable checkpoint and logs every step (the first rate
  is unknown), and an import of a folder holding a 90-megapixel image, print no third-party warning or
  traceback for what they handle: no "Exception ignored in <coroutine" with TensorStore's spec, no
  tensorboardX "NaN or Inf", no PIL DecompressionBombWarning, no credentials warning; our own warning
  lines are there. Catches routing that lets library noise through (or hides our lines)."""
  workdir = str(tmp_path / "run")
  r = run_cli(flags(tiny_data_dir, workdir, num_steps=4))
  assert r.returncode == 0, r.stderr[-3000:]
  for chunk in glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d", "*")):
    with open(chunk, "r+b") as f:  # the arrays' data cut short: orbax abandons its reading coroutines
      f.truncate(10)
  r = run_cli(flags(tiny_data_dir, workdir, num_steps=6))
  assert r.returncode == 0, r.stderr[-3000:]
  assert "checkpoints/4 is unreadable" in r.stderr and "Resuming from step 2" in r.stderr
  noise = ("Traceback", "Exception ignored", "NaN or Inf", "DecompressionBomb", "credentials", "Retrying")
  assert not [n for n in noise if n in r.stderr], r.stderr[-5000:]

  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = tmp_path / "images"
  images.mkdir()
  Image.new("L", (9500, 9500), 128).save(images / "huge.png")
  Image.new("L", (64, 64), 128).save(images / "small.png")
  r = tool("prepare_data", [f"--image_dir={images}", "--dataset=mine", f"--data_dir={tmp_path / 'tfds'}",
                            "--image_size=32"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(r.stdout.splitlines()[-1])["images"] == 2
  assert not [n for n in noise if n in r.stderr], r.stderr[-5000:]
