"""The evaluator, in-training evaluation, EMA, and the evaluate / sample command lines on a tiny run.

Data: the session's 64-image synthetic fashion_mnist (prepare_data, with labels; conftest.py).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcgan_jax import checkpoints
from dcgan_jax.evaluation import evaluator
from dcgan_jax.evaluation import scoring
from dcgan_jax import parallel
from dcgan_jax import sampling
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config, ConfigError
from helpers import ROOT, cli_env, read_json, read_jsonl, run_cli

pytestmark = pytest.mark.slow  # end-to-end and multi-device runs: not in the fast tier


def run_tool(module, args, timeout=300):
  return subprocess.run([sys.executable, "-m", f"dcgan_jax.{module}"] + args, cwd=ROOT, env=cli_env(2),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("evaluators"))


@pytest.fixture(scope="module")
def scorer(tiny_data_dir, evaluator_dir):
  ev = evaluator.load_or_train("fashion_mnist", tiny_data_dir, (28, 28, 1), evaluator_dir)
  return scoring.Scorer(ev, tiny_data_dir, kid_subsets=5)


def test_evaluator_is_trained_once_then_loaded_from_its_cache(scorer, tiny_data_dir, evaluator_dir):
  """The evaluator is trained and cached once; its recorded test accuracy is the accuracy its own
  predictions give on its real split; loading it again from the cache gives the same variables, accuracy and
  feature scale; features are 128-d and probabilities sum to 1. Catches a cache that retrains (or loads
  other weights) and an accuracy recorded from another split or network."""
  ev = scorer.evaluator
  from dcgan_jax.datasets import input_pipeline
  test_x, test_y, _ = input_pipeline.load_images("fashion_mnist", ev.real_split, tiny_data_dir, (28, 28, 1))
  assert ev.test_accuracy == pytest.approx(float(np.mean(ev.embed(test_x)[1].argmax(1) == test_y)))
  assert ev.feature_scale > 0
  meta = read_json(os.path.join(ev.path, "evaluator.json"))
  assert meta["train_examples"] == 64 and meta["num_classes"] == 10
  again = evaluator.load_or_train("fashion_mnist", tiny_data_dir, (28, 28, 1), evaluator_dir)
  assert again.test_accuracy == ev.test_accuracy and again.feature_scale == ev.feature_scale
  for a, b in zip(jax.tree.leaves(again.variables), jax.tree.leaves(ev.variables)):
    np.testing.assert_array_equal(a, b)
  feats, probs = ev.embed(np.zeros((3, 28, 28, 1), np.uint8))
  assert feats.shape == (3, 128) and probs.shape == (3, 10)
  np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)


def test_evaluator_learns_a_dataset_it_can_learn(tmp_path_factory):
  """On a dataset whose images show their class (helpers.make_idx_dir(learnable=True)) the evaluator's
  classifier, trained as the library trains it, reaches >= 95% test accuracy (a random classifier: 10%).
  Catches an evaluator that does not train (zero epochs, no update applied, labels misaligned with
  images) or reports an accuracy it did not measure."""
  from dcgan_jax import prepare_data
  from helpers import make_idx_dir
  idx, data_dir = tmp_path_factory.mktemp("learnable_idx"), tmp_path_factory.mktemp("learnable_tfds")
  make_idx_dir(str(idx), n_train=1280, n_test=200, learnable=True)
  prepare_data.prepare("fashion_mnist", str(idx), str(data_dir))
  ev = evaluator.load_or_train("fashion_mnist", str(data_dir), (28, 28, 1),
                               str(tmp_path_factory.mktemp("learnable_evaluators")))
  assert ev.test_accuracy >= 0.95, ev.test_accuracy
  from dcgan_jax.datasets import input_pipeline
  test_x, test_y, _ = input_pipeline.load_images("fashion_mnist", "test", str(data_dir), (28, 28, 1))
  _, probs = ev.embed(test_x)
  assert float(np.mean(probs.argmax(1) == test_y)) == pytest.approx(ev.test_accuracy)


def test_scores_of_real_and_collapsed_samples(scorer, tiny_data_dir):
  """The test split scored against itself has FID 0 and precision = recall = 1; one image repeated 8 times
  covers one class, has FID > 0.1 and recall <= 0.25; the report has every key. Catches a scorer that
  compares against the wrong split, and a recall blind to collapse."""
  from dcgan_jax.datasets import input_pipeline
  test_x, _, _ = input_pipeline.load_images("fashion_mnist", "test", tiny_data_dir, (28, 28, 1))
  same = scorer.score(test_x)  # the test split against itself
  assert same["fid"] == pytest.approx(0.0, abs=1e-6)
  assert same["precision"] == same["recall"] == 1.0
  collapsed = scorer.score(np.repeat(test_x[:1], 8, axis=0))  # one image, 8 times
  assert collapsed["coverage"] == 1 and collapsed["fid"] > 0.1 and collapsed["recall"] <= 0.25
  for key in ("fid", "kid", "kid_std", "precision", "recall", "coverage", "num_classes", "class_kl",
              "classifier_score", "num_samples", "num_real"):
    assert key in collapsed


def test_sample_formats_are_normalised_to_uint8():
  """Samples from other implementations (uint8 or int with or without a channel axis, NCHW, floats in [-1,
  1]) become the same uint8 NHWC images; floats in [0, 255], a wrong shape and NaN are one-line errors.
  Catches [0, 255] floats read as [-1, 1] (every image white), NCHW read as NHWC, and NaN cast to 0."""
  u8 = np.random.default_rng(0).integers(0, 256, (4, 28, 28), np.uint8)
  as_float = u8.astype(np.float32) / 127.5 - 1
  expected = u8[..., None]
  for variant in (u8, u8[..., None], u8[:, None], as_float, as_float[:, None], u8.astype(np.int64)):
    np.testing.assert_array_equal(evaluator.as_uint8_images(variant, (28, 28, 1)), expected)
  with pytest.raises(ConfigError, match=r"outside \[-1, 1\]"):
    evaluator.as_uint8_images(u8.astype(np.float32), (28, 28, 1))  # floats in [0, 255]
  with pytest.raises(ConfigError, match="needs \\(n, 28, 28, 1\\)"):
    evaluator.as_uint8_images(np.zeros((4, 32, 32, 3), np.uint8), (28, 28, 1))
  with pytest.raises(ConfigError, match="NaN"):
    evaluator.as_uint8_images(np.full((1, 28, 28), np.nan), (28, 28, 1))


def test_ema_generator_is_the_moving_average_of_the_generator():
  """After one pmapped step with --g_ema_decay=0.9 the EMA parameters are d * before + (1 - d) * after with
  the warm-up's d = 2/11; generator() returns the EMA, the EMA is off by default, and the decay reaches its
  setting. Catches an EMA that is not updated, one updated from the old parameters, or without its warm-up."""
  config = Config(batch_size=8, latent_dim=16, g_ema_decay=0.9).resolved()
  mesh = parallel.global_mesh()
  data = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1), np.uint8)
  state = parallel.replicate(step_lib.create_train_state(config, 1), mesh)
  step = parallel.pmap_step(step_lib.make_train_step(config, 1, len(data)), replicated_data=True)
  before = jax.device_get(state.g.params)
  state, _ = step(state, parallel.batch_positions(mesh, 2), parallel.replicate(data, mesh))
  after = jax.device_get(state.g.params)
  d = min(0.9, 2 / 11)  # the warm-up: (1 + n) / (10 + n) after n = 1 update
  expected = jax.tree.map(lambda b, a: d * b + (1 - d) * a, before, after)
  for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.g_ema))):
    np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-7)
  assert state.generator().params is state.g_ema and state.generator(use_ema=False) is state.g
  assert step_lib.create_train_state(Config(latent_dim=16).resolved(), 1).g_ema is None  # off by default
  assert float(step_lib.ema_decay(0.999, jnp.int32(10_000))) == pytest.approx(0.999)


def test_ema_rampup_caps_the_half_life_at_a_fraction_of_the_updates():
  """--g_ema_rampup=r: the decay after n updates is min(decay, 0.5 ** (1 / (r n))) (StyleGAN2), and 0
  keeps the default warm-up. Catches the ramp-up ignored (the default's 0.981 at n = 469), applied as a
  horizon instead of a half-life, or replacing the cap of --g_ema_decay."""
  assert float(step_lib.ema_decay(0.999, jnp.int32(469), 0.05)) == pytest.approx(0.5 ** (1 / 23.45), rel=1e-6)
  assert float(step_lib.ema_decay(0.999, jnp.int32(469))) == pytest.approx(470 / 479, rel=1e-6)
  assert float(step_lib.ema_decay(0.999, jnp.int32(10**6), 0.05)) == pytest.approx(0.999)
  config = Config(batch_size=8, latent_dim=16, g_ema_decay=0.99, g_ema_rampup=0.5).resolved()
  mesh = parallel.global_mesh()
  data = np.random.default_rng(0).integers(0, 256, (32, 28, 28, 1), np.uint8)
  state = parallel.replicate(step_lib.create_train_state(config, 1), mesh)
  step = parallel.pmap_step(step_lib.make_train_step(config, 1, len(data)), replicated_data=True)
  state, _ = step(state, parallel.batch_positions(mesh, 2), parallel.replicate(data, mesh))
  before = jax.device_get(state.g_ema)
  state, _ = step(state, parallel.batch_positions(mesh, 2), parallel.replicate(data, mesh))
  d = 0.5 ** (1 / (0.5 * 2))  # the second update's decay: a half-life of one update
  expected = jax.tree.map(lambda b, a: d * b + (1 - d) * a, before, jax.device_get(state.g.params))
  for e, got in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(state.g_ema))):
    np.testing.assert_allclose(got, e, rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_run(tiny_data_dir, evaluator_dir, tmp_path_factory):
  """A 6-step CLI run with EMA and in-training evaluation every 2 steps."""
  workdir = str(tmp_path_factory.mktemp("run"))
  result = run_cli([f"--workdir={workdir}", "--dataset=fashion_mnist", f"--data_dir={tiny_data_dir}",
                    "--num_steps=6", "--batch_size=8", "--latent_dim=16", "--log_every=2",
                    "--sample_every=2", "--num_samples=4", "--eval_every=2", "--eval_samples=16",
                    "--g_ema_decay=0.5", f"--evaluator_dir={evaluator_dir}"])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_training_logs_evaluations_keeps_the_best_and_writes_a_gif(tiny_run):
  """A run with --eval_every=2 logs fid, kid, coverage and the raw generator's scores at steps 2, 4, 6,
  keeps the checkpoint of the lowest FID (the first at a tie) in best/, writes EMA and raw grids and a
  3-frame GIF, and exports the EMA generator. Catches best/ chosen by the last or the highest FID, and the
  raw generator's scores or grids missing beside the EMA ones."""
  lines = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
  evals = [l for l in lines if "fid" in l]
  assert [l["step"] for l in evals] == [2, 4, 6]
  for l in evals:
    assert {"fid", "kid", "coverage", "fid_raw", "kid_raw"} <= set(l) and np.isfinite(l["fid"])
  best_fid = min(l["fid"] for l in evals)
  best_step = min(l["step"] for l in evals if l["fid"] == best_fid)
  assert sorted(os.listdir(os.path.join(tiny_run, "best"))) == [str(best_step)]
  samples = set(os.listdir(os.path.join(tiny_run, "samples")))
  assert {"step_00000006.png", "raw_step_00000006.png", "progress.gif"} <= samples
  from PIL import Image
  with Image.open(os.path.join(tiny_run, "samples", "progress.gif")) as gif:
    assert gif.n_frames == 3  # steps 2, 4, 6
  tree, _ = checkpoints.read_state_numpy(tiny_run)
  assert "g_ema" in tree and read_json(os.path.join(tiny_run, "generator", "generator.json"))["ema"]


def test_sample_cli(tiny_run, tmp_path):
  """python -m dcgan_jax.sample writes N images in [-1, 1] that equal the export's (EMA) generator on the
  run's noise; --step=0 is the untrained generator of the run's seed; --interpolate writes a grid and a GIF.
  Catches samples from the raw generator when the EMA one is asked for, another noise, and --step=0 drawn
  from another seed."""
  out = str(tmp_path / "s.npy")
  result = run_tool("sample", [f"--workdir={tiny_run}", "--num=5", f"--out={out}"])
  assert result.returncode == 0, result.stderr[-2000:]
  images = np.load(out)
  assert images.shape == (5, 28, 28, 1) and images.dtype == np.float32
  assert -1 <= images.min() and images.max() <= 1
  # The same images from the generator export (EMA weights) as from the newest checkpoint's EMA weights.
  generate, config, step, used_ema = sampling.load(os.path.join(tiny_run, "generator"))
  assert step == 6 and used_ema
  np.testing.assert_allclose(generate(sampling.latents(config, 5)), images, atol=1e-6)
  # Step 0: the untrained generator, rebuilt from the run's seed.
  generate, config, step, _ = sampling.load(tiny_run, step=0)
  from dcgan_jax import models
  from dcgan_jax import randomness
  state = step_lib.create_train_state(config, 1)
  expected = models.build_models(config, 1)[0].apply(
      {"params": state.g.params, "batch_stats": state.g.batch_stats},
      randomness.eval_latents(jax.random.key(config.seed), 5, config.latent_dim), train=False)
  np.testing.assert_allclose(generate(sampling.latents(config, 5)), expected, atol=1e-5)
  png = str(tmp_path / "walk.png")
  result = run_tool("sample", [f"--workdir={tiny_run}", "--interpolate", "--num=2",
                               "--interpolation_steps=4", f"--out={png}", "--use_ema=false"])
  assert result.returncode == 0, result.stderr[-2000:]
  from PIL import Image
  with Image.open(png) as grid:
    assert grid.size == (4 * 30 + 2, 2 * 30 + 2)
  with Image.open(str(tmp_path / "walk.gif")) as gif:
    assert gif.n_frames == 6  # 4 forth, 2 back
  bad = run_tool("sample", [f"--workdir={tiny_run}", f"--out={tmp_path / 'x.jpg'}"])
  assert bad.returncode == 2 and bad.stderr.startswith("error: --out=") and len(bad.stderr.splitlines()) == 1


def test_evaluate_cli(tiny_run, tiny_data_dir, evaluator_dir, tmp_path):
  """python -m dcgan_jax.evaluate on a run prints one JSON report whose FID equals the in-training FID at
  the same step (same evaluator, noise and generator), records it in evaluations.jsonl for study, and scores
  samples made elsewhere (uint8 without a channel axis, in an .npz of several arrays) the same as the
  generator's. Catches an evaluation that uses other noise or another generator than training's, and a
  report that is not recorded."""
  from dcgan_jax import evaluate
  common = [f"--data_dir={tiny_data_dir}", f"--evaluator_dir={evaluator_dir}", "--num_samples=16"]
  result = run_tool("evaluate", [f"--workdir={tiny_run}"] + common)
  assert result.returncode == 0, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  for key in ("fid", "kid", "precision", "recall", "coverage", "num_samples", "reference", "evaluator"):
    assert key in report
  assert report["num_samples"] == 16 and report["step"] == 6 and report["ema"] is True
  cached = read_json(os.path.join(report["evaluator"]["path"], "evaluator.json"))
  assert report["evaluator"]["test_accuracy"] == cached["test_accuracy"]
  assert report["reference"]["num_samples"] == 16
  # The in-training FID at step 6 used the same evaluator, noise (16) and generator.
  logged = read_jsonl(os.path.join(tiny_run, "metrics.jsonl"))
  assert report["fid"] == pytest.approx([l for l in logged if l.get("step") == 6 and "fid" in l][0]["fid"],
                                        rel=1e-4)
  # The report is also recorded in the workdir, where dcgan_jax.study reads it.
  assert read_jsonl(os.path.join(tiny_run, "evaluations.jsonl")) == [report]
  from dcgan_jax.studies import study_table
  assert study_table.evaluations_at(study_table.load_run(tiny_run), ["fid", "reference_fid"]) == [(
      6, dict(fid=report["fid"], reference_fid=report["reference"]["fid"]),
      dict(num_samples=16, ema=True, sample_bn="running", features="evaluator",
           evaluator=report["evaluator"]["path"]))]
  # Samples made elsewhere, as uint8 without a channel axis in an .npz of several arrays.
  generate, config, _, _ = sampling.load(tiny_run)
  ours = evaluator.as_uint8_images(generate(sampling.latents(config, 16)), (28, 28, 1))
  np.savez(tmp_path / "other.npz", train=np.zeros((16, 28, 28), np.uint8), eval=ours[..., 0])
  result = run_tool("evaluate", ["--samples=" + str(tmp_path / "other.npz"), "--samples_key=eval",
                                 "--dataset=fashion_mnist"] + common)
  assert result.returncode == 0, result.stderr[-2000:]
  assert len(read_jsonl(os.path.join(tiny_run, "evaluations.jsonl"))) == 1  # --samples: nothing recorded
  assert json.loads(result.stdout.strip().splitlines()[-1])["fid"] == pytest.approx(report["fid"], rel=1e-4)
  kwargs = dict(data_dir=tiny_data_dir, evaluator_dir=evaluator_dir, num_samples=16)
  with pytest.raises(ConfigError, match="--samples_key"):
    evaluate.evaluate(samples=str(tmp_path / "other.npz"), dataset="fashion_mnist", **kwargs)
  best = evaluate.evaluate(workdir=tiny_run, best=True, reference=False, **kwargs)
  assert best["fid"] == pytest.approx(min(l["fid"] for l in logged if "fid" in l), rel=1e-4)
