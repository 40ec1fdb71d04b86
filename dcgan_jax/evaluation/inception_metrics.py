"""Paper-comparable metrics: FID, KID, precision/recall and the Inception Score in pytorch-fid's Inception
features (inception.py), its weights found or fetched, the dataset side cached.

    weights = load_weights(path_or_None, cache_dir)       # pytorch-fid's .pth -> Flax variables (cached)
    features = Features(weights)                           # on every local device, split over processes
    real = reference_features(features, dataset, "train", data_dir, (32, 32, 3), cache_dir)
    pool3, logits = features.embed(uint8_images)
    report = scores(pool3, logits, real.features)         # {"fid", "kid", ..., "inception_score", ...}

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TensorFlow FID graph of
2015-12-05 ported to PyTorch; its SHA-256 starts with 6726825d, the suffix of its name). Without a path
they are looked up in the cache directory and, when absent, downloaded there once from pytorch-fid's
GitHub release ($DCGAN_JAX_INCEPTION_URL overrides the address, for a mirror). The Flax variables
converted from them are cached beside them (converted_path).
"""

import dataclasses
import hashlib
import os
import urllib.request
from typing import Optional, Tuple

from absl import logging
import flax
import numpy as np
import scipy.special

from dcgan_jax.evaluation import inception
from dcgan_jax.evaluation import metrics
from dcgan_jax import parallel
from dcgan_jax.evaluation import torch_file
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import ConfigError

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
WEIGHTS_SHA256_PREFIX = "6726825d"
URL_ENV = "DCGAN_JAX_INCEPTION_URL"
DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dcgan_jax",
                           "inception")
PER_DEVICE = 50  # images per device per call (about 1.5 GB of activations on an accelerator)
INCEPTION_SCORE_SPLITS = 10  # as in Salimans et al. 2016's code and every paper since


@dataclasses.dataclass
class Weights:
  path: str
  sha256: str
  variables: dict

  def describe(self) -> dict:
    return dict(file=os.path.basename(self.path), sha256=self.sha256,
                pytorch_fid_weights=self.sha256.startswith(WEIGHTS_SHA256_PREFIX))


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def find_weights(path: Optional[str], cache_dir: Optional[str]) -> str:
  """The weights file: `path` as given, else the cached copy, else downloaded into the cache (its hash
  checked). ConfigError (one line: the file, where to get it, the flag) when none of these works."""
  if path:
    if not os.path.isfile(path):
      raise ConfigError(f"--inception_weights={path}: file not found; pass pytorch-fid's {WEIGHTS_FILE} "
                        f"(from {WEIGHTS_URL})")
    return path
  cache_dir = cache_dir or DEFAULT_DIR
  cached = os.path.join(cache_dir, WEIGHTS_FILE)
  if os.path.isfile(cached):
    return cached
  url = os.environ.get(URL_ENV, WEIGHTS_URL)
  tmp = f"{cached}.download-{os.getpid()}"
  try:
    with urllib.request.urlopen(url, timeout=60) as response:
      logging.info("Downloading the Inception weights from %s to %s.", url, cached)
      os.makedirs(cache_dir, exist_ok=True)
      with open(tmp, "wb") as f:
        while block := response.read(1 << 20):
          f.write(block)
    if not _sha256(tmp).startswith(WEIGHTS_SHA256_PREFIX):
      raise OSError(f"the download's SHA-256 does not start with {WEIGHTS_SHA256_PREFIX}")
    os.replace(tmp, cached)
    return cached
  except (OSError, ValueError) as e:  # URLError is an OSError
    if os.path.exists(tmp):
      os.remove(tmp)
    reason = getattr(e, "reason", None) or e
    raise ConfigError(f"the Inception weights {WEIGHTS_FILE} are not in {cache_dir} and could not be "
                      f"downloaded from {url} ({reason}); download that file where there is internet and "
                      "pass --inception_weights=PATH (or put it in that directory)") from None


CONVERTED_VERSION = 1  # bump when the conversion or the network's variables change: caches then convert again


def converted_path(cache_dir: Optional[str], sha256: str) -> str:
  """Where the Flax variables converted from the weights file with this hash are cached."""
  return os.path.join(cache_dir or DEFAULT_DIR, f"converted-v{CONVERTED_VERSION}-{sha256[:16]}.msgpack")


def load_weights(path: Optional[str] = None, cache_dir: Optional[str] = None) -> Weights:
  """pytorch-fid's weights as Flax variables (see find_weights), converted once and cached by hash."""
  path = find_weights(path, cache_dir)
  sha = _sha256(path)
  if not sha.startswith(WEIGHTS_SHA256_PREFIX):
    logging.warning("%s is not pytorch-fid's %s (its SHA-256 does not start with %s): its metrics are "
                    "not comparable with papers'.", path, WEIGHTS_FILE, WEIGHTS_SHA256_PREFIX)
  converted = converted_path(cache_dir, sha)
  try:
    # The variables as saved (nested dicts of arrays): their structure is fixed by CONVERTED_VERSION, so
    # no template is traced (tracing the network for one costs about a second per process).
    with open(converted, "rb") as f:
      variables = flax.serialization.msgpack_restore(f.read())
    if isinstance(variables, dict) and set(variables) == {"params", "batch_stats"}:
      return Weights(path, sha, variables)
  except (OSError, ValueError):
    pass  # not converted yet (or damaged): convert again
  try:
    variables = inception.variables_from_state_dict(torch_file.load_state_dict(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"--inception_weights={path}: {e}; pass pytorch-fid's {WEIGHTS_FILE}") from None
  try:
    os.makedirs(os.path.dirname(converted), exist_ok=True)
    workdir_lib.write_atomic(converted, flax.serialization.to_bytes(variables))
  except OSError as e:  # an unwritable cache only costs the conversion next time
    logging.warning("Converted Inception weights not cached in %s (%s).", converted, e.strerror)
  return Weights(path, sha, variables)


# --------------------------------------------------------------------------------------------------
# Features on every device
# --------------------------------------------------------------------------------------------------
class Features:
  """pool3 features and logits of images, computed on all local devices, each process embedding its
  share (parallel.process_share) and every process receiving all of them (gather_shares). Each image's
  features depend on that image alone (inference BatchNorm), so the numbers do not depend on the
  topology."""

  def __init__(self, weights: Weights, per_device: int = PER_DEVICE):
    self.weights = weights
    self._images = parallel.over_local_devices(inception.embed, per_device)
    self._variables = self._images.place(weights.variables)
    self._generated = {}
    self._per_device = per_device

  def embed(self, images: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 (n, H, W, C) -> (pool3 float32 (n, 2048), logits float32 (n, 1008)), on every process."""
    pool3, logits = self._images(self._variables, parallel.process_share(images))
    return parallel.gather_shares(pool3, len(images)), parallel.gather_shares(logits, len(images))

  def embed_generated(self, sample, g, z) -> Tuple[np.ndarray, np.ndarray]:
    """The same for the images a generator makes from latents z (n, latent_dim): generated, rounded to
    uint8 and embedded in one program on the devices (sampling.make_sampler's `sample`)."""
    if sample not in self._generated:
      self._generated[sample] = parallel.over_local_devices(
          lambda shared, zs: inception.embed(shared[0], inception.quantise(sample(shared[1], zs))),
          self._per_device)
    share = parallel.process_share(np.asarray(z))
    pool3, logits = self._generated[sample]((self._variables, g), share)
    return parallel.gather_shares(pool3, len(z)), parallel.gather_shares(logits, len(z))


def inception_score(logits, splits: int = INCEPTION_SCORE_SPLITS) -> Tuple[float, float]:
  """Mean and standard deviation over `splits` consecutive parts of exp(E_x KL(p(y|x) || p(y))), p from
  the softmax of all 1008 logits (Salimans et al. 2016; their code, and torch-fidelity's)."""
  logits = np.asarray(logits, np.float64)
  if len(logits) < splits:
    raise ValueError(f"the Inception Score needs at least {splits} samples, got {len(logits)}")
  values = [metrics.classifier_score(scipy.special.softmax(part, axis=-1))
            for part in np.array_split(logits, splits)]
  return float(np.mean(values)), float(np.std(values))


def scores(pool3, logits, real_pool3, kid_subsets: int = 100, precision_recall: bool = True) -> dict:
  """FID, KID (mean and std over subsets of 1000), precision/recall (k = 3) against the real features,
  and the Inception Score of the samples."""
  report = dict(fid=metrics.fid(pool3, real_pool3))
  report["kid"], report["kid_std"] = metrics.kid(pool3, real_pool3, kid_subsets)
  if precision_recall:
    report["precision"], report["recall"] = metrics.precision_recall(real_pool3, pool3, k=3)
  report["inception_score"], report["inception_score_std"] = inception_score(logits)
  return report


# --------------------------------------------------------------------------------------------------
# The dataset side, cached
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Reference:
  features: np.ndarray  # float32 (n, 2048)
  description: dict  # dataset, split, count, image_shape (or the file)


def reference_features(features: Features, dataset: str, split: str, data_dir: Optional[str],
                       image_shape: tuple, cache_dir: Optional[str] = None, count: int = 0) -> Reference:
  """pool3 features of a dataset split at `image_shape` (all of it, or a seeded subset of `count`),
  cached as pytorch-fid's statistics (mu, sigma) plus the features themselves (KID and precision/recall
  need them), keyed by dataset, its contents, split, shape, count and the weights' hash."""
  from dcgan_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  from dcgan_jax.config import Config  # pylint: disable=g-import-not-at-top
  builder = input_pipeline.get_builder(Config(dataset=dataset, data_dir=data_dir))
  splits = builder.info.splits
  if splits and split not in splits:
    raise ConfigError(f"--reference_split={split}: {dataset} has splits {', '.join(sorted(splits))}")
  h, w, c = image_shape
  key = (f"{dataset}-{split}-{h}x{w}x{c}-n{count or 'all'}-{evaluator.content_fingerprint(builder)[:12]}"
         f"-w{features.weights.sha256[:12]}")
  path = os.path.join(cache_dir or DEFAULT_DIR, "reference", key + ".npz")
  description = dict(dataset=dataset, split=split, image_shape=list(image_shape))
  cached = None
  try:
    with np.load(path) as f:
      cached = f["features"]
  except (OSError, ValueError, KeyError):
    pass
  # Embedding is collective: the processes compute together unless every one has the cache (each
  # process reads its own cache directory, which need not be shared).
  if parallel.every_process(cached is not None):
    return Reference(cached, {**description, "count": len(cached)})
  images, _, _ = input_pipeline.load_images(dataset, split, data_dir, image_shape)
  if count and count < len(images):
    images = images[np.sort(np.random.default_rng(0).permutation(len(images))[:count])]
  pool3, _ = features.embed(images)
  if cached is None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mu, sigma = metrics.gaussian_stats(pool3)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, mu=mu, sigma=sigma, features=pool3)
    os.replace(tmp, path)  # whole or not at all; processes sharing the directory write the same bytes
  return Reference(pool3, {**description, "count": len(pool3)})


def describe(weights: Weights) -> dict:
  """What a report states besides the numbers: the features, the weights and the preprocessing."""
  return dict(features="inception", weights=weights.describe(), preprocessing=inception.PREPROCESSING)


class GeneratorScorer:
  """The in-training evaluation in Inception features (--eval_features=inception): the generator's
  samples against the whole train split (cached: the same reference as `evaluate --features=inception`),
  FID and KID over kid_subsets, and the Inception Score."""

  def __init__(self, weights: Weights, dataset: str, data_dir: Optional[str], image_shape: tuple,
               cache_dir: Optional[str] = None, kid_subsets: int = 20):
    self.features = Features(weights)
    self.real = reference_features(self.features, dataset, "train", data_dir, image_shape, cache_dir)
    self.kid_subsets = kid_subsets

  def score_generator(self, sample, g, z) -> dict:
    """{fid, kid, inception_score} of the images sample(g, z), the same on every process."""
    pool3, logits = self.features.embed_generated(sample, g, z)
    report = scores(pool3, logits, self.real.features, self.kid_subsets, precision_recall=False)
    return {k: float(report[k]) for k in ("fid", "kid", "inception_score")}
