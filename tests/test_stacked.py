"""Stacked datasets (1,000 modes) and mode counting."""
import os

import numpy as np
import pytest

from dcgan_jax.datasets import stacked
from helpers import make_idx_dir, read_jsonl


def test_stacking_is_a_function_of_the_seed_and_labels_name_the_three_sources():
  """stack(): the same seed gives the same bytes, another seed other picks; each example's channels are
  source images whose classes its mode label spells (100 R + 10 G + B); train and test draw different
  streams. Catches an unseeded draw, channels out of order, and a label that does not match them."""
  rng = np.random.default_rng(1)
  images, labels = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8), rng.integers(0, 10, 50)
  a, a_modes = stacked.stack(images, labels, 0, "train")
  b, b_modes = stacked.stack(images, labels, 0, "train")
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a_modes, b_modes)
  assert not np.array_equal(a, stacked.stack(images, labels, 1, "train")[0])
  assert not np.array_equal(a, stacked.stack(images, labels, 0, "test")[0])
  assert a.shape == (50, 28, 28, 3) and a.dtype == np.uint8
  for i in range(50):
    found = [int(np.flatnonzero((images == a[i, ..., c]).all(axis=(1, 2)))[0]) for c in range(3)]
    assert a_modes[i] == 100 * labels[found[0]] + 10 * labels[found[1]] + labels[found[2]]


def test_mode_report_counts_every_mode_of_a_full_set_and_one_for_a_collapsed_generator():
  """All 1,000 modes equally often: 1,000 covered, KL 0; one image repeated: 1 mode, KL log(1000).
  Catches a histogram over the wrong number of bins or a KL of the wrong direction or base."""
  full = stacked.mode_report(np.tile(np.arange(1000), 3))
  assert full["modes"] == 1000 and abs(full["modes_kl"]) < 1e-9
  collapsed = stacked.mode_report(np.full(500, 417))
  assert collapsed["modes"] == 1 and abs(collapsed["modes_kl"] - np.log(1000)) < 1e-9


@pytest.mark.slow
def test_stacked_dataset_trains_and_its_modes_are_counted_by_the_channel_classifier(tmp_path):
  """prepare_data's stacked_fashion_mnist from (learnable) Fashion-MNIST IDX files: written twice with
  one seed it is the same bytes. The fashion_mnist evaluator, applied channel by channel, gives every
  stacked image exactly its label's mode: images covering all 1,000 modes count 1,000, one image
  repeated counts 1. A 2-step dcgan run at 32x32 on it logs modes and modes_kl with its evaluation.
  Catches channels classified in the wrong order or at the wrong size, modes counted from the 1,000-class
  stacked evaluator instead, and the in-training evaluation dropping the modes."""
  from dcgan_jax.evaluation import evaluator
  from dcgan_jax.evaluation import scoring
  from dcgan_jax import prepare_data
  from dcgan_jax import train
  from dcgan_jax.config import Config
  idx, data_dir = str(tmp_path / "idx"), str(tmp_path / "tfds")
  os.makedirs(idx)
  source = make_idx_dir(idx, n_train=3000, n_test=200, learnable=True)
  prepare_data.prepare("fashion_mnist", idx, data_dir)
  path, counts = prepare_data.prepare_stacked("stacked_fashion_mnist", idx, data_dir, seed=0)
  assert counts == {"train": 3000, "test": 200}
  again, _ = prepare_data.prepare_stacked("stacked_fashion_mnist", idx, str(tmp_path / "again"), seed=0)
  for name in sorted(os.listdir(path)):
    if "array_record" in name:
      assert open(os.path.join(path, name), "rb").read() == open(os.path.join(again, name), "rb").read()

  cache = str(tmp_path / "evaluators")
  channel = evaluator.load_or_train("fashion_mnist", data_dir, (28, 28, 1), cache)
  images, labels = source["train"]
  by_class = [images[labels == c][0] for c in range(10)]
  every = np.array([np.stack([by_class[m // 100], by_class[m // 10 % 10], by_class[m % 10]], -1)
                    for m in range(1000)])
  modes = scoring.stacked_modes(channel, every)
  np.testing.assert_array_equal(modes, np.arange(1000))
  assert stacked.mode_report(modes)["modes"] == 1000
  assert stacked.mode_report(scoring.stacked_modes(channel, np.repeat(every[417:418], 50, 0))) == dict(
      modes=1, modes_kl=pytest.approx(np.log(1000)))
  # At the dcgan preset's 32x32: resized back to 28x28 per channel before classifying.
  from dcgan_jax.datasets import input_pipeline
  np.testing.assert_array_equal(
      scoring.stacked_modes(channel, input_pipeline.preprocess(every, "", (32, 32, 3))), np.arange(1000))

  workdir = str(tmp_path / "run")
  train.train_and_evaluate(Config(dataset="stacked_fashion_mnist", data_dir=data_dir, preset="dcgan",
                                  image_size=32, base_width=8, batch_size=8, latent_dim=16, num_steps=2,
                                  eval_every=2, eval_samples=64, evaluator_dir=cache, log_every=2), workdir)
  scored = [m for m in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "modes" in m]
  # The same count from the run's generator and evaluation noise, classified here.
  from dcgan_jax import sampling
  generate, run_config, _, _ = sampling.load(workdir)
  images = evaluator.as_uint8_images(generate(sampling.latents(run_config, 64)), (32, 32, 3))
  expected = stacked.mode_report(scoring.stacked_modes(channel, images))
  assert len(scored) == 1 and scored[0]["modes"] == expected["modes"]
  assert scored[0]["modes_kl"] == pytest.approx(expected["modes_kl"], rel=1e-5)
