"""Sample sets and generators scored with the evaluator network (evaluator.py) against the real split.

    evaluator = evaluator_lib.load_or_train("fashion_mnist", data_dir, (28, 28, 1))
    scorer = Scorer(evaluator, data_dir)       # the test split is the real-data side of every metric
    report = scorer.score(uint8_images)         # {"fid": ..., "kid": ..., "precision": ..., ...}
    floor = scorer.reference(10000)             # the same metrics, real train subset vs test split
    scorer.score_generator(sample, g, z)        # in training: each process embeds its share

A stacked dataset (datasets/stacked.py) is also scored by its modes: each channel classified by the
source dataset's evaluator.
"""

import json
import os
from typing import Optional

from absl import logging
import numpy as np

from dcgan_jax import workdir as workdir_lib
from dcgan_jax.datasets import stacked
from dcgan_jax.evaluation import metrics
from dcgan_jax.evaluation.evaluator import Evaluator, TRAIN, as_uint8_images, load_or_train


def stacked_modes(channel_evaluator: Evaluator, images: np.ndarray) -> np.ndarray:
  """uint8 (n, H, W, 3) -> int32 (n,) modes: each channel resized to the channel evaluator's 28x28 and
  classified by it (stacked.py's protocol)."""
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  channels = input_pipeline.preprocess(stacked.channel_images(images), "", channel_evaluator.image_shape)
  _, probs = channel_evaluator.embed(channels)
  return stacked.mode_of(np.argmax(probs, axis=-1).reshape(len(images), 3)).astype(np.int32)


class Scorer:
  """Scores sample sets against the real split of the evaluator's dataset."""

  def __init__(self, evaluator: Evaluator, data_dir: Optional[str], kid_subsets: int = 100):
    from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
    self.evaluator, self.data_dir, self.kid_subsets = evaluator, data_dir, kid_subsets
    real_x, _, _ = input_pipeline.load_images(evaluator.dataset, evaluator.real_split, data_dir,
                                              evaluator.image_shape)
    self.real_features, self.real_probs = evaluator.embed(real_x)
    self.real_histogram = metrics.class_histogram(self.real_probs)
    # A stacked dataset (stacked.py) is also scored by its modes: each channel classified by the
    # source dataset's evaluator (trained and cached like any other; the source must be prepared too).
    self.channel_evaluator = None
    if evaluator.dataset in stacked.SOURCES:
      self.channel_evaluator = load_or_train(stacked.SOURCES[evaluator.dataset], data_dir, (28, 28, 1),
                                             os.path.dirname(evaluator.path))

  def modes_of(self, images: np.ndarray) -> Optional[np.ndarray]:
    """A stacked dataset's modes of uint8 images (n, H, W, 3) -> int32 (n,); None for other datasets."""
    return None if self.channel_evaluator is None else stacked_modes(self.channel_evaluator, images)

  def score(self, images: np.ndarray, precision_recall: bool = True) -> dict:
    """uint8 images (n, H, W, C) -> one dict of every metric, with the evaluator and the sample counts."""
    feats, probs = self.evaluator.embed(images)
    return self.score_embedded(feats, probs, precision_recall, self.modes_of(images))

  def score_embedded(self, feats: np.ndarray, probs: np.ndarray, precision_recall: bool = True,
                     modes: Optional[np.ndarray] = None) -> dict:
    """The same from the samples' embeddings (Evaluator.embed) and, for a stacked dataset, modes
    (modes_of), e.g. gathered from several processes."""
    report = dict(fid=metrics.fid(feats, self.real_features))
    if modes is not None:
      report.update(stacked.mode_report(modes))
    report["kid"], report["kid_std"] = metrics.kid(feats, self.real_features, self.kid_subsets)
    if precision_recall:
      report["precision"], report["recall"] = metrics.precision_recall(self.real_features, feats)
    if self.evaluator.label_free:
      report.update(label_free=True)
    else:
      report.update(coverage=metrics.class_coverage(probs), num_classes=self.evaluator.num_classes,
                    class_kl=metrics.class_kl(probs, self.real_histogram),
                    classifier_score=metrics.classifier_score(probs))
    report.update(num_samples=len(feats), num_real=len(self.real_features),
                  real_split=self.evaluator.real_split)
    return report

  def score_generator(self, sample, g, z) -> dict:
    """The in-training metrics (FID, KID, class coverage and KL, stacked modes) of the images
    sample(g, z): each process generates and embeds its share of z, the embeddings are gathered."""
    from dcgan_jax import parallel  # pylint: disable=g-import-not-at-top
    from dcgan_jax import sampling  # pylint: disable=g-import-not-at-top
    images = as_uint8_images(sampling.sample_images(sample, g, parallel.process_share(z)),
                             self.evaluator.image_shape)
    feats, probs = self.evaluator.embed(images)
    modes = self.modes_of(images)
    n = len(z)
    report = self.score_embedded(
        parallel.gather_shares(feats, n), parallel.gather_shares(probs, n), precision_recall=False,
        modes=None if modes is None else parallel.gather_shares(modes[:, None], n)[:, 0])
    return {k: float(report[k]) for k in ("fid", "kid", "coverage", "class_kl", "modes", "modes_kl")
            if k in report}

  def reference(self, num: int) -> dict:
    """The floor: the same metrics for `num` real train images (a seeded subset) against the real split
    (for a dataset with only a train split, a subset of the very images it is compared with: a floor
    lower than any generator can reach). Cached next to the evaluator."""
    path = os.path.join(self.evaluator.path, f"reference_n{num}.json")
    try:
      with open(path) as f:
        return json.load(f)
    except FileNotFoundError:
      pass
    except (OSError, ValueError) as e:  # damaged on disk: computed and written again
      logging.warning("%s is unreadable (%s); computing it again.", path, type(e).__name__)
    from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
    train_x, _, _ = input_pipeline.load_images(self.evaluator.dataset, "train", self.data_dir,
                                               self.evaluator.image_shape)
    pick = np.random.default_rng(TRAIN["seed"]).permutation(len(train_x))[:num]
    report = self.score(train_x[np.sort(pick)])
    report["source"] = "train split subset (real data)"
    workdir_lib.write_atomic(path, json.dumps(report))
    return report
