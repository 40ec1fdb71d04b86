"""Inception metrics end to end: `evaluate --features=inception` on arrays, folders and a dataset split,
training with --eval_features=inception, the weights' download, and the same features on any topology.

The network runs the seeded random weights of tests/fixtures (inception_fixture.py: pytorch-fid's own
features for them are checked in test_inception.py), through a stand-in weights file whose converted
variables are cached, since the real file cannot be downloaded here.
"""
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from dcgan_jax.evaluation import inception_metrics

from dcgan_jax.evaluation import metrics
from dcgan_jax.config import ConfigError
from helpers import ROOT, cli_env, read_jsonl, run_cli
from inception_fixture import random_variables, stand_in_weights

pytestmark = pytest.mark.slow  # each command compiles the Inception network


def evaluate(args, env=None):
  result = subprocess.run([sys.executable, "-m", "dcgan_jax.evaluate", "--features=inception"] + args,
                          cwd=ROOT, env=env or cli_env(2, fast_compile=False), capture_output=True, text=True,
                          timeout=600)  # (~10% faster at XLA's default level here)
  return result


def report_of(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(stand-in weights file, its cache dir)."""
  cache = str(tmp_path_factory.mktemp("inception"))
  return stand_in_weights(cache), cache


def test_evaluate_on_arrays_folders_and_a_dataset_split(weights, tiny_data_dir, tmp_path):
  """`evaluate --features=inception`:
  * two arrays (floats in [-1, 1] without a channel axis; uint8 with one, in an .npz) give the FID,
    KID, precision/recall and Inception Score of an independent computation on the same images
    (Features.embed here, on 4 devices, and metrics.*), and state the count, the reference, the weights'
    hash and the preprocessing;
  * pytorch-fid's statistics file (mu, sigma) of the reference gives the same FID;
  * the same images as two folders of PNG files give the same numbers (pytorch_fid A B's input);
  * a dataset split as the reference: its features are cached, and the second evaluation reads the
    cache instead of embedding the images again (a doctored cache changes the FID);
  * offline without weights: one `error:` line naming the file and the flag, exit 2, nothing written.
  Catches samples or references read differently from files and folders, float samples not rounded to
  uint8, a report without its provenance, and a reference embedded on every call."""
  path, cache = weights
  rng = np.random.default_rng(1)
  a = rng.uniform(-1, 1, (12, 28, 28)).astype(np.float32)
  b = rng.integers(0, 256, (11, 28, 28, 1), dtype=np.uint8)
  np.save(tmp_path / "a.npy", a)
  np.savez(tmp_path / "b.npz", images=b)
  common = [f"--inception_weights={path}", f"--inception_dir={cache}"]
  arrays = report_of(evaluate(common + [f"--samples={tmp_path / 'a.npy'}",
                                        f"--reference_samples={tmp_path / 'b.npz'}"]))
  a_uint8 = np.round((a.astype(np.float64) + 1) * 127.5).astype(np.uint8)[..., None]
  features = inception_metrics.Features(inception_metrics.Weights(path, "x", random_variables()))
  pool3, logits = features.embed(a_uint8)
  real, _ = features.embed(b)
  # (The commands compile at XLA's default optimisation level, this process at level 0 (helpers.py):
  # the features differ in their last bits: the FID by ~1e-6 relative, the KID (~2e-4 here) by ~2e-8.)
  assert arrays["fid"] == pytest.approx(metrics.fid(pool3, real), rel=1e-5)
  assert arrays["kid"] == pytest.approx(metrics.kid(pool3, real)[0], rel=1e-5, abs=1e-6)
  assert (arrays["precision"], arrays["recall"]) == pytest.approx(metrics.precision_recall(real, pool3, 3))
  assert arrays["inception_score"] == pytest.approx(inception_metrics.inception_score(logits)[0], rel=1e-5)
  assert arrays["num_samples"] == 12 and arrays["reference"]["count"] == 11
  assert arrays["weights"]["sha256"] == inception_metrics._sha256(path)  # pylint: disable=protected-access
  assert arrays["features"] == "inception" and "align_corners=False" in arrays["preprocessing"]

  # pytorch-fid's statistics file (mu, sigma) as the reference: the same FID; no KID or precision.
  np.savez(tmp_path / "stats.npz", mu=real.mean(0), sigma=np.cov(real.astype(np.float64), rowvar=False))
  from dcgan_jax import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  stats = evaluate_lib.evaluate_inception(samples=str(tmp_path / "a.npy"), inception_weights=path,
                                          inception_dir=cache, reference_samples=str(tmp_path / "stats.npz"))
  assert stats["fid"] == pytest.approx(arrays["fid"], rel=1e-5) and "kid" not in stats
  assert stats["reference"] == dict(statistics=str(tmp_path / "stats.npz"))

  for name, images in (("A", a_uint8[..., 0]), ("B", b[..., 0])):
    os.makedirs(tmp_path / name)
    for i, image in enumerate(images):
      Image.fromarray(image).save(tmp_path / name / f"{i:03d}.png")
  folders = report_of(evaluate(common + [f"--samples={tmp_path / 'A'}", f"--reference_samples={tmp_path / 'B'}"]))
  for key in ("fid", "kid", "precision", "recall", "inception_score"):
    assert folders[key] == pytest.approx(arrays[key], rel=1e-9, abs=1e-12), key

  split = [f"--samples={tmp_path / 'a.npy'}", "--dataset=fashion_mnist", f"--data_dir={tiny_data_dir}",
           "--reference_split=train"]
  first = report_of(evaluate(common + split))
  assert first["reference"] == dict(dataset="fashion_mnist", split="train", image_shape=[28, 28, 1], count=64)
  [cached] = [os.path.join(cache, "reference", f) for f in os.listdir(os.path.join(cache, "reference"))]
  with np.load(cached) as f:
    stored = dict(f)
  np.testing.assert_allclose(stored["mu"], stored["features"].mean(0), rtol=1e-6)
  assert first["fid"] == pytest.approx(metrics.fid(pool3, stored["features"]), rel=1e-5)
  np.savez(cached, mu=stored["mu"], sigma=stored["sigma"], features=stored["features"] * 2)
  assert report_of(evaluate(common + split))["fid"] == pytest.approx(
      metrics.fid(pool3, stored["features"] * 2), rel=1e-5)

  offline = evaluate([f"--inception_dir={tmp_path / 'empty'}", f"--samples={tmp_path / 'a.npy'}",
                      f"--reference_samples={tmp_path / 'b.npz'}"],
                     env=dict(cli_env(2), DCGAN_JAX_INCEPTION_URL="http://127.0.0.1:9/weights.pth"))
  assert offline.returncode == 2 and len(offline.stderr.splitlines()) == 1, offline.stderr
  assert offline.stderr.startswith("error: the Inception weights pt_inception-2015-12-05-6726825d.pth")
  assert "--inception_weights=PATH" in offline.stderr and not os.path.exists(tmp_path / "empty")


def test_training_evaluates_in_inception_features_and_evaluate_agrees(weights, tiny_data_dir, tmp_path):
  """--eval_features=inception: the in-training FID, KID and Inception Score are logged, best/ is chosen
  by that FID (its score says so), and `evaluate --features=inception --workdir` of the same step and
  sample count (generated and embedded on the devices, against the same cached train split) gives the
  logged FID. Catches training that evaluates in the evaluator's features anyway, another reference
  split or noise in training than in evaluate, and a best/ that mixes feature scales."""
  path, cache = weights
  workdir = str(tmp_path / "run")
  result = run_cli([f"--workdir={workdir}", "--dataset=fashion_mnist", f"--data_dir={tiny_data_dir}",
                    "--num_steps=4", "--batch_size=8", "--latent_dim=16", "--log_every=2", "--eval_every=2",
                    "--eval_samples=12", "--eval_features=inception", f"--inception_weights={path}",
                    f"--inception_dir={cache}"], fast_compile=False)  # as evaluate's, below
  assert result.returncode == 0, result.stderr[-3000:]
  evals = [l for l in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "fid" in l]
  assert [l["step"] for l in evals] == [2, 4]
  assert all({"fid", "kid", "inception_score"} <= set(l) and "coverage" not in l for l in evals)
  best = min(evals, key=lambda l: l["fid"])
  [best_dir] = os.listdir(os.path.join(workdir, "best"))
  assert int(best_dir) == best["step"]
  report = report_of(evaluate([f"--workdir={workdir}", "--step=4", "--num_samples=12",
                               f"--inception_weights={path}", f"--inception_dir={cache}"]))
  assert report["fid"] == pytest.approx(evals[-1]["fid"], rel=1e-6)
  assert report["reference"]["split"] == "train" and report["reference"]["count"] == 64


def test_features_are_the_same_on_one_process_and_on_two(tiny_data_dir, tmp_path):
  """Features.embed and embed_generated (images generated, rounded and embedded in one program) give the
  same numbers, bit for bit, on 1 process of 4 devices and on 2 processes of 1 device (shares of 4 and 3
  images, gathered in order), and embed_generated equals embedding the rounded uint8 images; so do a
  dataset split's reference features when only one of the two processes has them cached (the processes
  then compute them together, and the other one caches them too). Catches shares gathered out of order,
  padding rows left in, a generator program that differs from generating first and embedding the uint8
  images, and a process that reads its cache while the other waits for it in a collective (a hang, ended
  by the timeout)."""
  script = os.path.join(ROOT, "tests", "inception_probe.py")
  env = lambda devices: cli_env(devices, fast_compile=False)
  one = subprocess.run([sys.executable, script, str(tmp_path / "one.npz"), tiny_data_dir, str(tmp_path / "c1")],
                       cwd=ROOT, env=env(4), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  shutil.copytree(tmp_path / "c1" / "p0", tmp_path / "c2" / "p0")  # process 1's cache stays empty
  from dcgan_jax import launch  # pylint: disable=g-import-not-at-top
  port = launch.free_port()
  procs = [subprocess.Popen([sys.executable, script, str(tmp_path / "two.npz"), tiny_data_dir,
                             str(tmp_path / "c2"), str(i), "2", str(port)],
                            cwd=ROOT, env=env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  try:
    for p in procs:
      out, _ = p.communicate(timeout=300)
      assert p.returncode == 0, out[-3000:]
  finally:
    for p in procs:
      p.kill()
  with np.load(tmp_path / "one.npz") as f:
    one = dict(f)
  with np.load(tmp_path / "two.npz") as f:
    two = dict(f)
  assert sorted(one) == sorted(two) == ["gen_logits", "gen_pool3", "gen_rounded_pool3", "logits", "pool3",
                                        "reference"]
  for key in one:
    np.testing.assert_array_equal(two[key], one[key], err_msg=key)
  np.testing.assert_array_equal(one["gen_pool3"], one["gen_rounded_pool3"])
  assert len(one["reference"]) == 64 and os.listdir(tmp_path / "c2" / "p1" / "reference")


def test_weights_are_downloaded_once_and_checked(tmp_path, monkeypatch):
  """Without --inception_weights, the weights come from the cache, else from the URL (served here),
  saved into the cache only when their SHA-256 has pytorch-fid's prefix; a file with another hash is
  refused with one message and leaves nothing behind; a present cache is used without the network.
  Catches a download that is not verified, a half-written or wrong file left in the cache, and a
  download on every call."""
  served = tmp_path / "served"
  served.mkdir()
  (served / "weights.pth").write_bytes(b"not the weights")
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    monkeypatch.setenv(inception_metrics.URL_ENV, f"http://127.0.0.1:{server.server_port}/weights.pth")
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match="SHA-256 does not start with 6726825d"):
      inception_metrics.find_weights(None, str(cache))
    assert os.listdir(cache) == []
    monkeypatch.setattr(inception_metrics, "WEIGHTS_SHA256_PREFIX",
                        inception_metrics._sha256(served / "weights.pth")[:8])  # pylint: disable=protected-access
    got = inception_metrics.find_weights(None, str(cache))
    assert got == str(cache / inception_metrics.WEIGHTS_FILE) and open(got, "rb").read() == b"not the weights"
    server.shutdown()
    assert inception_metrics.find_weights(None, str(cache)) == got  # the cache, without the server
  finally:
    server.server_close()


def test_training_without_weights_is_refused_before_the_data_and_writes_nothing(tmp_path):
  """--eval_features=inception with no weights file (offline, none cached): one `error:` line naming the
  weights file, exit 2, and no workdir; the refusal comes before the dataset is opened (the data_dir
  given here does not exist, and its error is not the one reported). Catches the weights looked up only
  after the dataset is loaded (minutes, for a large one) or after the workdir is written."""
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "dcgan_jax.main", f"--workdir={workdir}", "--dataset=fashion_mnist",
       f"--data_dir={tmp_path / 'no_data'}", "--num_steps=2", "--eval_every=1", "--eval_features=inception",
       f"--inception_dir={tmp_path / 'empty'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(cli_env(1), DCGAN_JAX_INCEPTION_URL="http://127.0.0.1:9/weights.pth"))
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "pt_inception-2015-12-05-6726825d.pth" in errors[0], result.stderr[-3000:]
  assert not workdir.exists() and not (tmp_path / "empty").exists()
