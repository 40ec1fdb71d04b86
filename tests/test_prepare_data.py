"""prepare_data: small synthetic IDX files -> a tfds dataset read back by tfds and by the trainer."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from dcgan_jax import prepare_data
from helpers import make_idx_dir, write_idx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_round_trip_through_tfds_and_the_trainers_loader(tmp_path):
  """IDX files imported by prepare_data read back unchanged through tfds.load (tfrecord), tfds's
  array_record data source and the trainer's in-memory loader, with the right counts. Catches images or
  labels shuffled against each other, a format the trainer cannot read, and lost examples."""
  import tensorflow_datasets as tfds
  from dcgan_jax.datasets import input_pipeline
  from dcgan_jax.config import Config
  idx_dir, data_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  arrays = make_idx_dir(str(idx_dir), compress=False)
  _, counts = prepare_data.prepare("fashion_mnist", str(idx_dir), str(data_dir))
  assert counts == {"train": 24, "test": 8}
  # tfds.load (tfrecord, TensorFlow) and tfds's random-access reader (array_record) see the same data.
  ds = tfds.as_numpy(tfds.load("fashion_mnist", split="test", data_dir=str(data_dir)))
  by_label = sorted((int(e["label"]), e["image"][..., 0].tobytes()) for e in ds)
  expected = sorted((int(l), im.tobytes()) for im, l in zip(*arrays["test"]))
  assert by_label == expected
  builder = tfds.builder_from_directory(str(data_dir / "fashion_mnist" / "3.0.1"))
  source = builder.as_data_source(split="train", file_format="array_record")
  assert len(source) == 24
  # The trainer's in-memory loader (the TF-free array_record path).
  images = input_pipeline.load_in_memory(Config(dataset="fashion_mnist", data_dir=str(data_dir)),
                                         (28, 28, 1))
  assert images.shape == (24, 28, 28, 1) and images.dtype == np.uint8
  assert sorted(i.tobytes() for i in images[..., 0]) == sorted(i.tobytes() for i in arrays["train"][0])


def test_load_resizes_and_converts_channels():
  """preprocess: gray 28x28 -> RGB 32x32 keeps the value (within rounding), and CelebA's 218x178 faces are
  centre-cropped to 108x108 before resizing. Catches a channel conversion that changes values, a crop
  off-centre or of another size."""
  from dcgan_jax.datasets import input_pipeline
  images = np.full((3, 28, 28, 1), 200, np.uint8)
  out = input_pipeline.preprocess(images, "mnist", (32, 32, 3))
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  assert np.all(np.abs(out.astype(int) - 200) <= 1)
  faces = np.zeros((2, 218, 178, 3), np.uint8)
  faces[:, 55:163, 35:143] = 255  # exactly the 108x108 center crop
  out = input_pipeline.preprocess(faces, "celeb_a", (64, 64, 3))
  assert out.shape == (2, 64, 64, 3) and out.min() == 255


@pytest.mark.parametrize("damage,message", [
    ("magic", "magic number 2049, expected 2051"),
    ("truncate", "header says (24, 28, 28)"),
    ("count", "24 images but"),
    ("missing", "not found"),
])
def test_malformed_files_are_rejected(tmp_path, damage, message):
  """Damaged IDX files (wrong magic number, truncated data, image/label counts that differ, a missing file)
  are each one IdxError naming the file, and one error line with exit 2 from the command. Catches a
  truncated file read as fewer images, and tracebacks."""
  make_idx_dir(str(tmp_path))
  images = str(tmp_path / "train-images-idx3-ubyte.gz")
  if damage == "magic":
    write_idx(images[:-3], np.zeros((24, 28, 28)), 2049)
  elif damage == "truncate":
    with gzip.open(images) as f:
      raw = f.read()
    with gzip.open(images, "wb") as f:
      f.write(raw[:-100])
  elif damage == "count":
    write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(23), 2049)
  elif damage == "missing":
    os.remove(images)
  with pytest.raises(prepare_data.IdxError, match=message.replace("(", r"\(").replace(")", r"\)")):
    prepare_data.read_split(str(tmp_path), "train")
  r = subprocess.run([sys.executable, "-m", "dcgan_jax.prepare_data", "--dataset=mnist",
                      f"--idx_dir={tmp_path}", f"--data_dir={tmp_path / 'out'}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: ")
  assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
def test_convert_writes_array_record_that_reads_as_the_tfrecord(tmp_path):
  """`prepare_data --convert=DIR` turns a dataset stored as tfrecord only (tfds' default) into one that
  tfds.data_source reads, record for record the same examples in the same order as tfds.load's
  unshuffled tfrecord reading; a second run changes nothing, and a directory that is no dataset gets one
  line. Catches records dropped, reordered or mis-sharded, or the format not registered."""
  import json
  import tensorflow_datasets as tfds
  idx_dir, data_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  make_idx_dir(str(idx_dir), n_train=24, n_test=8)
  version_dir, _ = prepare_data.prepare("fashion_mnist", str(idx_dir), str(data_dir))
  for name in os.listdir(version_dir):  # make it tfrecord only, as tfds' own download_and_prepare does
    if ".array_record-" in name:
      os.remove(os.path.join(version_dir, name))
  info_path = os.path.join(version_dir, "dataset_info.json")
  with open(info_path) as f:
    info = json.load(f)
  info.pop("alternativeFileFormats", None)
  with open(info_path, "w") as f:
    json.dump(info, f)
  assert "array_record" not in str(tfds.builder_from_directory(version_dir).info.available_file_formats())
  r = subprocess.run([sys.executable, "-m", "dcgan_jax.prepare_data", f"--convert={version_dir}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "wrote 2 array_record shards" in r.stdout, r.stderr[-2000:]
  builder = tfds.builder_from_directory(version_dir)
  for split in ("train", "test"):
    source = builder.as_data_source(split=split, file_format="array_record")
    stored = list(tfds.as_numpy(tfds.load("fashion_mnist", split=split, data_dir=str(data_dir),
                                          shuffle_files=False)))
    assert len(source) == len(stored)
    for i, example in enumerate(stored):
      np.testing.assert_array_equal(source[i]["image"], example["image"])
      assert source[i]["label"] == example["label"]
  assert prepare_data.add_array_record(version_dir) == 0  # already there
  r = subprocess.run([sys.executable, "-m", "dcgan_jax.prepare_data", f"--convert={tmp_path}"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.startswith(f"error: --convert={tmp_path}: not a prepared tfds")
