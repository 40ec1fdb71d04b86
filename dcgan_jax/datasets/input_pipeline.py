"""tfds -> uint8 images at the model's resolution. The only module that imports tensorflow_datasets
(and, on the streaming path only, TensorFlow), always lazily, so the training core runs without either.

What the data paths (data.py) read through:
  * in memory (MNIST/CIFAR-sized data): `load_in_memory` returns the whole split as one uint8 array
    (N, H, W, C), read through `tfds.data_source` when the prepared files are array_record (no
    TensorFlow needed), else through `tfds.load`;
  * by index: `data_source` and `read_examples` (array_record; no TensorFlow), for host_reader.py;
  * streaming (datasets stored as tfrecord only): `stream_batches` is a tf.data pipeline with a seeded
    file and buffer shuffle, repeat, batch and prefetch, yielding uint8 (local_devices, per_device, H,
    W, C).

Pixels stay uint8 on the host and on the way to the device (4x less traffic than float32); the step
scales them to [-1, 1] (the seed's [0, 1] scaling against a tanh generator is a bug we do not copy).
"""

import contextlib
import dataclasses
import json
import os
from typing import Iterator, Optional

import numpy as np

from dcgan_jax.config import Config, ConfigError
from dcgan_jax.datasets import download

# Datasets that DCGAN practice crops before resizing: CelebA's 218x178 faces are center-cropped to
# 108x108 (the crop of carpedm20/DCGAN-tensorflow and of most DCGAN CelebA results), then resized.
CENTER_CROP = {"celeb_a": 108}


class DataUnavailableError(RuntimeError):
  """The dataset is not on disk and could not be downloaded. The message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  split: str
  num_examples: Optional[int]  # None when the metadata does not say (tfds.testing.mock_data)
  source_shape: tuple  # (h, w, c) as stored; h, w may be None for variable-size images


def _tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataUnavailableError(f"tensorflow_datasets is not installed ({e}); pip install -r requirements.txt"
                               " (or use the benchmark's synthetic data)") from None
  return tfds


def _tf():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # TF must not take GPU memory that JAX needs: it only reads and resizes images here.
  tf.config.set_visible_devices([], "GPU")
  return tf


def offline_hint(name: str) -> str:
  return (f"prepare it offline with: python -m dcgan_jax.prepare_data --dataset={name} "
          f"--idx_dir=DIR_WITH_IDX_FILES --data_dir=DATA_DIR, then pass --data_dir=DATA_DIR")


# What an import that never finished leaves in <data_dir>/<name>/: tfds's builders write into
# "incomplete.XXXX_<version>", image_folder.py into ".incomplete-<pid>".
INCOMPLETE_PREFIXES = ("incomplete.", ".incomplete-")


def interrupted_imports(data_dir: Optional[str], name: str) -> list:
  """The folders that interrupted imports of `name` left in data_dir (oldest first)."""
  folder = os.path.join(_data_dir_root(data_dir), name)
  if not os.path.isdir(folder):
    return []
  found = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(INCOMPLETE_PREFIXES)]
  return sorted(found, key=os.path.getmtime)


def _data_dir_root(data_dir: Optional[str]) -> str:
  return os.path.expanduser(data_dir or os.path.join("~", "tensorflow_datasets"))


def _interrupted(config: Config) -> Optional[DataUnavailableError]:
  """A one-line error for a dataset whose only import never finished, naming the command that redoes
  it (recorded by the import when it started), else None."""
  left = interrupted_imports(config.data_dir, config.dataset)
  if not left:
    return None
  command = None
  try:
    with open(os.path.join(left[-1], STARTED)) as f:
      command = json.load(f)["command"]
  except (OSError, ValueError, KeyError):
    pass
  if command is None and config.dataset in ("mnist", "fashion_mnist", "stacked_mnist", "stacked_fashion_mnist"):
    command = (f"python -m dcgan_jax.prepare_data --dataset={config.dataset} --idx_dir=DIR_WITH_IDX_FILES "
               f"--data_dir={_data_dir_root(config.data_dir)}")
  return DataUnavailableError(
      f"dataset {config.dataset!r}: its import into {_data_dir_root(config.data_dir)} was interrupted (it "
      f"left {left[-1]}) and never finished; run the import again"
      + (f": {command}" if command else " (python -m dcgan_jax.prepare_data)"))


STARTED = "import_started.json"  # {"command": ...}: written first into an import's incomplete folder


def get_builder(config: Config):
  """The tfds builder, downloaded and prepared if needed, or a one-line error saying what to do."""
  tfds = _tfds()
  try:
    builder = tfds.builder(config.dataset, data_dir=config.data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise (_interrupted(config) or ConfigError(
        f"--dataset={config.dataset!r}: not a tfds dataset; use a name from tfds.list_builders(), e.g. "
        "mnist, fashion_mnist, cifar10, celeb_a.")) from None
  except Exception as e:  # pylint: disable=broad-except  (damaged metadata of a prepared dataset)
    raise DataUnavailableError(
        f"dataset {config.dataset!r} in {_data_dir_root(config.data_dir)}: its metadata cannot be read "
        f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); delete "
        f"{os.path.join(_data_dir_root(config.data_dir), config.dataset)} and import or prepare it "
        "again") from None
  if "image" not in builder.info.features:
    raise ConfigError(f"--dataset={config.dataset!r}: has no 'image' feature; use an image dataset.")
  try:
    download.download_and_prepare(builder)  # a no-op when already prepared in data_dir
  except Exception as e:  # pylint: disable=broad-except
    interrupted = _interrupted(config)
    if interrupted:
      raise interrupted from None
    hint = offline_hint(config.dataset) if config.dataset in ("mnist", "fashion_mnist") else \
        "download and prepare it on a machine with network (tfds build), then copy it into --data_dir"
    raise DataUnavailableError(
        f"dataset {config.dataset!r} is not in --data_dir={config.data_dir} and could not be downloaded "
        f"({type(e).__name__}); {hint}") from None
  if builder.info.splits and config.split not in builder.info.splits:
    raise ConfigError(f"--split={config.split!r}: {config.dataset} has splits "
                      f"{', '.join(sorted(builder.info.splits))}; pick one of them.")
  return builder


def dataset_spec(config: Config, builder=None) -> DatasetSpec:
  builder = builder or get_builder(config)
  split = builder.info.splits.get(config.split) if builder.info.splits else None
  return DatasetSpec(config.dataset, config.split, split.num_examples if split else None,
                     tuple(builder.info.features["image"].shape))


def choose_in_memory(config: Config, spec: DatasetSpec, image_shape: tuple) -> bool:
  if config.in_memory != "auto":
    return config.in_memory == "true"
  if spec.num_examples is None:
    return True
  return spec.num_examples * int(np.prod(image_shape)) <= config.max_in_memory_mb * 2**20


# --------------------------------------------------------------------------------------------------
# Preprocessing (numpy / jax, TensorFlow-free): center crop, resize, channel conversion.
# --------------------------------------------------------------------------------------------------
def preprocess(images: np.ndarray, dataset: str, image_shape: tuple) -> np.ndarray:
  """uint8 (n, h, w, c) -> uint8 (n, H, W, C) = image_shape.

  Crops the center square (CENTER_CROP[dataset] if set, else the shorter side), resizes with
  antialiased bilinear interpolation, converts 1 <-> 3 channels. Rounds to uint8.
  """
  size, _, channels = image_shape
  h, w = images.shape[1:3]
  crop = min(CENTER_CROP.get(dataset, min(h, w)), h, w)
  top, left = (h - crop) // 2, (w - crop) // 2
  images = images[:, top:top + crop, left:left + crop]
  if images.shape[-1] != channels:
    if channels == 3:
      images = np.repeat(images, 3, axis=-1)
    else:  # ITU-R 601 luma, as PIL's "L" conversion
      images = np.round(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
      images = images.astype(np.uint8)
  if crop != size:
    import jax  # pylint: disable=g-import-not-at-top
    out = []
    for chunk in np.array_split(images, max(1, len(images) // 4096)):
      x = jax.image.resize(chunk.astype(np.float32), (len(chunk), size, size, channels), "linear",
                           antialias=True)
      out.append(np.clip(np.round(np.asarray(x)), 0, 255).astype(np.uint8))
    images = np.concatenate(out)
  return np.ascontiguousarray(images)


def data_source(builder, split: str):
  """The split as a random-access `tfds.data_source` (array_record files; no TensorFlow needed), or None
  when the prepared files are tfrecord only."""
  tfds = _tfds()
  array_record = tfds.core.file_adapters.FileFormat.ARRAY_RECORD
  if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
    # The metadata on disk lists every stored file format (prepare_data adds array_record beside
    # tfrecord); the registered builder's code-side info only knows the primary one.
    builder = tfds.builder_from_directory(builder.data_dir)
  if array_record not in builder.info.available_file_formats():
    return None
  check_shards(builder, split)
  return builder.as_data_source(split=split, file_format=array_record)


def check_shards(builder, split: str) -> None:
  """DataUnavailableError naming the first array_record shard of `split` that is missing, or holds
  another number of records than the dataset's metadata says (cut short by a kill, a full disk or an
  incomplete copy). Reads each shard's footer only: seconds for any size. Damage inside a shard is
  found when it is read (`damaged_data`)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  info = builder.info.splits[split]
  lengths = list(info.shard_lengths)
  pattern = f"{builder.info.name}-{split}.array_record-"
  for i, expected in enumerate(lengths):
    path = os.path.join(builder.data_dir, f"{pattern}{i:05d}-of-{len(lengths):05d}")
    try:
      reader = array_record_module.ArrayRecordReader(path)
      found = reader.num_records()
      reader.close()
      problem = f"{found} records where the dataset's metadata says {expected}"
    except Exception as e:  # pylint: disable=broad-except
      found, problem = None, f"unreadable: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__}"
    if found != expected:
      raise DataUnavailableError(f"{path}: damaged or incomplete ({problem}); " + rebuild_hint(builder))


def rebuild_hint(builder) -> str:
  """How to make a prepared dataset again, in words: the import command that wrote it, where known."""
  version_dir = str(builder.data_dir)
  name = builder.info.name
  root = os.path.dirname(os.path.dirname(version_dir))
  try:
    with open(os.path.join(version_dir, "import_report.json")) as f:
      report = json.load(f)
  except (OSError, ValueError):
    report = {}
  if "stack_seed" in report:
    command = (f"--dataset={name} --idx_dir=DIR_WITH_{report['source'].upper()}_IDX_FILES "
               f"--stack_seed={report['stack_seed']}")
  elif "source" in report and "shape" in report:
    size, _, channels = report["shape"]
    command = (f"--image_dir={report['source']} --dataset={name} --image_size={size} "
               f"--crop={report.get('crop', 'center')} --channels={channels}")
  elif name in ("mnist", "fashion_mnist"):
    command = f"--dataset={name} --idx_dir=DIR_WITH_IDX_FILES"
  else:
    return f"delete {version_dir} and prepare the dataset again (tfds build {name} --data_dir={root})"
  return f"import it again: python -m dcgan_jax.prepare_data {command} --data_dir={root}"


@contextlib.contextmanager
def damaged_data(builder, split: str):
  """Any error while reading prepared records -> one DataUnavailableError naming the dataset and the
  command that rebuilds it (on the reader's threads too: the loop re-raises it from there)."""
  try:
    yield
  except DataUnavailableError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise DataUnavailableError(
        f"{builder.info.name}:{split} in {builder.data_dir}: damaged records ({type(e).__name__}: {first}); "
        + rebuild_hint(builder)) from None


def read_examples(source, indices, dataset: str, image_shape: tuple) -> np.ndarray:
  """uint8 images (len(indices), H, W, C) at image_shape: the examples `indices` of a data_source,
  decoded and preprocessed."""
  raw = np.stack([ex["image"] for ex in source.__getitems__([int(i) for i in indices])])
  return preprocess((raw[..., None] if raw.ndim == 3 else raw).astype(np.uint8), dataset, image_shape)


def read_split(builder, split: str, features=("image",)) -> dict:
  """Whole split as numpy arrays {feature: (N, ...)}, in the stored order. Images are raw (as stored).

  Read through `tfds.data_source` when the prepared files include array_record (no TensorFlow needed),
  else through `tfds.load`'s tf.data path.
  """
  tfds = _tfds()
  source = data_source(builder, split)
  with damaged_data(builder, split):
    if source is not None:
      n = len(source)
      chunks = [source.__getitems__(list(range(i, min(i + 4096, n)))) for i in range(0, n, 4096)]
      return {f: np.concatenate([np.stack([ex[f] for ex in c]) for c in chunks]) for f in features}
    _tf()
    # Batches of 4096 rather than batch_size=-1: TF 2.21 aborts (std::length_error) on the latter.
    ds = builder.as_dataset(split=split).map(lambda ex: {f: ex[f] for f in features}).batch(4096)
    batches = list(tfds.as_numpy(ds))
    return {f: np.concatenate([b[f] for b in batches]) for f in features}


def load_in_memory(config: Config, image_shape: tuple, builder=None) -> np.ndarray:
  """The whole split as uint8 (N, H, W, C) at image_shape = (H, W, C)."""
  builder = builder or get_builder(config)
  raw = read_split(builder, config.split)["image"]
  if raw.ndim == 3:
    raw = raw[..., None]
  return preprocess(raw.astype(np.uint8), config.dataset, image_shape)


def load_images(dataset: str, split: str, data_dir: Optional[str], image_shape: tuple):
  """(uint8 images (N, H, W, C) at image_shape, int32 labels (N,) or None, number of classes or None)
  of a split, for the evaluator network: labels when the dataset has a ClassLabel 'label' feature."""
  config = Config(dataset=dataset, split=split, data_dir=data_dir)
  builder = get_builder(config)
  label = builder.info.features["label"] if "label" in builder.info.features else None
  num_classes = getattr(label, "num_classes", None) or None
  arrays = read_split(builder, split, ("image", "label") if num_classes else ("image",))
  raw = arrays["image"]
  if raw.ndim == 3:
    raw = raw[..., None]
  labels = arrays["label"].astype(np.int32) if num_classes else None
  return preprocess(raw.astype(np.uint8), dataset, image_shape), labels, num_classes


def stream_batches(config: Config, image_shape: tuple, local_devices: int, per_device_batch: int,
                   process_index: int = 0, process_count: int = 1, builder=None) -> Iterator[np.ndarray]:
  """tf.data pipeline: yields uint8 (local_devices, per_device_batch, H, W, C) forever.

  Seeded (file order, shuffle buffer) but, unlike the in-memory path, its position is not a pure
  function of the step: a resumed run sees a different order.
  """
  builder = builder or get_builder(config)
  tfds, tf = _tfds(), _tf()
  size, _, channels = image_shape
  crop = CENTER_CROP.get(config.dataset)
  read_config = tfds.ReadConfig(shuffle_seed=config.seed,
                                input_context=tf.distribute.InputContext(process_count, process_index))

  def prep(example):
    img = example["image"]
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    side = tf.minimum(h, w) if crop is None else tf.minimum(crop, tf.minimum(h, w))
    img = tf.image.crop_to_bounding_box(img, (h - side) // 2, (w - side) // 2, side, side)
    if img.shape[-1] != channels:
      img = tf.image.grayscale_to_rgb(img) if channels == 3 else tf.image.rgb_to_grayscale(img)
    img = tf.image.resize(tf.cast(img, tf.float32), (size, size), "bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(img), 0, 255), tf.uint8)

  ds = builder.as_dataset(split=config.split, shuffle_files=True, read_config=read_config)
  ds = ds.map(prep, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.shuffle(config.shuffle_buffer, seed=config.seed).repeat()
  ds = ds.batch(local_devices * per_device_batch, drop_remainder=True)
  ds = ds.map(lambda x: tf.reshape(x, (local_devices, per_device_batch) + tuple(image_shape)))
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return iter(tfds.as_numpy(ds))


def dataset_channels(spec: DatasetSpec, override: Optional[int]) -> int:
  return override or spec.source_shape[-1]
