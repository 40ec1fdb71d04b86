"""Command line: score a generator (or samples made elsewhere) with the offline evaluator; one JSON line.

    python -m dcgan_jax.evaluate --workdir=W --data_dir=D [--num_samples=10000] [--step=N | --best]
    python -m dcgan_jax.evaluate --samples=FILE.npz --samples_key=eval --dataset=fashion_mnist --data_dir=D

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
(N, H, W), (N, H, W, C) or (N, C, H, W). The dataset comes from --dataset, or from --workdir's config.

Scoring a run (--workdir, not --samples) also appends the report to <workdir>/evaluations.jsonl
(--norecord: not), where `python -m dcgan_jax.study --source=evaluations` finds it.
"""

import json
import os
import sys

from absl import flags
import numpy as np

from dcgan_jax import cli
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import ConfigError, exit_with_error


def define_flags():
  """The command line's flags; defined only when run as a program, so that importing this module
  (as a library) defines none."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir (or a generator export directory).")
  flags.DEFINE_string("data_dir", None, "tfds data directory holding the dataset (see prepare_data).")
  flags.DEFINE_string("dataset", None, "Dataset to compare with (default: the run's).")
  flags.DEFINE_integer("num_samples", 10000, "Generated images to score (and real ones for the reference).",
                       lower_bound=10, upper_bound=2 * 10**5)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest; 0: the untrained "
                       "generator, rebuilt from the run's seed).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_bool("best", False, "Score the best checkpoint by FID (runs with --eval_every).")
  flags.DEFINE_bool("use_ema", True, "Score the EMA generator when the run has one.")
  flags.DEFINE_enum("sample_bn", None, ["running", "batch"], "BatchNorm statistics when sampling "
                    "(default: the run's --sample_bn).")
  flags.DEFINE_integer("seed", None, "Noise seed (default: the run's).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_string("samples", None, "Score the images in this .npy/.npz file instead of a generator.")
  flags.DEFINE_string("samples_key", None, "Array name inside an .npz with several arrays.")
  flags.DEFINE_string("evaluator_dir", None, "Evaluator cache (default ~/.cache/dcgan_jax/evaluators).")
  flags.DEFINE_bool("reference", True, "Also report the real-data floor (real train images vs test split).")
  flags.DEFINE_bool("record", True, "Scoring a --workdir: also append the report to "
                    "<workdir>/evaluations.jsonl (what `python -m dcgan_jax.study --source=evaluations` "
                    "tabulates).")


FLAGS = flags.FLAGS


def load_samples(path: str, key=None) -> np.ndarray:
  """The array in a .npy, or the array `key` (or the only one) in a .npz."""
  if not os.path.exists(path):
    raise ConfigError(f"--samples={path}: file not found")
  try:
    loaded = np.load(path, allow_pickle=False)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--samples={path}: not a readable .npy/.npz file ({type(e).__name__})") from None
  if isinstance(loaded, np.ndarray):
    return loaded
  with loaded:
    names = list(loaded.keys())
    if key is None and len(names) == 1:
      key = names[0]
    if key not in names:
      raise ConfigError(f"--samples={path}: holds arrays {names}; choose one with --samples_key=NAME")
    return loaded[key]


def evaluate(workdir=None, data_dir=None, dataset=None, num_samples=10000, step=None, best=False,
             use_ema=True, sample_bn=None, seed=None, samples=None, samples_key=None, evaluator_dir=None,
             reference=True) -> dict:
  """The JSON report (see the module docstring). Raises ConfigError for bad input."""
  from dcgan_jax import evaluator  # pylint: disable=g-import-not-at-top
  from dcgan_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top
  report = {}
  run_config = None
  if samples is None:
    if not workdir:
      raise ConfigError("pass --workdir=W (a training run) or --samples=FILE (images to score)")
    generate, run_config, step, used_ema = sample_lib.load(workdir, step, best, use_ema, sample_bn)
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
    images = generate(sample_lib.latents(run_config, num_samples, seed))
    shape = images.shape[1:]
  ev = evaluator.load_or_train(dataset, data_dir, tuple(shape), evaluator_dir)
  images = evaluator.as_uint8_images(images, ev.image_shape)
  if samples is not None and num_samples < len(images):
    images = images[:num_samples]
  scorer = evaluator.Scorer(ev, data_dir)
  report = {**scorer.score(images), **report, "dataset": dataset, "evaluator": ev.describe()}
  if reference:
    ref = scorer.reference(len(images))
    report["reference"] = {k: ref[k] for k in ("fid", "kid", "kid_std", "precision", "recall", "coverage",
                                               "class_kl", "classifier_score", "modes", "modes_kl",
                                               "num_samples") if k in ref}
  return report


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
  if FLAGS.num_samples < 10:
    exit_with_error(f"--num_samples={FLAGS.num_samples}: too few for FID/KID; pass at least 10 (10000 is standard)")
  from dcgan_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  try:
    report = evaluate(FLAGS.workdir, FLAGS.data_dir, FLAGS.dataset, FLAGS.num_samples, FLAGS.step,
                      FLAGS.best, FLAGS.use_ema, FLAGS.sample_bn, FLAGS.seed, FLAGS.samples,
                      FLAGS.samples_key, FLAGS.evaluator_dir, FLAGS.reference)
  except (ConfigError, input_pipeline.DataUnavailableError) as e:
    exit_with_error(str(e))
  print(json.dumps(report), flush=True)
  if FLAGS.record and FLAGS.workdir and not FLAGS.samples:
    record(FLAGS.workdir, report)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
