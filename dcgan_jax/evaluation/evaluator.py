"""The evaluator network, offline: no downloaded Inception weights (its scoring: scoring.py).

For a labelled dataset (mnist, fashion_mnist, cifar10, an image folder with class subfolders, ...) the
library trains a small CNN classifier itself, on the train split, with a fixed seed, and caches it
(--evaluator_dir, default ~/.cache/dcgan_jax/evaluators). Its 128-d penultimate activations, scaled to
unit RMS on the real split, are the features of FID, KID and precision/recall; its class probabilities
give class coverage, the class KL and the classifier score.

A dataset without labels (an image folder without class subfolders) gets the same network trained
self-supervised, to predict by how many quarter turns an image was rotated (RotNet: Gidaris et al.
2018, "Unsupervised representation learning by predicting image rotations"): recognising which way is
up needs the shapes of the objects, so its features separate real from generated images without any
label. Its FID, KID, precision and recall are given; class coverage, the class KL and the classifier
score are not (there are no classes), and the report says so.

The real side of every metric is the `test` split, or `train` for datasets that have only that (image
folders); the report's `real_split` says which. The cache is keyed by the dataset's contents (the
fingerprint prepare_data writes for image folders, else the stored split sizes), so a folder imported
again under the same name gets a new evaluator.

    evaluator = load_or_train("fashion_mnist", data_dir, (28, 28, 1))   # trains once (~1 min on CPU)
    features, probs = evaluator.embed(uint8_images)

Numbers from this evaluator are comparable with each other (same evaluator, same sample count), not with
published Inception-FIDs: the features, their dimension and the data they were trained on all differ.
"""

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Optional, Tuple

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcgan_jax.config import ConfigError

VARIABLES = "variables.msgpack"
VERSION = 3  # bump when the network or its training changes: cached evaluators are then retrained
DEFAULT_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dcgan_jax",
                           "evaluators")
TRAIN = dict(seed=0, epochs=3, batch_size=128, learning_rate=1e-3)


class Classifier(nn.Module):
  """conv32/2 - conv64/2 - dense128 - dense(classes), ReLU. Strided convolutions rather than pooling: a
  third of the work, which matters on CPU where it is trained. x: float32 (n, H, W, C) in [-1, 1].
  Returns (features float32 (n, 128), logits float32 (n, classes))."""
  num_classes: int
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(32, (3, 3), (2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), (2, 2))(x))
    features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(self.num_classes)(features)


def features_program(num_classes: int):
  """The embedding program, jitted: (variables, uint8 images (n, H, W, C)) -> (features, logits)."""
  model = Classifier(num_classes)
  return jax.jit(lambda variables, images: model.apply(variables, _to_float(images)))


def _to_float(images):
  return images.astype(jnp.float32) / 127.5 - 1.0  # the generator's range


ROTATIONS = 4  # the label-free evaluator's classes: 0, 90, 180, 270 degrees


def rotate(images, quarter_turns):
  """uint8 (n, H, W, C) square images, int (n,) in 0..3 -> each image turned counter-clockwise."""
  turned = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(ROTATIONS)])
  return turned[quarter_turns, jnp.arange(images.shape[0])]


def rotation_labels(n: int, seed: int) -> np.ndarray:
  """int32 (n,): a fixed quarter-turn count per example (the rotation task's labels)."""
  return np.random.default_rng(seed).integers(0, ROTATIONS, n).astype(np.int32)


def train_classifier(images: np.ndarray, labels: Optional[np.ndarray], num_classes: int, seed: int,
                     epochs: int, batch_size: int, learning_rate: float) -> dict:
  """Trains the Classifier with Adam on uint8 images (N, H, W, C) and int labels (N,); returns its
  variables. The data stay on the device; each step gathers a batch from a seeded per-epoch order.
  labels=None: the rotation task (num_classes = ROTATIONS), each batch turned by fresh seeded turns."""
  model = Classifier(num_classes)
  params = model.init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))["params"]
  tx = optax.adam(learning_rate)
  data = jnp.asarray(images)
  targets = None if labels is None else jnp.asarray(labels)

  @jax.jit
  def step(params, opt_state, idx, turns):
    x, y = (data[idx], targets[idx]) if targets is not None else (rotate(data[idx], turns), turns)

    def loss_fn(p):
      _, logits = model.apply({"params": p}, _to_float(x))
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  order = np.random.default_rng(seed)
  batch_size = min(batch_size, len(images))
  for epoch in range(epochs):
    perm = order.permutation(len(images))
    for i in range(len(images) // batch_size):
      turns = order.integers(0, ROTATIONS, batch_size).astype(np.int32)
      params, opt_state, loss = step(params, opt_state, perm[i * batch_size:(i + 1) * batch_size], turns)
    logging.info("Evaluator epoch %d/%d: loss %.4f", epoch + 1, epochs, float(loss))
  return {"params": params}


@dataclasses.dataclass
class Evaluator:
  """A trained classifier (of classes, or of rotations for unlabelled data) and what it was trained on."""
  dataset: str
  image_shape: tuple
  num_classes: int  # outputs of the network: the dataset's classes, or ROTATIONS when label_free
  test_accuracy: float  # on the real split (of the rotation task when label_free)
  path: str
  variables: dict
  feature_scale: float = 1.0  # raw features are divided by it: their RMS over the real split
  label_free: bool = False
  real_split: str = "test"

  def __post_init__(self):
    self._apply = features_program(self.num_classes)

  def embed(self, images: np.ndarray, batch_size: int = 1000) -> Tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, C) -> (float32 features (n, 128), float32 class probabilities (n, classes))."""
    feats, probs = [], []
    for i in range(0, len(images), batch_size):
      f, logits = self._apply(self.variables, images[i:i + batch_size])
      feats.append(np.asarray(f) / np.float32(self.feature_scale))
      probs.append(np.asarray(jax.nn.softmax(logits)))
    return np.concatenate(feats), np.concatenate(probs)

  def describe(self) -> dict:
    return dict(name=f"dcgan_jax-cnn-v{VERSION}" + ("-rotation" if self.label_free else ""),
                dataset=self.dataset, task="rotation" if self.label_free else "classes",
                test_accuracy=self.test_accuracy, real_split=self.real_split, feature_dim=128,
                path=self.path)


def cache_path(cache_dir: str, dataset: str, image_shape: tuple, num_train: int, fingerprint: str) -> str:
  h, w, c = image_shape
  return os.path.join(cache_dir, f"{dataset}-{h}x{w}x{c}-n{num_train}-{fingerprint[:12]}-seed{TRAIN['seed']}"
                                 f"-v{VERSION}")


def content_fingerprint(builder) -> str:
  """What the evaluator cache is keyed by: the import fingerprint of an image folder (a hash of every
  record), else a hash of the stored version and split sizes (for tfds's own datasets, whose contents a
  version pins)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  from dcgan_jax.datasets import image_folder  # pylint: disable=g-import-not-at-top
  imported = image_folder.fingerprint(str(builder.data_dir))
  if imported:
    return imported
  splits = builder.info.splits or {}
  facts = dict(version=str(builder.info.version), splits={
      name: [s.num_examples, int(s.num_bytes), list(s.shard_lengths)] for name, s in splits.items()})
  return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def real_split(builder) -> str:
  """The split generated samples are compared with: `test`, or `train` when it is the only one."""
  splits = builder.info.splits
  if not splits or "test" in splits:  # (no split metadata at all: tfds.testing.mock_data)
    return "test"
  if "train" in splits:
    return "train"
  raise ConfigError(f"--dataset={builder.info.name!r}: has neither a 'test' nor a 'train' split (has "
                    f"{', '.join(sorted(splits))}); evaluation needs one of them")


def load_or_train(dataset: str, data_dir: Optional[str], image_shape: tuple,
                  cache_dir: Optional[str] = None) -> Evaluator:
  """The cached evaluator for (dataset contents, image shape), trained and cached first if absent."""
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  from dcgan_jax.config import Config  # pylint: disable=g-import-not-at-top
  cache_dir = cache_dir or DEFAULT_DIR
  config = Config(dataset=dataset, data_dir=data_dir)
  builder = input_pipeline.get_builder(config)
  split = real_split(builder)
  # The train size and the contents key the cache; both come from the metadata, so that a cached
  # evaluator is loaded without reading the train split (only tfds.testing.mock_data has no sizes).
  train = None
  num_train = input_pipeline.dataset_spec(config, builder).num_examples
  if num_train is None:
    train = input_pipeline.load_images(dataset, "train", data_dir, image_shape)
    num_train = len(train[0])
  path = os.path.abspath(cache_path(cache_dir, dataset, image_shape, num_train,
                                    content_fingerprint(builder)))
  if os.path.exists(path):
    try:
      return _announce(_load(path, dataset, image_shape))
    except Exception as e:  # pylint: disable=broad-except  (damaged on disk: train it again)
      aside = f"{path}.unreadable-{os.getpid()}"
      logging.warning("Evaluator cache %s is unreadable (%s); moved to %s, training it again.", path,
                      type(e).__name__, aside)
      os.replace(path, aside)

  # ---- Train, test, and cache (written to a temporary directory, then renamed: never half-written) --
  t0 = time.time()
  train_x, train_y, classes = train or input_pipeline.load_images(dataset, "train", data_dir, image_shape)
  label_free = classes is None
  if label_free and image_shape[0] != image_shape[1]:
    raise ConfigError(f"--dataset={dataset!r}: has no labels, and the label-free evaluator (rotation "
                      f"prediction) needs square images, not {image_shape[0]}x{image_shape[1]}")
  num_classes = ROTATIONS if label_free else classes
  logging.info("Training the %s evaluator (%s; cached in %s afterwards).", dataset,
               "rotation prediction: the dataset has no labels" if label_free else f"{classes} classes", path)
  variables = train_classifier(train_x, None if label_free else train_y, num_classes, TRAIN["seed"],
                               TRAIN["epochs"], TRAIN["batch_size"], TRAIN["learning_rate"])
  del train_x, train_y
  test_x, test_y, _ = input_pipeline.load_images(dataset, split, data_dir, image_shape)
  if label_free:  # the rotation task on the real split, one fixed turn per image
    test_y = rotation_labels(len(test_x), TRAIN["seed"])
    test_x = np.asarray(rotate(jnp.asarray(test_x), jnp.asarray(test_y)))
  evaluator = Evaluator(dataset, tuple(image_shape), num_classes, 0.0, path, variables,
                        label_free=label_free, real_split=split)
  features, probs = evaluator.embed(test_x)
  evaluator.test_accuracy = float(np.mean(probs.argmax(1) == test_y))
  # Unit RMS features: the KID kernel (x.y / d + 1)^3 then sees x.y / d ~ 1, as with Inception features
  # (with raw ReLU features of RMS ~2 its values, and the variance of the estimate, grow ~30x).
  evaluator.feature_scale = float(np.sqrt(np.mean(np.square(features, dtype=np.float64))))
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir)
  # msgpack, not orbax: a file of this process alone (orbax's save is collective in a multi-process run,
  # and here one process trains and caches while the others wait).
  with open(os.path.join(tmp, VARIABLES), "wb") as f:
    f.write(flax.serialization.to_bytes(jax.device_get(variables)))
  with open(os.path.join(tmp, "evaluator.json"), "w") as f:
    json.dump(dict(dataset=dataset, image_shape=list(image_shape), num_classes=num_classes,
                   label_free=label_free, real_split=split, train_examples=num_train,
                   test_accuracy=evaluator.test_accuracy, feature_scale=evaluator.feature_scale,
                   version=VERSION, train_settings=TRAIN, train_seconds=round(time.time() - t0, 1)), f,
              indent=2)
  try:
    os.rename(tmp, path)  # fails if another process cached it meanwhile: then keep theirs
  except OSError:
    if not os.path.exists(os.path.join(path, "evaluator.json")):
      raise
    shutil.rmtree(tmp)
  logging.info("Evaluator trained in %.0fs: %s accuracy %.4f on %s.", time.time() - t0,
               "rotation" if label_free else "test", evaluator.test_accuracy, split)
  return _announce(evaluator)


def _load(path: str, dataset: str, image_shape: tuple) -> Evaluator:
  with open(os.path.join(path, "evaluator.json")) as f:
    meta = json.load(f)
  num_classes = meta["num_classes"]
  like = {"params": Classifier(num_classes).init(jax.random.key(0), jnp.zeros((1,) + image_shape))[
      "params"]}
  with open(os.path.join(path, VARIABLES), "rb") as f:
    variables = flax.serialization.from_bytes(like, f.read())
  return Evaluator(dataset, tuple(image_shape), num_classes, meta["test_accuracy"], path, variables,
                   meta["feature_scale"], meta["label_free"], meta["real_split"])


def _announce(evaluator: Evaluator) -> Evaluator:
  if evaluator.label_free:
    logging.info("%s has no labels: FID, KID, precision and recall use a rotation-prediction feature "
                 "network; class coverage, class KL and classifier score need labels and are not "
                 "reported.", evaluator.dataset)
  if evaluator.real_split != "test":
    logging.info("%s has no test split: samples are compared with the %s split.", evaluator.dataset,
                 evaluator.real_split)
  return evaluator


# --------------------------------------------------------------------------------------------------
# Samples in, numbers out
# --------------------------------------------------------------------------------------------------
def as_uint8_images(samples: np.ndarray, image_shape: tuple) -> np.ndarray:
  """Samples made anywhere -> uint8 (n, H, W, C) as the evaluator reads them.

  Accepts uint8 in [0, 255] or float in [-1, 1]; (n, H, W), (n, H, W, C) or (n, C, H, W). Floats are
  quantised to uint8 like the real data (round((x + 1) * 127.5)), so both sides of a metric are 8-bit.
  """
  x = np.asarray(samples)
  h, w, c = image_shape
  if x.ndim == 3 and c == 1:
    x = x[..., None]
  if x.ndim == 4 and x.shape[1:] == (c, h, w) and x.shape[1:] != (h, w, c):
    x = x.transpose(0, 2, 3, 1)
  if x.ndim != 4 or x.shape[1:] != (h, w, c):
    raise ConfigError(f"samples have shape {x.shape}; the {h}x{w}x{c} evaluator needs (n, {h}, {w}, {c}) "
                      f"(or (n, {h}, {w}) / (n, {c}, {h}, {w})); make samples at the dataset's resolution")
  if x.dtype == np.uint8:
    return x
  if x.dtype.kind in "iu":
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ConfigError(f"integer samples span [{x.min()}, {x.max()}]; pass pixel values in [0, 255]")
    return x.astype(np.uint8)
  if x.dtype.kind != "f":
    raise ConfigError(f"samples have dtype {x.dtype}; pass uint8 in [0, 255] or float in [-1, 1]")
  x = x.astype(np.float64)
  if not np.all(np.isfinite(x)):
    raise ConfigError("samples contain NaN or inf; the generator that made them diverged")
  if x.min() < -1.001 or x.max() > 1.001:
    raise ConfigError(f"float samples span [{x.min():.3g}, {x.max():.3g}], outside [-1, 1]; pass floats "
                      "in [-1, 1] (tanh output) or uint8 in [0, 255]")
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
