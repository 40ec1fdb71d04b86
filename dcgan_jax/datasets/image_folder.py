"""A folder of the user's own images -> a tfds dataset the trainer, evaluator and sampler read by name.

    python -m dcgan_jax.prepare_data --image_dir=DIR --dataset=NAME --data_dir=D [--image_size=64]
        [--crop=center|none] [--channels=1|3]

Every file under DIR (nested folders too) that PIL can decode becomes one example; PNG, JPEG, BMP, GIF
(first frame) and WebP are what it is made for. When DIR has two or more first-level subfolders holding
files, each such folder is a class and the examples get a `label` (ClassLabel, names sorted); files lying
directly in DIR are then skipped.

What becomes of each image, in order:
  * EXIF orientation applied (phone photos are stored sideways with a rotation tag);
  * 16-bit images scaled to 8 bits (value >> 8; PIL's own conversion would clip them);
  * transparency composited over white (what an image viewer shows; dropping alpha would show whatever
    colours the transparent pixels happen to hold);
  * palette, CMYK, grayscale and colour converted to the dataset's channel count: 3 when any image is
    in colour, else 1 (or --channels); colour -> gray is ITU-R 601 luma;
  * --crop=center keeps the central square, --crop=none keeps the whole image and squeezes it square;
  * resized to --image_size with Lanczos filtering (antialiased when shrinking).

Storage, and why: images are stored uncompressed, already at --image_size (a uint8 tensor feature of
shape (S, S, C) as raw bytes, array_record files). A training read is then a copy: no decoder, no resize.
(docs/data.md has the reader's measured speed.) The cost is disk: the dataset is its decoded size at training resolution (12 KiB
per 64x64x3 image, about what a JPEG of the 218x178 original takes). Train at another resolution by
importing again with that --image_size (the trainer can also resize on the fly, at a cost).

Files that cannot be used (zero bytes, not an image, truncated, smaller than MIN_SIDE pixels, outside the
class folders) are skipped, counted and listed in `import_report.json` in the dataset's directory; the
import fails (one line) only when no image is usable. Determinism: files are taken in sorted path order
and converted in that order, so the same folder gives the same dataset bytes; the report holds a
fingerprint (SHA-256 of the features and of every record, in order) that the evaluator cache is keyed by.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from typing import List, Optional, Tuple
import warnings

import numpy as np
from PIL import Image

from dcgan_jax.datasets import input_pipeline
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import ConfigError

VERSION = "1.0.0"
MIN_SIDE = 8  # pixels: anything smaller (one-pixel tracking images, icons) holds no picture to learn
SHARD_BYTES = 256 * 2**20  # per array_record file: a few large files read faster than many small ones
CHUNK = 256  # images decoded per batch of work (bounds host memory while importing)...
CHUNK_BYTES = 256 * 2**20  # ...and their decoded bytes (large --image_size: fewer images per batch)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
REPORT = "import_report.json"


class ImportError_(ValueError):  # pylint: disable=invalid-name  (not the builtin ImportError)
  """The folder cannot become a dataset. One line: what and how to fix it."""


def list_files(image_dir: str) -> Tuple[List[str], List[str], List[Tuple[str, str]]]:
  """(relative paths of candidate files in sorted order, class names or [], [(path, reason)] skipped).

  Hidden files and folders (names starting with '.') are ignored, as file managers hide them. Links
  are followed, each folder once."""
  if not os.path.isdir(image_dir):
    raise ImportError_(f"--image_dir={image_dir}: not a directory; pass the folder that holds the images")
  files, seen = [], {os.path.realpath(image_dir)}
  for root, dirs, names in os.walk(image_dir, followlinks=True):
    # Linked folders are followed once: a link to a folder above it would otherwise be walked forever.
    dirs[:] = [d for d in sorted(dirs) if not d.startswith(".") and _first_visit(os.path.join(root, d), seen)]
    rel = os.path.relpath(root, image_dir)
    files.extend(os.path.normpath(os.path.join(rel, n)) for n in names if not n.startswith("."))
  files.sort()
  classes = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
  skipped = []
  if len(classes) >= 2:
    skipped = [(f, "outside the class subfolders") for f in files if os.sep not in f]
    files = [f for f in files if os.sep in f]
  else:
    classes = []
  return files, classes, skipped


def _first_visit(folder: str, seen: set) -> bool:
  real = os.path.realpath(folder)
  if real in seen:
    return False
  seen.add(real)
  return True


def _to_array(img) -> np.ndarray:
  """A PIL image of any mode -> uint8 (h, w, 1) or (h, w, 3), transparency over white."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode == "F":  # 32-bit float: taken as 0..255
    return np.clip(np.asarray(img), 0, 255).astype(np.uint8)[..., None]
  if img.mode.startswith("I"):  # 16-bit (and 32-bit integer) gray: the top 8 of 16 bits
    return (np.clip(np.asarray(img, np.int64), 0, 65535) >> 8).astype(np.uint8)[..., None]
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode == "PA":
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA"):
    base = Image.new(img.mode, img.size, (255, 255, 255, 255) if img.mode == "RGBA" else (255, 255))
    img = Image.alpha_composite(base, img).convert(img.mode[:-1])
  if img.mode == "1":
    img = img.convert("L")
  if img.mode not in ("L", "RGB"):
    img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
  x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


def load_image(path: str, size: int, channels: int, crop: str) -> np.ndarray:
  """One file -> uint8 (size, size, channels). Raises ValueError(reason) for a file to skip."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  if os.path.getsize(path) == 0:
    raise ValueError("zero bytes")
  try:
    with Image.open(path) as img:
      img.seek(0)  # GIF/WebP animations: the first frame
      img.load()  # decodes now: a truncated file fails here
      img = ImageOps.exif_transpose(img)
      x = _to_array(img)
  except Image.UnidentifiedImageError:
    raise ValueError("not an image PIL can read") from None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"cannot be decoded ({e})") from None
  h, w = x.shape[:2]
  if min(h, w) < MIN_SIDE:
    raise ValueError(f"too small ({w}x{h} < {MIN_SIDE} pixels)")
  if x.shape[-1] != channels:
    x = (np.repeat(x, 3, axis=-1) if channels == 3 else
         np.round(x.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
         .clip(0, 255).astype(np.uint8))
  if crop == "center":
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[top:top + side, left:left + side]
  if x.shape[:2] != (size, size):
    img = Image.fromarray(x[..., 0] if channels == 1 else x)
    x = np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))
    x = x[..., None] if x.ndim == 2 else x
  return np.ascontiguousarray(x, np.uint8)


def _is_colour(path: str) -> Optional[bool]:
  """Whether a file is a colour image, from its header only (None: PIL cannot identify it)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as img:
      if img.mode == "P":  # a palette of grays is still gray
        palette = np.asarray(img.getpalette() or [], np.uint8).reshape(-1, 3)
        return bool(np.any(palette != palette[:, :1]))
      return img.mode not in GRAY_MODES
  except Exception:  # pylint: disable=broad-except
    return None


def _progress(total: int, desc: str):
  import tqdm  # pylint: disable=g-import-not-at-top  (a tfds dependency)
  return tqdm.tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True,
                   disable=None)  # None: no bar when stderr is not a terminal (logs, tests)


def import_folder(image_dir: str, name: str, data_dir: str, image_size: int = 64, crop: str = "center",
                  channels: Optional[int] = None, workers: Optional[int] = None) -> dict:
  """Imports `image_dir` as the tfds dataset `name` (split "train") in `data_dir`; returns the summary
  that prepare_data prints as JSON. An existing dataset of that name is replaced only once the new one
  is complete."""
  t0 = time.time()
  if crop not in ("center", "none"):
    raise ImportError_(f"--crop={crop}: use center (keep the central square) or none (squeeze the whole "
                       "image square)")
  if image_size < MIN_SIDE:
    raise ImportError_(f"--image_size={image_size}: too small; use at least {MIN_SIDE} (e.g. 32 or 64)")
  try:  # before TensorFlow's seconds of import: a destination that cannot be written is refused at once
    workdir_lib.check_writable(data_dir, "--data_dir")
  except ConfigError as e:
    raise ImportError_(str(e)) from None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.core import example_serializer, naming  # pylint: disable=g-import-not-at-top
  if name in tfds.list_builders():
    raise ImportError_(f"--dataset={name}: the name of a registered tfds dataset; pick another name for "
                       "your images (e.g. my_{name})")
  files, classes, skipped = list_files(image_dir)
  dataset_dir = os.path.join(data_dir, name)
  new_dirs, folder = [], os.path.abspath(dataset_dir)  # the folders a refusal must remove again
  while not os.path.exists(folder):
    new_dirs.append(folder)
    folder = os.path.dirname(folder)
  try:
    lock = workdir_lib.RunLock([dataset_dir], "--dataset", "another import", None).claim()
  except ConfigError as e:
    raise ImportError_(str(e)) from None
  # Images of 89M to 179M pixels are decoded (they are skipped above that, as PIL refuses them):
  # PIL's warning about them would only repeat what the report says.
  warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
  workers = workers or min(8, os.cpu_count() or 1)
  pool = concurrent.futures.ThreadPoolExecutor(workers)  # PIL decodes and resizes without the GIL
  paths = [os.path.join(image_dir, f) for f in files]
  if channels is None:  # 3 when any image is in colour
    colour = list(pool.map(_is_colour, paths, chunksize=64))
    channels = 3 if any(colour) else 1

  features = {"image": tfds.features.Tensor(shape=(image_size, image_size, channels), dtype=np.uint8,
                                            encoding=tfds.features.Encoding.BYTES)}
  if classes:
    features["label"] = tfds.features.ClassLabel(names=classes)
  features = tfds.features.FeaturesDict(features)
  serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
  fingerprint = hashlib.sha256(json.dumps(features.to_json(), sort_keys=True).encode())

  # ---- Decode, convert and write, in sorted order, a chunk at a time --------------------------------
  remove_interrupted(dataset_dir)  # under the lock: what killed imports left
  tmp = os.path.join(dataset_dir, f".incomplete-{os.getpid()}")
  os.makedirs(tmp)
  # First, so that a dataset whose import never finished can name the command that finishes it.
  command = (f"python -m dcgan_jax.prepare_data --image_dir={os.path.abspath(image_dir)} --dataset={name} "
             f"--data_dir={os.path.abspath(data_dir)} --image_size={image_size} --crop={crop} "
             f"--channels={channels}")
  workdir_lib.write_atomic(os.path.join(tmp, input_pipeline.STARTED), json.dumps({"command": command}))
  per_shard = max(1, SHARD_BYTES // (image_size * image_size * channels))
  chunk_size = max(1, min(CHUNK, CHUNK_BYTES // (image_size * image_size * channels)))
  shard_lengths, shard_paths, writer, num_bytes = [], [], None, 0
  counts = [0] * len(classes)
  bar = _progress(len(paths), f"importing {name}")

  def load(path):
    try:
      return load_image(path, image_size, channels, crop)
    except ValueError as e:
      return str(e)

  try:
    for start in range(0, len(paths), chunk_size):
      chunk = files[start:start + chunk_size]
      for rel, image in zip(chunk, pool.map(load, paths[start:start + chunk_size])):
        bar.update(1)
        if isinstance(image, str):
          skipped.append((rel, image))
          continue
        example = {"image": image}
        if classes:
          example["label"] = classes.index(rel.split(os.sep)[0])
          counts[example["label"]] += 1
        record = serializer.serialize_example(features.encode_example(example))
        if writer is None or shard_lengths[-1] == per_shard:
          if writer is not None:
            writer.close()
          shard_paths.append(os.path.join(tmp, f"shard-{len(shard_paths):05d}"))
          writer = array_record_module.ArrayRecordWriter(shard_paths[-1], "group_size:1")
          shard_lengths.append(0)
        writer.write(record)
        fingerprint.update(hashlib.sha256(record).digest())
        shard_lengths[-1] += 1
        num_bytes += len(record)
  finally:
    bar.close()
    pool.shutdown()
    if writer is not None:
      writer.close()
  skipped.sort()
  num_images = sum(shard_lengths)
  if not num_images:
    shutil.rmtree(tmp)
    lock.release()
    for folder in new_dirs:  # innermost first: a refused import leaves no folder it created
      with contextlib.suppress(OSError):
        os.rmdir(folder)
    reasons = sorted({reason.split(" (")[0] for _, reason in skipped}) or ["no files"]
    raise ImportError_(f"--image_dir={image_dir}: no usable image among {len(files)} files "
                       f"({'; '.join(reasons)}); point it at a folder of PNG/JPEG/BMP/GIF/WebP images")

  # ---- Name the shards as tfds does, write the metadata and the report, then swap in -----------------
  version_dir = os.path.join(dataset_dir, VERSION)
  template = naming.ShardedFileTemplate(data_dir=version_dir, template=naming.DEFAULT_FILENAME_TEMPLATE,
                                        dataset_name=name, split="train", filetype_suffix="array_record")
  for i, path in enumerate(shard_paths):
    os.rename(path, os.path.join(tmp, template.sharded_filepath(shard_index=i,
                                                                num_shards=len(shard_paths)).name))
  split = tfds.core.SplitInfo(name="train", shard_lengths=shard_lengths, num_bytes=num_bytes,
                              filename_template=template.replace(data_dir=tmp))
  tfds.folder_dataset.write_metadata(
      data_dir=tmp, features=features, split_infos=[split], version=VERSION, check_data=False,
      description=f"Images imported from {os.path.abspath(image_dir)} by dcgan_jax.prepare_data "
                  f"({image_size}x{image_size}x{channels}, crop={crop}).")
  summary = dict(dataset=name, images=num_images, skipped=len(skipped), classes=len(classes),
                 shape=[image_size, image_size, channels], seconds=round(time.time() - t0, 1))
  report = dict(summary, source=os.path.abspath(image_dir), crop=crop, class_names=classes,
                class_counts=counts, fingerprint=fingerprint.hexdigest(),
                skipped_files=[dict(path=p, reason=r) for p, r in skipped])
  os.remove(os.path.join(tmp, input_pipeline.STARTED))
  with open(os.path.join(tmp, REPORT), "w") as f:
    json.dump(report, f, indent=1)
  if os.path.exists(version_dir):  # replace the old import only now that the new one is whole
    old = os.path.join(dataset_dir, f".replaced-{os.getpid()}")
    os.rename(version_dir, old)
    os.rename(tmp, version_dir)
    shutil.rmtree(old)
  else:
    os.rename(tmp, version_dir)
  lock.release()
  summary["path"] = version_dir
  return summary


def remove_interrupted(dataset_dir: str) -> list:
  """Removes what interrupted imports left in <data_dir>/<name> (tfds's "incomplete.*" folders, ours
  ".incomplete-<pid>" and ".replaced-<pid>"); call it holding the folder's lock. Returns their paths."""
  prefixes = input_pipeline.INCOMPLETE_PREFIXES + (".replaced-",)
  left = [os.path.join(dataset_dir, n) for n in sorted(os.listdir(dataset_dir))
          if n.startswith(prefixes)] if os.path.isdir(dataset_dir) else []
  for path in left:
    shutil.rmtree(path, ignore_errors=True)
  return left


def fingerprint(version_dir: str) -> Optional[str]:
  """The content fingerprint of an imported dataset (None for datasets imported otherwise)."""
  try:
    with open(os.path.join(version_dir, REPORT)) as f:
      return json.load(f)["fingerprint"]
  except (OSError, ValueError, KeyError):
    return None
