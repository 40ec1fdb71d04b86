"""The step metrics of a run: kept on device until a log or checkpoint step needs them, checked for
non-finite values, averaged per log interval into metrics.jsonl, TensorBoard and the console.

With many members in one program, each member has its own Progress (its own console prefix and run
directory); members stacked on one axis (--members_form=vmap) pass their index, and each reads its
column of the stacked metrics.
"""

import math
import time

from absl import logging
import jax
import numpy as np

CHECKED_METRICS = ("d_loss", "g_loss", "g_param_norm", "d_param_norm")


class TrainingDivergedError(RuntimeError):
  """A loss or a parameter became NaN/inf. The message names the first such step."""


class Progress:
  """One run's (or member's) step metrics. ran() after each call; fetch() before a log or checkpoint
  step (raises TrainingDivergedError); log() writes the interval's means. index: the member's position
  on the metrics' last axis when the members' steps are stacked (None: the metrics are this run's)."""

  def __init__(self, config, writer, step, name="", index=None):
    self.config, self.writer, self.prefix = config, writer, f"{name} | " if name else ""
    self.index = index
    self.pending, self.pending_start = [], step  # metrics still on device
    self.fetched = []  # host metrics (one dict per step) since the last log line
    self.t_last, self.step_last = None, step

  def ran(self, step, metrics):
    self.pending.append(metrics)
    if self.t_last is None:  # the first call compiles: start the clock after it
      jax.block_until_ready(metrics)
      self.t_last, self.step_last = time.time(), step

  def fetch(self, step):
    host = jax.device_get(self.pending)
    if self.index is not None:
      host = [{k: v[..., self.index] for k, v in m.items()} for m in host]
    host = per_step(host)
    check_finite(host, self.pending_start)
    self.fetched += host
    self.pending, self.pending_start = [], step

  def log(self, step):
    now, config = time.time(), self.config
    rate = (step - self.step_last) / (now - self.t_last) if step > self.step_last else float("nan")
    mean = {k: float(np.mean([m[k] for m in self.fetched])) for k in self.fetched[0] if k != "finite"}
    mean.update(steps_per_sec=rate, images_per_sec=rate * config.batch_size)
    self.writer.write_metrics(step, mean)
    eta = (config.num_steps - step) / rate if rate > 0 else float("nan")
    logging.info("%sstep %d/%d | d_loss %.3f g_loss %.3f D(x) %.2f D(G(z)) %.2f | %.2f steps/s %.0f img/s "
                 "| ETA %s", self.prefix, step, config.num_steps, mean["d_loss"], mean["g_loss"], mean["d_real"],
                 mean["d_fake"], rate, rate * config.batch_size, format_eta(eta))
    self.fetched, self.t_last, self.step_last = [], now, step


def per_step(fetched: list) -> list:
  """Host metrics of single calls (dicts of scalars) and multi-step calls (dicts of (k,) arrays) ->
  one dict of scalars per step."""
  out = []
  for m in fetched:
    if np.ndim(m["d_loss"]) == 0:
      out.append(m)
    else:
      out += [{name: v[i] for name, v in m.items()} for i in range(len(m["d_loss"]))]
  return out


def check_finite(history: list, first_step: int) -> None:
  """history: host metrics of consecutive steps after state step `first_step`. TrainingDivergedError
  naming the first step with a non-finite loss or parameter norm."""
  for i, m in enumerate(history):
    if m["finite"] < 1:
      bad = ", ".join(f"{k}={m[k]:.4g}" for k in CHECKED_METRICS)
      raise TrainingDivergedError(
          f"training diverged at step {first_step + i + 1}: non-finite values ({bad}); lower "
          "--learning_rate_g/--learning_rate_d or check the data")


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
