"""The training loop: `train_and_evaluate(config, workdir)`.

Phases: set up (devices, data, outputs, state: fresh or resumed), then per call of --steps_per_call
steps: run, log, sample, evaluate, checkpoint, stop; then finish (export, GIF). The step is pure
(step.py) and mapped over the devices by parallel.py; this module only decides what happens when.
"""

import contextlib
import json
import math
import os
import signal
import threading
import time
from typing import Optional

from absl import logging
import jax
import numpy as np

from dcgan_jax import checkpoints
from dcgan_jax import data as data_lib
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import randomness
from dcgan_jax import sampling
from dcgan_jax import step as step_lib
from dcgan_jax import writers
from dcgan_jax.config import Config, ConfigError

CHECKED_METRICS = ("d_loss", "g_loss", "g_param_norm", "d_param_norm")


class TrainingDivergedError(RuntimeError):
  """A loss or a parameter became NaN/inf. The message names the first such step."""


def train_and_evaluate(config: Config, workdir: str) -> step_lib.TrainState:
  """Trains a DCGAN as configured, writing logs, samples, checkpoints and the config into workdir.

  Returns the final TrainState (replicated over the devices).
  """
  # ---- Devices and data --------------------------------------------------------------------------
  config = config.resolved()
  mesh = parallel.global_mesh()
  parallel.check_devices(config, mesh.devices.size)
  per_device = config.batch_size // mesh.devices.size
  if (config.num_steps * config.d_steps + 1) * config.batch_size >= 2**31:
    raise ConfigError(f"--num_steps={config.num_steps}: more than 2**31 examples would be drawn; "
                      "train for fewer steps (or a smaller batch).")
  data = data_lib.open_training_data(config, mesh, per_device)

  # ---- Outputs ------------------------------------------------------------------------------------
  writer = writers.RunWriter(workdir, enabled=jax.process_index() == 0)
  device = jax.local_devices()[0]
  writer.write_config(config, extra=dict(
      devices=jax.local_device_count(), device_kind=device.device_kind, backend=jax.default_backend(),
      in_memory=data.in_memory, data_path=data.path, num_examples=data.num_examples,
      channels=data.channels, git_commit=checkpoints.git_commit()))
  logging.info("Config: %s", json.dumps(dict(config.__dict__)))

  # ---- State: fresh, or the newest readable checkpoint of this workdir ----------------------------
  state = parallel.replicate(step_lib.create_train_state(config, data.channels), mesh)
  checkpointer = checkpoints.Checkpointer(workdir, config)
  restored, restored_step = checkpointer.restore_latest(state)
  if restored is not None:
    state = restored
    logging.info("Resuming from step %d (%s).", restored_step,
                 os.path.join(checkpointer.directory, str(restored_step)))
    writer.truncate_metrics(restored_step)  # lines a killed run logged after its last checkpoint
    if not data.exact_order:
      logging.warning("tf.data streaming path: the data order after a resume differs from an "
                      "uninterrupted run's.")

  # ---- Step programs, sampling, evaluation --------------------------------------------------------
  steps = _Steps(config, data, mesh, per_device)
  sample = sampling.make_sampler(models.build_models(config, data.channels)[0], config.sample_bn)
  grid_z = randomness.eval_latents(jax.random.key(config.seed), config.num_samples, config.latent_dim)
  evaluation = _Evaluation(config, workdir, data.image_shape, sample) if config.eval_every else None
  ema = state.g_ema is not None

  # ---- Train --------------------------------------------------------------------------------------
  step = int(state.step)
  progress = _Progress(config, writer, step)
  agree_to_stop = parallel.StopAgreement(mesh)
  with _StopOnSignal() as stop, contextlib.closing(data):
    while step < config.num_steps:
      k = min(config.steps_per_call, config.num_steps - step)
      state, metrics = steps(state, step, k)
      step += k
      progress.ran(step, metrics)
      # A signal to any process stops every process after the same call (never on the local signal
      # alone: the others would wait for it in the next step's collectives).
      stopping = agree_to_stop(stop.signal or 0)
      reached = lambda every: step // every > (step - k) // every  # (step - k, step] holds a multiple
      done = step == config.num_steps or stopping
      save = done or reached(config.checkpoint_every)
      log = done or reached(config.log_every)
      if save or log:
        progress.fetch(step)  # never checkpoint a state that is not finite: this raises first
      if log:
        progress.log(step)
      if (done or reached(config.sample_every)) and writer.enabled:
        # From a host copy of G, on this process's default device: only process 0 draws samples.
        writer.write_samples(step, sampling.sample_images(sample, state.generator(), grid_z))
        if ema:
          writer.write_samples(step, sampling.sample_images(sample, state.g, grid_z), prefix="raw_")
      # Not on a stop: the resumed run evaluates at the multiples an uninterrupted run does, so
      # evaluations.jsonl lines and best/ are the same however often the run was stopped.
      if evaluation and (step == config.num_steps or reached(config.eval_every)):
        evaluation.run(state, step, writer)
      if save:
        checkpointer.save(state, step)  # asynchronous: returns once the arrays are off the devices
      if stopping:
        checkpointer.wait()
        logging.warning("Stopped by %s at step %d%s; checkpoint written. Run the same command again to "
                        "resume.", signal.Signals(stopping).name, step,
                        " (sent to one or more of the processes)" if jax.process_count() > 1 else "")
        break

  # ---- Finish -------------------------------------------------------------------------------------
  agree_to_stop.finish()
  checkpointer.close()
  if evaluation:
    evaluation.close()
  if step == config.num_steps:
    path = checkpoints.export_generator(workdir, state, config, data.channels)
    logging.info("Done: %d steps. Generator exported to %s.", step, path)
    gif = writer.write_progress_gif()
    if gif:
      logging.info("Sample grids over training: %s", gif)
  writer.close()
  return state


class _Steps:
  """steps(state, step, k): k training steps from state step `step` in one call
  (parallel.make_multi_step), one compiled program per k, made on first use (on XLA:CPU all of them
  dispatch the single step's program)."""

  def __init__(self, config, data, mesh, per_device):
    platform = parallel.platform(mesh)
    self._data, self._positions = data, parallel.batch_positions(mesh, per_device)
    self._train_step = step_lib.make_train_step(config, data.channels, data.step_num_examples, platform)
    self._scan = parallel.scan_by_default(platform)
    self._calls = {1: parallel.pmap_step(self._train_step, data.in_memory)}

  def __call__(self, state, step, k):
    if k not in self._calls:
      self._calls[k] = parallel.make_multi_step(self._train_step, k, self._data.in_memory, self._scan,
                                                p_step=self._calls[1])
    return self._calls[k](state, self._positions, self._data.for_call(step, k))


class _Progress:
  """The step metrics: kept on device until a log or checkpoint step needs them, checked for
  non-finite values, averaged per log interval into metrics.jsonl, TensorBoard and the console."""

  def __init__(self, config, writer, step):
    self.config, self.writer = config, writer
    self.pending, self.pending_start = [], step  # metrics still on device
    self.fetched = []  # host metrics (one dict per step) since the last log line
    self.t_last, self.step_last = None, step

  def ran(self, step, metrics):
    self.pending.append(metrics)
    if self.t_last is None:  # the first call compiles: start the clock after it
      jax.block_until_ready(metrics)
      self.t_last, self.step_last = time.time(), step

  def fetch(self, step):
    host = per_step(jax.device_get(self.pending))
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
    logging.info("step %d/%d | d_loss %.3f g_loss %.3f D(x) %.2f D(G(z)) %.2f | %.2f steps/s %.0f img/s "
                 "| ETA %s", step, config.num_steps, mean["d_loss"], mean["g_loss"], mean["d_real"],
                 mean["d_fake"], rate, rate * config.batch_size, _format_eta(eta))
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


class _Evaluation:
  """--eval_every: FID/KID of the generator (and of the raw one beside an EMA one) on the fixed
  evaluation noise, and the best checkpoint by FID in <workdir>/best.

  Process 0 trains and caches the evaluator first, then the others load it (no race on the cache).
  Each process generates and embeds its share of the samples; the metrics, computed by every process
  from all the gathered embeddings, are the same everywhere, so all take the best-checkpoint decision
  together (process 0's FID decides, broadcast). Only process 0 writes."""

  def __init__(self, config, workdir, image_shape, sample):
    from dcgan_jax import evaluator  # pylint: disable=g-import-not-at-top
    self.sample = sample
    ev = parallel.process_0_first(lambda: evaluator.load_or_train(
        config.dataset, config.data_dir, image_shape, config.evaluator_dir), "the evaluator")
    logging.info("Evaluator %s: test accuracy %.4f.", ev.path, ev.test_accuracy)
    self.scorer = evaluator.Scorer(ev, config.data_dir, kid_subsets=20)
    # After the evaluator's data are read: orbax's background clean-up of a new checkpoint directory
    # must not overlap tfds's file access (tfds.testing.mock_data patches the file system meanwhile).
    self.checkpointer = checkpoints.Checkpointer(workdir, config, subdir="best", max_to_keep=1)
    self.best = (self.checkpointer.latest_score() or {}).get("fid", float("inf"))
    self.z = randomness.eval_latents(jax.random.key(config.seed), config.eval_samples, config.latent_dim)

  def _score(self, g) -> dict:
    """Each process generates and embeds its share of the evaluation samples; the embeddings are
    gathered, and every process computes the same metrics from all of them."""
    from dcgan_jax import evaluator  # pylint: disable=g-import-not-at-top
    share = sampling.sample_images(self.sample, g, parallel.process_share(self.z))
    images = evaluator.as_uint8_images(share, self.scorer.evaluator.image_shape)
    feats, probs = self.scorer.evaluator.embed(images)
    n = len(self.z)
    report = self.scorer.score_embedded(parallel.gather_shares(feats, n), parallel.gather_shares(probs, n),
                                        precision_recall=False)
    return {k: float(report[k]) for k in ("fid", "kid", "coverage", "class_kl") if k in report}

  def run(self, state, step, writer) -> None:
    start = time.time()
    results = self._score(state.generator())
    ema = state.g_ema is not None
    if ema:
      results.update({f"{k}_raw": v for k, v in self._score(state.g).items()})
    writer.write_metrics(step, results)
    if writer.enabled:
      logging.info("step %d | %s | evaluated in %.1f s", step,
                   " ".join(f"{k} {v:.4g}" for k, v in results.items()), time.time() - start)
    fid = parallel.broadcast_from_process_0(results["fid"])  # every process takes the same decision
    if fid < self.best:
      self.best = fid
      self.checkpointer.save(state, step, score=dict(fid=fid, step=step, ema=ema))
      # Finished before the rolling checkpoint of the same step starts: orbax names its multi-process
      # barriers by step alone, and two saves of one step in flight at once collide (a deadlock).
      self.checkpointer.wait()
      logging.info("New best FID %.4g at step %d: checkpoint in %s.", fid, step, self.checkpointer.directory)

  def close(self):
    self.checkpointer.close()


class _StopOnSignal:
  """Within the block, SIGTERM / SIGINT set `.signal` instead of killing the process, so the loop can
  finish its step and write a checkpoint (preemption, Ctrl-C). A second signal acts as usual."""

  def __enter__(self):
    self.signal: Optional[signal.Signals] = None
    self._old = {}
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)
    signal.signal(signum, self._old[signum])  # a second Ctrl-C interrupts at once

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
