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

from dcgan_jax import workdir as workdir_lib


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
  """Written whole or not at all (a kill mid-write leaves no truncated PNG for the GIF to trip on)."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
  workdir_lib.write_atomic(path, buffer.getvalue())


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
  tmp = f"{path}.tmp-{os.getpid()}.gif"
  images[0].save(tmp, save_all=True, append_images=images[1:], duration=durations, loop=0)
  os.replace(tmp, path)


class RunWriter:
  """Writes one run's outputs. All methods are no-ops when not enabled (processes other than 0)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir_lib.path(workdir, workdir_lib.SAMPLES), exist_ok=True)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      # A new events file per start: one left half-written by a kill is never appended to (TensorBoard
      # reads the records before the cut and skips the rest).
      self._tb = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD), flush_secs=30)
    except ImportError:
      logging.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is written).")

  def write_config(self, config, extra: dict) -> None:
    if self.enabled:
      workdir_lib.write_atomic(workdir_lib.path(self.workdir, workdir_lib.CONFIG), json.dumps(
          {"config": dataclasses.asdict(config), "run": extra}, indent=2, sort_keys=True))

  def write_metrics(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    workdir_lib.append_jsonl(workdir_lib.path(self.workdir, workdir_lib.METRICS), {"step": step, **metrics})
    if self._tb:
      for k, v in metrics.items():
        if math.isfinite(v):  # a rate of the first interval is unknown: left out, not plotted as NaN
          self._tb.add_scalar(k, v, step)

  def truncate_metrics(self, step: int) -> None:
    """Rewrites metrics.jsonl without the lines after `step` (logged by a run killed before its next
    checkpoint) and without lines a kill cut short (one warning line each)."""
    file = workdir_lib.path(self.workdir, workdir_lib.METRICS)
    if not self.enabled or not os.path.exists(file):
      return
    keep = [r for r in workdir_lib.read_jsonl(file, warn=logging.warning)
            if isinstance(r.get("step"), int) and r["step"] <= step]
    workdir_lib.write_atomic(file, "".join(json.dumps(r) + "\n" for r in keep))

  def write_samples(self, step: int, images: np.ndarray, prefix: str = "") -> str:
    """images: float (n, H, W, C) in [-1, 1] -> samples/<prefix>step_XXXXXXXX.png. Returns its path."""
    path = workdir_lib.path(self.workdir, workdir_lib.SAMPLES, workdir_lib.sample_grid_name(step, prefix))
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
    folder = workdir_lib.path(self.workdir, workdir_lib.SAMPLES)
    names = workdir_lib.sample_grids(self.workdir) if self.enabled else []
    frames = []
    for name in names:
      try:
        frames.append(load_png(os.path.join(folder, name)))
      except (OSError, ValueError) as e:  # a grid damaged outside the run: left out of the animation
        logging.warning("%s: unreadable (%s); left out of %s", os.path.join(folder, name), e,
                        workdir_lib.PROGRESS_GIF)
    frames = [f for f in frames if f.shape == frames[-1].shape] if frames else []
    if not frames:
      return None
    path = os.path.join(folder, workdir_lib.PROGRESS_GIF)
    save_gif(frames, path, frame_ms)
    return path

  def close(self) -> None:
    if self._tb:
      self._tb.close()
