"""Records pytorch-fid's own Inception features for a few fixed images, with seeded random weights.

    python3 -m venv /tmp/fidvenv && /tmp/fidvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 \
        pytorch-fid==0.3.0 pillow
    /tmp/fidvenv/bin/python experiments/inception_reference_fixtures.py \
        --fashion_mnist=/usr/share/datasets/fashion-mnist     # apt-get install dataset-fashion-mnist

The real FID weights cannot be downloaded here, so the script builds pytorch-fid's FID network
(`pytorch_fid.inception.InceptionV3`, which loads its weights through `load_state_dict_from_url`: that
function is replaced to hand it the random state dict) with:
  * convolution and fc weights from `random_weight(name, shape)` below: numpy, seeded by the tensor's
    name, so the test rebuilds them without torch;
  * BatchNorm statistics calibrated on real images (one pass in train mode with a cumulative average),
    so that every layer's activations are normalised as with trained weights (uncalibrated random weights
    give near-constant features, which any wrong preprocessing would still match); the script checks
    that the recorded features vary across images.
It writes, under tests/fixtures/:
  * inception_random_bn.pth: every BatchNorm tensor, `torch.save` (zip format, as pytorch-fid's weights)
    -- the test reads it with dcgan_jax.evaluation.torch_file;
  * inception_legacy.pth: a few of the same tensors in the legacy (pre-1.6) torch.save format;
  * inception_reference.npz: the seed, every tensor's name and shape, the grey images, and pytorch-fid's
    pool3 features (`get_activations` on PNG files, its own reading path) and fc logits for three groups:
    28x28 grey (upsampled), 64x64 colour (upsampled), 320x320 colour (downsampled), and FIDs between
    groups by pytorch-fid's calculate_frechet_distance.
"""

import argparse
import gzip
import os
import tempfile
import zlib

import numpy as np

SEED = 20151205
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "fixtures")


def random_weight(name: str, shape) -> np.ndarray:
  """A seeded float32 tensor in PyTorch's layout for a weight or bias of the network (not the
  BatchNorm statistics): He-scaled convolutions, BatchNorm scales in [0.5, 1.5], shifts ~ N(0, 0.3)."""
  rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
  shape = tuple(shape)
  if name.endswith("conv.weight") or name == "fc.weight":
    fan_in = int(np.prod(shape[1:]))
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
  if name.endswith("bn.weight"):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if name.endswith("bn.bias"):
    return (0.3 * rng.standard_normal(shape)).astype(np.float32)
  if name == "fc.bias":
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  raise ValueError(f"no random rule for {name}")


def colour_images(n: int, size: int, seed: int) -> np.ndarray:
  """uint8 (n, size, size, 3): smooth seeded colour images (sums of random plane waves per channel)."""
  rng = np.random.default_rng([seed, size])
  y, x = np.mgrid[0:size, 0:size] / size
  out = np.zeros((n, size, size, 3))
  for i in range(n):
    for c in range(3):
      for _ in range(4):
        fy, fx, phase = rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(0, 2 * np.pi)
        out[i, :, :, c] += rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * (fy * y + fx * x) + phase)
  out = (out - out.min(axis=(1, 2, 3), keepdims=True)) / np.ptp(out, axis=(1, 2, 3), keepdims=True)
  return np.round(out * 255).astype(np.uint8)


def groups(grey: np.ndarray) -> dict:
  """The fixed test images: name -> uint8 (n, H, W, C)."""
  return {"grey28": grey[..., None], "colour64": colour_images(6, 64, 1), "colour320": colour_images(2, 320, 2)}


def read_idx_images(path: str, count: int, start: int = 0) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  n, h, w = np.frombuffer(data[4:16], ">u4")
  images = np.frombuffer(data[16:], np.uint8).reshape(n, h, w)
  return images[start:start + count].copy()


def main():
  import torch  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from pytorch_fid import fid_score, inception as fid_inception  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser()
  parser.add_argument("--fashion_mnist", default="/usr/share/datasets/fashion-mnist")
  args = parser.parse_args()
  torch.use_deterministic_algorithms(True)
  torch.set_num_threads(2)

  # ---- The architecture's names and shapes, then the random state dict pytorch-fid will load -------
  template = fid_inception._inception_v3(num_classes=1008, aux_logits=False, weights=None)
  for name, block in (("Mixed_5b", fid_inception.FIDInceptionA(192, 32)),
                      ("Mixed_5c", fid_inception.FIDInceptionA(256, 64)),
                      ("Mixed_5d", fid_inception.FIDInceptionA(288, 64)),
                      ("Mixed_6b", fid_inception.FIDInceptionC(768, 128)),
                      ("Mixed_6c", fid_inception.FIDInceptionC(768, 160)),
                      ("Mixed_6d", fid_inception.FIDInceptionC(768, 160)),
                      ("Mixed_6e", fid_inception.FIDInceptionC(768, 192)),
                      ("Mixed_7b", fid_inception.FIDInceptionE_1(1280)),
                      ("Mixed_7c", fid_inception.FIDInceptionE_2(2048))):
    setattr(template, name, block)
  shapes = {k: tuple(v.shape) for k, v in template.state_dict().items()}
  state = {}
  for name, shape in shapes.items():
    if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
      state[name] = template.state_dict()[name].clone()
    else:
      state[name] = torch.from_numpy(random_weight(name, shape))
  built = {}
  original = fid_inception.fid_inception_v3

  def capture():
    built["inception"] = original()
    return built["inception"]

  fid_inception.load_state_dict_from_url = lambda *a, **k: state
  fid_inception.fid_inception_v3 = capture
  model = fid_inception.InceptionV3([3])  # pytorch-fid's own class, its own load_state_dict (strict)
  inception = built["inception"]

  # ---- BatchNorm calibration on real images: one train-mode pass, cumulative average ---------------
  train_images = os.path.join(args.fashion_mnist, "train-images-idx3-ubyte.gz")
  calibration = [read_idx_images(train_images, 24)[..., None].repeat(3, -1), colour_images(16, 64, 3)]
  for m in inception.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.reset_running_stats()
      m.momentum = None
  model.train()
  with torch.no_grad():
    for batch in calibration:
      model(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255)
  model.eval()

  # ---- pytorch-fid's features through its own file-reading path ------------------------------------
  grey = read_idx_images(os.path.join(args.fashion_mnist, "t10k-images-idx3-ubyte.gz"), 8)
  out = dict(seed=np.int64(SEED), grey28=grey, names=np.array(list(shapes)),
             shapes=np.array([",".join(map(str, s)) for s in shapes.values()]))
  feats = {}
  with tempfile.TemporaryDirectory() as tmp:
    for group, images in groups(grey).items():
      files = []
      for i, image in enumerate(images):
        path = os.path.join(tmp, f"{group}_{i}.png")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
        files.append(path)
      pool3 = fid_score.get_activations(files, model, batch_size=len(files), dims=2048, device="cpu",
                                        num_workers=0)
      with torch.no_grad():
        logits = inception.fc(torch.from_numpy(pool3).float()).numpy()
      spread = float(pool3.std(axis=0).mean() / (np.abs(pool3).mean() + 1e-12))
      print(f"{group}: pool3 {pool3.shape} mean {pool3.mean():.4g}, spread across images {spread:.3g}; "
            f"logits std {logits.std():.4g}")
      assert spread > 0.05, "features barely vary across images: the calibration failed"
      out[f"{group}_pool3"], out[f"{group}_logits"] = pool3.astype(np.float32), logits.astype(np.float32)
      feats[group] = pool3.astype(np.float64)
  for a, b in (("grey28", "colour64"), ("colour64", "colour320")):
    mu1, s1 = feats[a].mean(0), np.cov(feats[a], rowvar=False)
    mu2, s2 = feats[b].mean(0), np.cov(feats[b], rowvar=False)
    out[f"fid_{a}_{b}"] = np.float64(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
    print(f"pytorch-fid FID {a} vs {b}: {float(out[f'fid_{a}_{b}']):.6f}")

  # ---- The fixtures ---------------------------------------------------------------------------------
  final = inception.state_dict()
  bn = {k: v for k, v in final.items() if ".bn." in k}
  torch.save(bn, os.path.join(FIXTURES, "inception_random_bn.pth"))
  legacy = {k: v for k, v in final.items() if k.startswith("Conv2d_1a_3x3.") or k == "fc.bias"}
  torch.save(legacy, os.path.join(FIXTURES, "inception_legacy.pth"), _use_new_zipfile_serialization=False)
  np.savez_compressed(os.path.join(FIXTURES, "inception_reference.npz"), **out)
  for name in ("inception_random_bn.pth", "inception_legacy.pth", "inception_reference.npz"):
    print(name, os.path.getsize(os.path.join(FIXTURES, name)), "bytes")


if __name__ == "__main__":
  main()
