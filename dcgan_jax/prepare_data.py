"""Offline data: IDX files (MNIST / Fashion-MNIST) or a folder of images -> a tfds dataset in --data_dir.

    python -m dcgan_jax.prepare_data --image_dir=DIR --dataset=NAME --data_dir=D --image_size=64

imports any folder of images (image_folder.py: formats, labels from subfolders, the skipped-file
report); it prints a progress bar and ends with one JSON line. For MNIST / Fashion-MNIST from IDX files:

    python -m dcgan_jax.prepare_data --dataset=fashion_mnist \
        --idx_dir=/usr/share/datasets/fashion-mnist --data_dir=data/tfds

Afterwards `tfds.load("fashion_mnist", data_dir="data/tfds")`, `tfds.data_source(...)` and the trainer
(`--data_dir=data/tfds`) read it with no network. Why not tfds's own `manual_dir`: it verifies the
download checksums, and redistributed copies (e.g. Debian's dataset-fashion-mnist, which recompresses
the .gz files) have other checksums although the pixels are the same.

The files are validated first (IDX magic numbers, header sizes against file lengths, image shape, label
range, matching image/label counts); any problem is a one-line error naming the file. The dataset is
written by the registered tfds builder itself (same name, version and features) with only its download
step replaced: as tfrecord (what `tfds.load` reads) plus array_record as an alternative format (what
`tfds.data_source` reads, also where TensorFlow is not installed).

    python -m dcgan_jax.prepare_data --convert=DATA_DIR/celeb_a/2.1.0

writes a tfds dataset that was prepared as tfrecord only (tfds' default) again as array_record, so the
trainer reads it by index (exact order and resume) instead of streaming it with tf.data.
"""

import contextlib
import glob
import gzip
import json
import os

from absl import flags
import numpy as np

from dcgan_jax import cli
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import ConfigError
from dcgan_jax.cli import exit_with_error

DATASETS = ("mnist", "fashion_mnist", "stacked_mnist", "stacked_fashion_mnist")  # stacked.py: 1,000 modes
SPLIT_FILES = {  # split -> (images, labels), the names LeCun's and Zalando's distributions use
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
STANDARD_COUNTS = {"train": 60000, "test": 10000}
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x00000803: uint8, 3 dims; 0x00000801: uint8, 1 dim

flags.DEFINE_string("dataset", None, f"With --idx_dir: which tfds dataset the IDX files are ({', '.join(DATASETS)}). "
                    "With --image_dir: the name to give the imported dataset (then train with --dataset=NAME).")
flags.DEFINE_string("idx_dir", None, "Directory holding the four IDX files (.gz or uncompressed); for a "
                    "stacked_* dataset, those of its source (mnist / fashion_mnist).")
flags.DEFINE_integer("stack_seed", 0, "For stacked_mnist / stacked_fashion_mnist: the seed that draws "
                     "which three source images each example stacks.",
                     lower_bound=0, upper_bound=2**32 - 1)
flags.DEFINE_string("image_dir", None, "Instead: a folder (nested folders too) of PNG/JPEG/BMP/GIF/WebP images "
                    "to import as --dataset; two or more first-level subfolders become class labels.")
flags.DEFINE_integer("image_size", 64, "With --image_dir: the side the images are stored at (train at it).",
                     lower_bound=8, upper_bound=2048)
flags.DEFINE_enum("crop", "center", ["center", "none"], "With --image_dir: keep the central square (center) "
                  "or squeeze the whole image square (none).")
flags.DEFINE_enum("channels", None, ["1", "3"], "With --image_dir: channels to store; default 3 when any "
                  "image is in colour, else 1.")
flags.DEFINE_string("data_dir", None, "tfds data directory to write into (then pass it as --data_dir).")
flags.DEFINE_string("convert", None, "Instead: a prepared tfds dataset version directory stored as tfrecord "
                    "(e.g. DATA_DIR/celeb_a/2.1.0), to write again as array_record for the trainer's "
                    "random-access path.")


class IdxError(ValueError):
  """An IDX file is missing or malformed. One line: the file and the problem."""


def _find(idx_dir: str, stem: str) -> str:
  for name in (stem, stem + ".gz"):
    if os.path.exists(os.path.join(idx_dir, name)):
      return os.path.join(idx_dir, name)
  raise IdxError(f"{os.path.join(idx_dir, stem)}[.gz]: not found; --idx_dir must hold "
                 f"{', '.join(f for pair in SPLIT_FILES.values() for f in pair)} (.gz or not)")


def read_idx(path: str, magic: int) -> np.ndarray:
  """Reads a uint8 IDX file (optionally gzipped), checking the magic number and the sizes."""
  try:
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise IdxError(f"{path}: cannot be read ({e})") from None
  ndim = magic & 0xFF
  if len(raw) < 4 + 4 * ndim:
    raise IdxError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
  found = int.from_bytes(raw[:4], "big")
  if found != magic:
    raise IdxError(f"{path}: magic number {found}, expected {magic} "
                   f"({'images' if magic == IMAGES_MAGIC else 'labels'} file, uint8, {ndim} dims)")
  dims = tuple(int(d) for d in np.frombuffer(raw[4:4 + 4 * ndim], ">u4"))
  body = raw[4 + 4 * ndim:]
  if len(body) != int(np.prod(dims)):
    raise IdxError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes of data, file has {len(body)}")
  return np.frombuffer(body, np.uint8).reshape(dims)


def read_split(idx_dir: str, split: str):
  """Returns (images uint8 (n, 28, 28, 1), labels int64 (n,)), validated."""
  images_path, labels_path = (_find(idx_dir, stem) for stem in SPLIT_FILES[split])
  images, labels = read_idx(images_path, IMAGES_MAGIC), read_idx(labels_path, LABELS_MAGIC)
  if images.shape[1:] != (28, 28):
    raise IdxError(f"{images_path}: images are {images.shape[1:]}, expected 28x28")
  if len(images) != len(labels):
    raise IdxError(f"{images_path}: {len(images)} images but {labels_path} has {len(labels)} labels")
  if labels.size and labels.max() > 9:
    raise IdxError(f"{labels_path}: label {labels.max()} outside 0..9")
  return images[..., None], labels.astype(np.int64)


def prepare(dataset: str, idx_dir: str, data_dir: str):
  """Validates the IDX files and writes the tfds dataset. Returns (its directory, {split: count})."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if dataset not in DATASETS[:2]:
    raise IdxError(f"--dataset={dataset!r}: IDX import supports {', '.join(DATASETS)}")
  arrays = {split: read_split(idx_dir, split) for split in SPLIT_FILES}  # validate all before writing

  class OfflineBuilder(tfds.builder_cls(dataset), skip_registration=True):
    """The registered builder with its download replaced by the validated local arrays."""
    name = dataset

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      return {split: self._generate_examples(*arrays[split]) for split in arrays}

    def _generate_examples(self, images, labels):  # pylint: disable=arguments-differ
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": image, "label": int(label)}

  with importing(data_dir, dataset):
    builder = OfflineBuilder(data_dir=data_dir, file_format="tfrecord")
    builder.download_and_prepare()
    # tfds.load reads tfrecord, tfds.data_source reads array_record (and needs no TensorFlow): both.
    add_array_record(builder.data_dir)
  return builder.data_dir, {split: len(labels) for split, (_, labels) in arrays.items()}


def prepare_stacked(dataset: str, idx_dir: str, data_dir: str, seed: int = 0):
  """stacked.py's 1,000-mode dataset from the source's IDX files (validated as for `prepare`), written
  as array_record with a content fingerprint (import_report.json) that keys its evaluator. Returns (its
  directory, {split: count})."""
  from dcgan_jax.datasets import stacked  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in SPLIT_FILES:
    images, labels = read_split(idx_dir, split)
    arrays[split] = stacked.stack(images[..., 0], labels, seed, split)
  with importing(data_dir, dataset):
    return _write_stacked(dataset, data_dir, seed, arrays)


def _write_stacked(dataset, data_dir, seed, arrays):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dcgan_jax.datasets import image_folder  # pylint: disable=g-import-not-at-top
  from dcgan_jax.datasets import stacked  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(28, 28, 3), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES),
      "label": tfds.features.ClassLabel(num_classes=stacked.NUM_MODES)})
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=dataset, version=image_folder.VERSION, features=features, data_dir=data_dir,
      split_datasets={split: [(i, {"image": image, "label": int(label)})
                              for i, (image, label) in enumerate(zip(*arrays[split]))] for split in arrays},
      description=f"{dataset}: three {stacked.SOURCES[dataset]} images as R, G, B (1,000 modes), "
                  f"--stack_seed={seed}, by dcgan_jax.prepare_data.",
      file_format="array_record", disable_shuffling=True)
  report = dict(dataset=dataset, source=stacked.SOURCES[dataset], stack_seed=seed,
                fingerprint=stacked.fingerprint(stacked.SOURCES[dataset], seed, arrays))
  workdir_lib.write_atomic(os.path.join(str(builder.data_dir), image_folder.REPORT), json.dumps(report, indent=1))
  return builder.data_dir, {split: len(labels) for split, (_, labels) in arrays.items()}


@contextlib.contextmanager
def importing(data_dir: str, name: str):
  """While tfds writes dataset `name` into data_dir: the dataset's folder locked against a second
  import, and what killed imports left there removed first. ConfigError (one line) when data_dir cannot
  be written or another import holds the folder; checked before anything is read or written."""
  from dcgan_jax.datasets import image_folder  # pylint: disable=g-import-not-at-top
  workdir_lib.check_writable(data_dir, "--data_dir")
  with workdir_lib.RunLock([os.path.join(data_dir, name)], "--dataset", "another import", None).claim():
    image_folder.remove_interrupted(os.path.join(data_dir, name))
    yield


def add_array_record(version_dir: str) -> int:
  """Writes every tfrecord shard of a prepared tfds dataset version (e.g. DATA_DIR/celeb_a/2.1.0) again
  as array_record, record for record (the same serialized examples, the same shard lengths), and
  registers array_record as an alternative format, so that `tfds.data_source` (and the trainer's
  random-access path) can read it. Returns the number of shards written (0: already there).
  (tfds's own converter, `tfds convert_format`, needs apache_beam.)"""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    raise IdxError(f"--convert={version_dir}: not a prepared tfds dataset version (no dataset_info.json); "
                   "pass a directory like DATA_DIR/celeb_a/2.1.0")
  builder = tfds.builder_from_directory(version_dir)
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats():
    return 0
  shards = sorted(glob.glob(os.path.join(version_dir, "*.tfrecord-*")))
  if not shards:
    raise IdxError(f"--convert={version_dir}: holds no tfrecord shards to convert")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # it only reads files here
  for shard in shards:
    target = shard.replace(".tfrecord-", ".array_record-")
    writer = array_record_module.ArrayRecordWriter(target + ".incomplete", "group_size:1")
    for record in tf.data.TFRecordDataset(shard):
      writer.write(record.numpy())
    writer.close()
    os.replace(target + ".incomplete", target)  # a killed conversion leaves no shard that looks whole
  builder.info.add_alternative_file_format("array_record")
  builder.info.write_to_directory(version_dir)
  return len(shards)


def main(argv):
  del argv
  if flags.FLAGS.image_dir:
    for name in ("dataset", "data_dir"):
      if not flags.FLAGS[name].value:
        exit_with_error(f"--{name} is required with --image_dir; see --helpfull")
    from dcgan_jax.datasets import image_folder  # pylint: disable=g-import-not-at-top
    channels = flags.FLAGS.channels and int(flags.FLAGS.channels)
    try:
      summary = image_folder.import_folder(flags.FLAGS.image_dir, flags.FLAGS.dataset, flags.FLAGS.data_dir,
                                           flags.FLAGS.image_size, flags.FLAGS.crop, channels)
    except image_folder.ImportError_ as e:
      exit_with_error(str(e))
    print(json.dumps(summary), flush=True)
    return
  if flags.FLAGS.convert:
    try:
      shards = add_array_record(flags.FLAGS.convert)
    except IdxError as e:
      exit_with_error(str(e))
    print(f"{flags.FLAGS.convert}: " + (f"wrote {shards} array_record shards" if shards else
                                       "already has array_record shards"))
    return
  for name in ("dataset", "idx_dir", "data_dir"):
    if not flags.FLAGS[name].value:
      exit_with_error(f"--{name} is required; see --helpfull")
  try:
    if flags.FLAGS.dataset.startswith("stacked_"):
      path, counts = prepare_stacked(flags.FLAGS.dataset, flags.FLAGS.idx_dir, flags.FLAGS.data_dir,
                                     flags.FLAGS.stack_seed)
    else:
      path, counts = prepare(flags.FLAGS.dataset, flags.FLAGS.idx_dir, flags.FLAGS.data_dir)
  except (IdxError, ConfigError) as e:
    exit_with_error(str(e))
  unusual = [f"{s}={n} (standard {STANDARD_COUNTS[s]})" for s, n in counts.items() if n != STANDARD_COUNTS[s]]
  print(f"wrote {flags.FLAGS.dataset} ({', '.join(f'{s}: {n}' for s, n in counts.items())}) to {path}"
        + (f"; note unusual counts: {', '.join(unusual)}" if unusual else ""))


if __name__ == "__main__":
  cli.run(main)
