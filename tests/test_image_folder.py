"""prepare_data --image_dir: every kind of file a user's folder holds, broken ones included."""
import glob
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dcgan_jax.datasets import image_folder
from dcgan_jax.datasets import input_pipeline
from dcgan_jax.config import Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gradient(h, w):
  """uint8 (h, w): a ramp across the columns, so that rotations and flips change it."""
  return np.tile(np.linspace(0, 255, w).round().astype(np.uint8), (h, 1))


def write_kinds(root):
  """Two class folders with one file of every kind, broken ones and a stray file. Returns
  {relative path: expected reason substring or None (usable)}."""
  a, b = os.path.join(root, "cats"), os.path.join(root, "dogs", "nested")
  os.makedirs(a)
  os.makedirs(b)
  ramp = gradient(20, 24)
  rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], -1)
  Image.fromarray(ramp).save(os.path.join(a, "gray.png"))
  Image.fromarray(rgb).save(os.path.join(a, "rgb.jpg"), quality=95)
  Image.fromarray(rgb).save(os.path.join(a, "rgb.bmp"))
  Image.fromarray(rgb).save(os.path.join(a, "rgb.webp"), lossless=True)
  Image.fromarray(rgb).convert("P").save(os.path.join(a, "palette.gif"))
  rgba = np.concatenate([rgb, np.zeros_like(ramp)[..., None]], -1)  # fully transparent
  Image.fromarray(rgba).save(os.path.join(a, "transparent.png"))
  Image.fromarray((ramp.astype(np.uint16) * 257)).save(os.path.join(b, "sixteen.png"))  # I;16
  Image.fromarray(rgb).convert("CMYK").save(os.path.join(b, "cmyk.jpg"), quality=95)
  frames = [Image.fromarray(rgb), Image.fromarray(255 - rgb)]
  frames[0].save(os.path.join(b, "animated.gif"), save_all=True, append_images=frames[1:])
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: the viewer turns it 90 degrees clockwise
  Image.fromarray(rgb).save(os.path.join(b, "rotated.jpg"), quality=95, exif=exif)
  # Broken and stray files.
  open(os.path.join(a, "empty.png"), "wb").close()
  with open(os.path.join(a, "notes.txt"), "w") as f:
    f.write("not an image")
  data = io.BytesIO()
  Image.fromarray(rgb).save(data, "PNG")
  with open(os.path.join(b, "truncated.png"), "wb") as f:
    f.write(data.getvalue()[:len(data.getvalue()) // 2])
  Image.fromarray(np.zeros((1, 1), np.uint8)).save(os.path.join(b, "pixel.png"))
  Image.fromarray(ramp).save(os.path.join(root, "stray.png"))
  return {
      "cats/gray.png": None, "cats/rgb.jpg": None, "cats/rgb.bmp": None, "cats/rgb.webp": None,
      "cats/palette.gif": None, "cats/transparent.png": None, "dogs/nested/sixteen.png": None,
      "dogs/nested/cmyk.jpg": None, "dogs/nested/animated.gif": None, "dogs/nested/rotated.jpg": None,
      "cats/empty.png": "zero bytes", "cats/notes.txt": "not an image",
      "dogs/nested/truncated.png": "cannot be decoded", "dogs/nested/pixel.png": "too small",
      "stray.png": "outside the class subfolders"}


def read_back(data_dir, name):
  builder = input_pipeline.get_builder(Config(dataset=name, data_dir=data_dir))
  source = input_pipeline.data_source(builder, "train")
  examples = [source[i] for i in range(len(source))]
  return builder, examples


def test_every_kind_of_file_is_imported_or_reported(tmp_path):
  """Each format and colour mode becomes a (24, 24, 3) example with its class label, and each broken or
  stray file is skipped with its reason, in counts and report. Catches an import that aborts on a bad
  file, drops a format or mode, mislabels nested files, or forgets to report what it skipped."""
  expected = write_kinds(str(tmp_path / "images"))
  summary = image_folder.import_folder(str(tmp_path / "images"), "kinds", str(tmp_path / "tfds"), 24)
  usable = sorted(p for p, r in expected.items() if r is None)
  assert (summary["images"], summary["skipped"], summary["classes"]) == (len(usable), 5, 2)
  assert summary["shape"] == [24, 24, 3]  # colour files present: 3 channels
  with open(os.path.join(summary["path"], image_folder.REPORT)) as f:
    report = json.load(f)
  reasons = {s["path"]: s["reason"] for s in report["skipped_files"]}
  assert set(reasons) == {p for p, r in expected.items() if r is not None}
  for path, reason in reasons.items():
    assert expected[path] in reason, (path, reason)
  assert report["class_names"] == ["cats", "dogs"] and report["class_counts"] == [6, 4]
  builder, examples = read_back(str(tmp_path / "tfds"), "kinds")
  assert builder.info.features["label"].names == ["cats", "dogs"]
  assert [int(e["label"]) for e in examples] == [0] * 6 + [1] * 4  # sorted paths: cats first
  assert all(e["image"].shape == (24, 24, 3) and e["image"].dtype == np.uint8 for e in examples)


def test_conversions_follow_what_a_viewer_shows(tmp_path):
  """EXIF orientation is applied, transparency becomes white, 16-bit gray keeps its top 8 bits, an
  animation gives its first frame. Catches an import without exif_transpose, one that drops alpha
  (showing the hidden colours), PIL's clipping 16-bit conversion, or the last frame of a GIF."""
  root = tmp_path / "images"
  write_kinds(str(root))
  crop = lambda x: x[:, 2:22]  # the central 20x20 square of a 20x24 image
  load = lambda rel, channels=3: image_folder.load_image(str(root / rel), 20, channels, "center")
  ramp = gradient(20, 24)
  rgb = np.stack([ramp, ramp[::-1], np.full_like(ramp, 90)], -1)
  np.testing.assert_array_equal(load("cats/transparent.png"), np.full((20, 20, 3), 255, np.uint8))
  np.testing.assert_array_equal(load("dogs/nested/sixteen.png", 1)[..., 0], crop(ramp))
  first = load("dogs/nested/animated.gif").astype(int)  # GIF palettes quantise: compare loosely
  assert np.abs(first - crop(rgb)).mean() < 20 < np.abs(first - crop(255 - rgb)).mean()
  turned = np.rot90(rgb, -1)  # 24x20 after a clockwise quarter turn; its central square
  expected = turned[2:22]
  assert np.abs(load("dogs/nested/rotated.jpg").astype(int) - expected).mean() < 4
  assert np.abs(load("cats/rgb.jpg").astype(int) - expected).mean() > 40  # the test can tell


def test_same_folder_gives_the_same_bytes(tmp_path, monkeypatch):
  """Two imports of folders with the same files, listed by the file system in opposite orders, write
  identical files and fingerprints; another folder gives another fingerprint. Catches an import that
  follows the directory listing order (or any other nondeterminism) and a fingerprint blind to the
  pixels."""
  files = [(f"c{i % 2}/img{i:02d}.png", gradient(16, 16 + i)) for i in range(12)]
  for name in ("first", "second"):
    for rel, pixels in files:
      os.makedirs(tmp_path / name / os.path.dirname(rel), exist_ok=True)
      Image.fromarray(pixels).save(tmp_path / name / rel)
  one = image_folder.import_folder(str(tmp_path / "first"), "same", str(tmp_path / "a"), 16, workers=3)
  walk = os.walk
  monkeypatch.setattr(os, "walk", lambda *a, **k: ((r, d[::-1], n[::-1]) for r, d, n in walk(*a, **k)))
  two = image_folder.import_folder(str(tmp_path / "second"), "same", str(tmp_path / "b"), 16, workers=1)
  monkeypatch.setattr(os, "walk", walk)
  names = sorted(os.listdir(one["path"]))
  assert names == sorted(os.listdir(two["path"]))
  for name in names:
    if name.endswith(".json") and name != "features.json":
      continue  # dataset_info.json, import_report.json: name the source folder
    with open(os.path.join(one["path"], name), "rb") as f, open(os.path.join(two["path"], name), "rb") as g:
      assert f.read() == g.read(), name
  first = image_folder.fingerprint(one["path"])
  assert first == image_folder.fingerprint(two["path"])
  Image.fromarray(255 - gradient(16, 16)).save(tmp_path / "first" / "c0" / "img00.png")
  three = image_folder.import_folder(str(tmp_path / "first"), "same", str(tmp_path / "a"), 16)
  assert three["path"] == one["path"]  # re-imported into the same place, replacing it
  assert image_folder.fingerprint(three["path"]) != first


def test_gray_folder_is_one_channel_and_unlabelled(tmp_path):
  """A flat folder of gray images becomes a 1-channel dataset without labels. Catches channel
  detection that calls every image colour, and labels invented for a folder without classes."""
  for i in range(3):
    Image.fromarray(gradient(30, 30)).convert("P").save(tmp_path / f"{i}.gif")  # a gray palette
  summary = image_folder.import_folder(str(tmp_path), "flat", str(tmp_path / "tfds"), 16)
  assert (summary["shape"], summary["classes"]) == ([16, 16, 1], 0)
  builder, _ = read_back(str(tmp_path / "tfds"), "flat")
  assert "label" not in builder.info.features


def test_nothing_usable_fails_in_one_line_and_keeps_the_old_dataset(tmp_path):
  """A folder with no usable image exits non-zero with one line naming the folder, and a dataset of
  that name imported before stays readable; into a data_dir that did not exist, the refused import
  creates no folder. Catches an import that writes an empty dataset, one that removes the previous one
  before the new one is complete, and a refusal that leaves the folders it made."""
  good, bad = tmp_path / "good", tmp_path / "bad"
  good.mkdir()
  bad.mkdir()
  Image.fromarray(gradient(16, 16)).save(good / "a.png")
  (bad / "a.png").write_bytes(b"")
  (bad / "b.txt").write_text("x")
  image_folder.import_folder(str(good), "mine", str(tmp_path / "tfds"), 16)
  result = subprocess.run([sys.executable, "-m", "dcgan_jax.prepare_data", f"--image_dir={bad}",
                           "--dataset=mine", f"--data_dir={tmp_path / 'tfds'}", "--image_size=16"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  last = result.stderr.strip().splitlines()[-1]
  assert "no usable image among 2 files" in last and str(bad) in last
  assert "Traceback" not in result.stderr
  _, examples = read_back(str(tmp_path / "tfds"), "mine")
  assert len(examples) == 1
  assert not glob.glob(str(tmp_path / "tfds" / "mine" / ".incomplete-*"))
  # Into a data_dir that did not exist: refused, and nothing created.
  with pytest.raises(image_folder.ImportError_, match="no usable image"):
    image_folder.import_folder(str(bad), "mine", str(tmp_path / "new" / "tfds"), 16)
  assert not os.path.exists(tmp_path / "new")


def test_registered_names_are_refused(tmp_path):
  """Importing under the name of a tfds dataset is refused: `--dataset=mnist` would then mean two
  things. Catches an import that silently shadows (or is shadowed by) a registered dataset."""
  Image.fromarray(gradient(16, 16)).save(tmp_path / "a.png")
  with pytest.raises(image_folder.ImportError_, match="registered tfds dataset"):
    image_folder.import_folder(str(tmp_path), "mnist", str(tmp_path / "tfds"), 16)


def shapes_folder(root, n, classes=False, seed=0):
  """n 28x28 gray images of bright rectangles, distinct per seed; in two class folders or flat."""
  rng = np.random.default_rng(seed)
  for i in range(n):
    x = np.zeros((28, 28), np.uint8)
    top, left = rng.integers(0, 14, 2)
    x[top:top + 8 + i % 6, left:left + 14] = 200 + i % 50
    folder = os.path.join(root, f"k{i % 2}") if classes else root
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(x).save(os.path.join(folder, f"{i:03d}.png"))


@pytest.mark.slow
def test_an_imported_folder_trains_and_evaluates_by_name(tmp_path):
  """A flat (unlabelled) folder imported as `shapes` trains by name through the random-access path with
  --eval_every, and `evaluate` scores it with the label-free evaluator against the train split: FID,
  KID, precision, recall and no class metrics. Importing another folder under the same name gives a new
  evaluator. Catches a dataset the trainer cannot open by name, an evaluator that fails (or invents
  classes) without labels, and an evaluator cache keyed by name and size only (a stale evaluator)."""
  from dcgan_jax import evaluate
  from dcgan_jax.evaluation import evaluator
  from dcgan_jax import train
  data_dir, cache = str(tmp_path / "tfds"), str(tmp_path / "evaluators")
  shapes_folder(str(tmp_path / "one"), 64)
  image_folder.import_folder(str(tmp_path / "one"), "shapes", data_dir, 28)
  config = Config(dataset="shapes", data_dir=data_dir, in_memory="false", batch_size=8, latent_dim=16,
                  num_steps=2, log_every=1, sample_every=1000, eval_every=2, eval_samples=32,
                  evaluator_dir=cache)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  scored = [line for line in lines if "fid" in line]
  assert len(scored) == 1 and "coverage" not in scored[0] and np.isfinite(scored[0]["fid"])
  report = evaluate.evaluate(str(tmp_path / "run"), num_samples=32, evaluator_dir=cache, reference=False)
  assert report["label_free"] and report["real_split"] == "train" and report["num_real"] == 64
  assert {"fid", "kid", "precision", "recall"} <= set(report) and "coverage" not in report
  assert report["evaluator"]["task"] == "rotation"
  first = evaluator.load_or_train("shapes", data_dir, (28, 28, 1), cache)
  shapes_folder(str(tmp_path / "two"), 64, seed=1)  # same name, same size, other images
  image_folder.import_folder(str(tmp_path / "two"), "shapes", data_dir, 28)
  second = evaluator.load_or_train("shapes", data_dir, (28, 28, 1), cache)
  assert second.path != first.path


def test_a_link_loop_is_walked_once(tmp_path):
  """A folder holding a link to itself (or to a folder above it) is imported once, not walked forever.
  Catches an import that follows links without remembering where it has been (it never ends, and
  its file list grows without bound)."""
  root = tmp_path / "images"
  (root / "a").mkdir(parents=True)
  Image.fromarray(gradient(16, 16)).save(root / "a" / "x.png")
  os.symlink(root, root / "a" / "loop")
  os.symlink(root / "a", root / "again")
  import threading
  result = []
  walker = threading.Thread(target=lambda: result.append(image_folder.list_files(str(root))), daemon=True)
  walker.start()
  walker.join(timeout=30)  # the looping walk would not end: fail instead of hanging the suite
  assert result, "list_files did not return within 30 s"
  files, classes, _ = result[0]
  assert files == ["a/x.png"] and classes == []


def test_colour_to_gray_is_pils_luma_and_crop_none_keeps_the_whole_image(tmp_path):
  """--channels=1 on a colour file gives exactly PIL's convert("L") (ITU-R 601-2 luma with PIL's
  rounding), and --crop=none squeezes the whole image square (PIL's Lanczos resize of all of it).
  Catches the first channel taken as gray, a mean of the channels, a float luma that rounds otherwise,
  and --crop=none cropping the centre anyway."""
  rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)
  path = tmp_path / "colour.png"
  Image.fromarray(rgb).save(path)
  gray = image_folder.load_image(str(path), 24, 1, "center")  # the central 24x24, no resize
  np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.fromarray(rgb).convert("L"))[:, 8:32])
  whole = image_folder.load_image(str(path), 16, 3, "none")
  np.testing.assert_array_equal(whole, np.asarray(Image.fromarray(rgb).resize((16, 16), Image.Resampling.LANCZOS)))
