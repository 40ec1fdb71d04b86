"""Command line: score a generator (or samples made elsewhere); one JSON line.

    python -m dcgan_jax.evaluate --workdir=W --data_dir=D [--num_samples=10000] [--step=N | --best]
    python -m dcgan_jax.evaluate --samples=FILE.npz --samples_key=eval --dataset=fashion_mnist --data_dir=D
    python -m dcgan_jax.evaluate --features=inception --inception_weights=pt_inception-2015-12-05-6726825d.pth \
        --workdir=W --data_dir=D [--reference_split=train] [--num_samples=50000]
    python -m dcgan_jax.evaluate --features=inception --samples=A --reference_samples=B   # as pytorch_fid A B

--features=inception: FID, KID, precision/recall (k = 3) and the Inception Score in pytorch-fid's
Inception features (inception.py, inception_metrics.py): numbers that stand beside papers'. The report
states "features", "weights" (file, SHA-256), "preprocessing", "num_samples" and "reference" (dataset,
split, count, or the file). Samples: a generator (--workdir; generated and embedded on the devices),
--samples=A, or both sides as files: --reference_samples=B (images, or pytorch-fid's statistics file
with "mu" and "sigma": FID and IS only). Default count 50,000 (or the whole file).

--features=evaluator (the default): the library's own offline evaluator, below.

Prints {"fid", "kid", "kid_std", "precision", "recall", "coverage", "num_classes", "class_kl",
"classifier_score", "num_samples", "num_real", "evaluator": {...}, "reference": {...}, ...}:
  * every metric compares the samples with the dataset's test split (`real_split`: train for datasets
    with no other, e.g. image folders), in the features of a small CNN classifier the library trains on
    the train split (evaluator.py; cached, its test accuracy reported). Without labels the network is
    trained to predict rotations instead, and the class metrics (coverage, num_classes, class_kl,
    classifier_score) are left out: the report then has "label_free": true;
  * "reference" holds the same metrics for --num_samples real *train* images: the floor a perfect
    generator would reach at this sample count (FID is biased upwards for small samples).
Not comparable with published Inception-FIDs (other network, other features); comparable across runs
and implementations scored by this command at the same --num_samples.

--samples: .npy, or .npz with --samples_key (or a single array); uint8 in [0, 255] or float in [-1, 1];
(N, H, W), (N, H, W, C) or (N, C, H, W); or a folder of image files of one size (read as RGB, as
pytorch-fid reads them; grey when every file is grey). The dataset comes from --dataset, or from
--workdir's config.

Scoring a run (--workdir, not --samples) also appends the report to <workdir>/evaluations.jsonl
(--norecord: not), where `python -m dcgan_jax.study --source=evaluations` finds it.
"""

import json
import os
import sys

from absl import flags
import jax
import numpy as np

from dcgan_jax import cli
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import ConfigError
from dcgan_jax.cli import exit_with_error


def define_flags():
  """The command line's flags; defined only when run as a program, so that importing this module
  (as a library) defines none."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir (or a generator export directory).")
  flags.DEFINE_string("data_dir", None, "tfds data directory holding the dataset (see prepare_data).")
  flags.DEFINE_string("dataset", None, "Dataset to compare with (default: the run's).")
  flags.DEFINE_enum("features", "evaluator", ["evaluator", "inception"], "Feature network: the library's "
                    "own offline evaluator, or pytorch-fid's Inception (paper-comparable; needs its weights).")
  flags.DEFINE_integer("num_samples", None, "Images to score (default 10000 with the evaluator, 50000 with "
                       "inception; a --samples file: all of it).", lower_bound=10, upper_bound=2 * 10**5)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest; 0: the untrained "
                       "generator, rebuilt from the run's seed).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_bool("best", False, "Score the best checkpoint by FID (runs with --eval_every).")
  flags.DEFINE_bool("use_ema", True, "Score the EMA generator when the run has one.")
  flags.DEFINE_enum("sample_bn", None, ["running", "batch"], "BatchNorm statistics when sampling "
                    "(default: the run's --sample_bn).")
  flags.DEFINE_integer("seed", None, "Noise seed (default: the run's).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_string("samples", None, "Score the images in this .npy/.npz file (or folder of images) "
                      "instead of a generator.")
  flags.DEFINE_string("samples_key", None, "Array name inside an .npz with several arrays.")
  flags.DEFINE_string("evaluator_dir", None, "Evaluator cache (default ~/.cache/dcgan_jax/evaluators).")
  flags.DEFINE_string("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                      "(default: the copy in --inception_dir, downloaded there once when online).")
  flags.DEFINE_string("inception_dir", None, "Cache of the Inception weights and the datasets' reference "
                      "features (default ~/.cache/dcgan_jax/inception).")
  flags.DEFINE_enum("reference_split", "train", ["train", "test"], "--features=inception: the dataset "
                    "split the samples are compared with (papers: train, e.g. CIFAR-10's 50k).")
  flags.DEFINE_integer("reference_count", 0, "--features=inception: real images of the split (a seeded "
                       "subset); 0 = all.", lower_bound=0, upper_bound=10**7)
  flags.DEFINE_string("reference_samples", None, "--features=inception: compare with these images "
                      "(.npy/.npz or a folder, as --samples), or with pytorch-fid's statistics (.npz with "
                      "mu and sigma: FID only), instead of a dataset split.")
  flags.DEFINE_bool("reference", True, "Also report the real-data floor (real train images vs test split).")
  flags.DEFINE_bool("record", True, "Scoring a --workdir: also append the report to "
                    "<workdir>/evaluations.jsonl (what `python -m dcgan_jax.study --source=evaluations` "
                    "tabulates).")


FLAGS = flags.FLAGS


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def load_samples(path: str, key=None, flag: str = "--samples") -> np.ndarray:
  """The array in a .npy, or the array `key` (or the only one) in a .npz, or the images of a folder."""
  if os.path.isdir(path):
    return load_folder(path, flag)
  if not os.path.exists(path):
    raise ConfigError(f"{flag}={path}: file not found")
  try:
    loaded = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{flag}={path}: not a readable .npy/.npz file ({type(e).__name__})") from None
  if isinstance(loaded, np.ndarray):
    return loaded
  with loaded:
    names = list(loaded.keys())
    if key is None and len(names) == 1:
      key = names[0]
    if key not in names:
      raise ConfigError(f"{flag}={path}: holds arrays {names}; choose one with --samples_key=NAME")
    return loaded[key]


def load_folder(path: str, flag: str) -> np.ndarray:
  """uint8 (n, H, W, 3) of the image files in a folder, in name order, converted to RGB as pytorch-fid
  reads them; (n, H, W, 1) when every file is grey."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  names = sorted(n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ConfigError(f"{flag}={path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
  images, grey = [], True
  for name in names:
    try:
      with Image.open(os.path.join(path, name)) as image:
        grey &= image.mode in ("L", "1", "I;16", "I")
        images.append(np.asarray(image.convert("RGB")))
    except OSError as e:
      raise ConfigError(f"{flag}={path}: {name} is not a readable image ({e})") from None
    if images[-1].shape != images[0].shape:
      raise ConfigError(f"{flag}={path}: {name} is {images[-1].shape[1]}x{images[-1].shape[0]}, "
                        f"{names[0]} {images[0].shape[1]}x{images[0].shape[0]}; resize them to one size")
  images = np.stack(images)
  return images[..., :1] if grey else images


def evaluate(workdir=None, data_dir=None, dataset=None, num_samples=None, step=None, best=False,
             use_ema=True, sample_bn=None, seed=None, samples=None, samples_key=None, evaluator_dir=None,
             reference=True) -> dict:
  """The evaluator's JSON report (see the module docstring). Raises ConfigError for bad input."""
  num_samples = num_samples or 10000
  from dcgan_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from dcgan_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  from dcgan_jax import sampling  # pylint: disable=g-import-not-at-top
  report = {}
  run_config = None
  if samples is None:
    if not workdir:
      raise ConfigError("pass --workdir=W (a training run) or --samples=FILE (images to score)")
    generate, run_config, step, used_ema = sampling.load(workdir, step, best, use_ema, sample_bn)
    report.update(source=os.path.abspath(workdir), step=step, ema=used_ema,
                  sample_bn=sample_bn or run_config.sample_bn)
  elif workdir:
    run_config, _ = workdir_lib.read_config(workdir)
  dataset = dataset or (run_config.dataset if run_config else None)
  if not dataset:
    raise ConfigError("--dataset is required with --samples (or pass the --workdir that made them)")
  data_dir = data_dir or (run_config.data_dir if run_config else None)

  if samples is not None:
    images = load_samples(samples, samples_key)
    report.update(source=os.path.abspath(samples), samples_key=samples_key)
    shape = _image_shape(images)
  else:
    images = generate(sampling.latents(run_config, num_samples, seed))
    shape = images.shape[1:]
  ev = evaluator.load_or_train(dataset, data_dir, tuple(shape), evaluator_dir)
  images = evaluator.as_uint8_images(images, ev.image_shape)
  if samples is not None and num_samples < len(images):
    images = images[:num_samples]
  scorer = scoring.Scorer(ev, data_dir)
  report = {**scorer.score(images), **report, "dataset": dataset, "evaluator": ev.describe()}
  if reference:
    ref = scorer.reference(len(images))
    report["reference"] = {k: ref[k] for k in ("fid", "kid", "kid_std", "precision", "recall", "coverage",
                                               "class_kl", "classifier_score", "modes", "modes_kl",
                                               "num_samples") if k in ref}
  return report


def evaluate_inception(workdir=None, data_dir=None, dataset=None, num_samples=None, step=None, best=False,
                       use_ema=True, sample_bn=None, seed=None, samples=None, samples_key=None,
                       reference_samples=None, reference_split="train", reference_count=0,
                       inception_weights=None, inception_dir=None) -> dict:
  """The --features=inception JSON report (see the module docstring). ConfigError for bad input, raised
  before any image is embedded."""
  from dcgan_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from dcgan_jax.evaluation import inception_metrics  # pylint: disable=g-import-not-at-top
  from dcgan_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  from dcgan_jax import sampling  # pylint: disable=g-import-not-at-top
  report, run_config = {}, None
  if samples is None:
    if not workdir:
      raise ConfigError("pass --workdir=W (a training run) or --samples=FILE (images to score)")
    sampler, g, run_config, step, used_ema = sampling.load_sampler(workdir, step, best, use_ema, sample_bn)
    report.update(source=os.path.abspath(workdir), step=step, ema=used_ema,
                  sample_bn=sample_bn or run_config.sample_bn)
  elif workdir:
    run_config, _ = workdir_lib.read_config(workdir)
  dataset = dataset or (run_config.dataset if run_config else None)
  data_dir = data_dir or (run_config.data_dir if run_config else None)
  if not (reference_samples or dataset):
    raise ConfigError("pass --reference_samples=B (images to compare with) or --dataset=NAME (its "
                      "--reference_split is the reference)")
  # ---- Both sides' images are read and checked before the network is loaded or run -----------------
  if samples is not None:
    images = load_samples(samples, samples_key)
    images = evaluator.as_uint8_images(images, _image_shape(images))[:num_samples or None]
    shape = images.shape[1:]
    report.update(source=os.path.abspath(samples), samples_key=samples_key)
  else:
    z = sampling.latents(run_config, num_samples or 50000, seed)
    shape = jax.eval_shape(sampler, g, z[:1]).shape[1:]
  statistics = reference_statistics(reference_samples) if reference_samples else None
  if reference_samples and statistics is None:
    real = load_samples(reference_samples, None, "--reference_samples")
    real = evaluator.as_uint8_images(real, _image_shape(real))
  weights = inception_metrics.load_weights(inception_weights, inception_dir)
  features = inception_metrics.Features(weights)

  # ---- Features and metrics ------------------------------------------------------------------------
  if samples is not None:
    pool3, logits = features.embed(images)
  else:
    pool3, logits = features.embed_generated(sampler, g, z)
  if statistics is not None:  # FID from the file's mu and sigma alone; KID and precision/recall need features
    mu, sigma = statistics
    if mu.shape != (pool3.shape[1],) or sigma.shape != (pool3.shape[1],) * 2:
      raise ConfigError(f"--reference_samples={reference_samples}: mu {mu.shape} and sigma {sigma.shape} are "
                        f"not statistics of {pool3.shape[1]}-d pool3 features")
    report["reference"] = dict(statistics=os.path.abspath(reference_samples))
    score = dict(fid=metrics.frechet_distance(*metrics.gaussian_stats(pool3), mu, sigma))
    score["inception_score"], score["inception_score_std"] = inception_metrics.inception_score(logits)
    return {**score, "num_samples": len(pool3), **report, **inception_metrics.describe(weights)}
  if reference_samples:
    real_pool3, _ = features.embed(real)
    reference = dict(samples=os.path.abspath(reference_samples), count=len(real_pool3))
  else:
    ref = inception_metrics.reference_features(features, dataset, reference_split, data_dir, tuple(shape),
                                               inception_dir, reference_count)
    real_pool3, reference = ref.features, ref.description
  return {**inception_metrics.scores(pool3, logits, real_pool3), "num_samples": len(pool3), **report,
          "reference": reference, **inception_metrics.describe(weights)}


def reference_statistics(path: str):
  """(mu, sigma) of a pytorch-fid statistics file (an .npz holding "mu" and "sigma", e.g. one written by
  `python -m pytorch_fid --save-stats`), else None (the file holds images)."""
  if not (path.endswith(".npz") and os.path.isfile(path)):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      if {"mu", "sigma"} <= set(f.keys()):
        return np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--reference_samples={path}: not a readable .npz file ({type(e).__name__})") from None
  return None


def _image_shape(images: np.ndarray) -> tuple:
  """The evaluator's input shape (H, W, C) for samples of another implementation (C = 1 when the
  samples have no channel axis)."""
  if images.ndim == 3:
    return images.shape[1:] + (1,)
  if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
    return images.shape[2:] + (images.shape[1],)
  if images.ndim == 4:
    return images.shape[1:]
  raise ConfigError(f"samples have shape {images.shape}; pass (N, H, W), (N, H, W, C) or (N, C, H, W)")


def record(workdir: str, report: dict) -> None:
  """Appends the report to <workdir>/evaluations.jsonl. A workdir that cannot be written (read-only,
  say) gets a warning on stderr: the report is already printed, so nothing is lost."""
  path = workdir_lib.path(workdir, workdir_lib.EVALUATIONS)
  try:
    workdir_lib.append_jsonl(path, report)
  except OSError as e:
    print(f"warning: {path}: not written ({e.strerror}); the report above is the only copy", file=sys.stderr)


def main(argv):
  del argv
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  common = (FLAGS.workdir, FLAGS.data_dir, FLAGS.dataset, FLAGS.num_samples, FLAGS.step, FLAGS.best,
            FLAGS.use_ema, FLAGS.sample_bn, FLAGS.seed, FLAGS.samples, FLAGS.samples_key)
  try:
    if FLAGS.features == "inception":
      report = evaluate_inception(*common, FLAGS.reference_samples, FLAGS.reference_split,
                                  FLAGS.reference_count, FLAGS.inception_weights, FLAGS.inception_dir)
    else:
      if FLAGS.reference_samples:
        raise ConfigError("--reference_samples needs --features=inception (the evaluator compares with "
                          "its dataset's split)")
      report = evaluate(*common, FLAGS.evaluator_dir, FLAGS.reference)
  except (ConfigError, input_pipeline.DataUnavailableError) as e:
    exit_with_error(str(e))
  print(json.dumps(report), flush=True)
  if FLAGS.record and FLAGS.workdir and not FLAGS.samples:
    record(FLAGS.workdir, report)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
