"""What a run writes into its workdir: config.json, metrics.jsonl, TensorBoard events, sample grids.

Host-side only (numpy, Pillow, tensorboardX); nothing here runs inside jitted code. Only process 0 writes
(`enabled=False` elsewhere). TensorBoard events are written with tensorboardX (protobuf only, no
TensorFlow); where it is not installed, the run says so once and goes on without events.
"""

import dataclasses
import json
import math
import os
from typing import Optional

from absl import logging
import numpy as np


def image_grid(images: np.ndarray, columns: Optional[int] = None) -> np.ndarray:
  """float images (n, H, W, C) in [-1, 1] -> uint8 grid (rows*(H+2)+2, cols*(W+2)+2, C), 2-pixel gaps."""
  n, h, w, c = images.shape
  columns = columns or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / columns))
  pixels = np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  grid = np.zeros((rows * (h + 2) + 2, columns * (w + 2) + 2, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, columns)
    grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + col * (w + 2):2 + col * (w + 2) + w] = pixels[i]
  return grid


def save_png(grid: np.ndarray, path: str) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)


def load_png(path: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    array = np.asarray(image)
  return array[..., None] if array.ndim == 2 else array


def save_gif(frames: list, path: str, frame_ms: int = 300, last_frame_ms: int = 2000) -> None:
  """uint8 frames (H, W, C), all one size -> a looping animated GIF."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f) for f in frames]
  durations = [frame_ms] * (len(images) - 1) + [last_frame_ms]
  images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0)


class RunWriter:
  """Writes one run's outputs. All methods are no-ops when not enabled (processes other than 0)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(os.path.join(workdir, "samples"), exist_ok=True)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), flush_secs=30)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is written).")

  def write_config(self, config, extra: dict) -> None:
    if self.enabled:
      with open(os.path.join(self.workdir, "config.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "run": extra}, f, indent=2, sort_keys=True)

  def write_metrics(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": step, **metrics}) + "\n")
    if self._tb:
      for k, v in metrics.items():
        self._tb.add_scalar(k, v, step)

  def truncate_metrics(self, step: int) -> None:
    """Drops metrics.jsonl lines after `step` (logged by a run that was killed before checkpointing)."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not self.enabled or not os.path.exists(path):
      return
    with open(path) as f:
      keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
      f.writelines(keep)
    os.replace(path + ".tmp", path)

  def write_samples(self, step: int, images: np.ndarray, prefix: str = "") -> str:
    """images: float (n, H, W, C) in [-1, 1] -> samples/<prefix>step_XXXXXXXX.png. Returns its path."""
    path = os.path.join(self.workdir, "samples", f"{prefix}step_{step:08d}.png")
    if not self.enabled:
      return path
    grid = image_grid(images)
    save_png(grid, path)
    if self._tb:
      self._tb.add_image(f"{prefix}samples", grid, step, dataformats="HWC")
    return path

  def write_progress_gif(self, frame_ms: int = 300) -> Optional[str]:
    """samples/progress.gif: every samples/step_*.png grid in step order (those of earlier, resumed
    runs included), looping, the last frame held longer. Returns its path, or None with no grids."""
    folder = os.path.join(self.workdir, "samples")
    names = sorted(n for n in os.listdir(folder) if n.startswith("step_") and n.endswith(".png")) \
        if self.enabled else []
    if not names:
      return None
    path = os.path.join(folder, "progress.gif")
    save_gif([load_png(os.path.join(folder, n)) for n in names], path, frame_ms)
    return path

  def close(self) -> None:
    if self._tb:
      self._tb.close()
