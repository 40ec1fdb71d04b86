"""The training loop: `train_and_evaluate(config, workdir)`.

Phases: set up (devices, data, outputs, state: fresh or resumed), then per call of --steps_per_call
steps: run, log, sample, evaluate, checkpoint, stop; then finish (export, GIF). The step is pure
(step.py) and mapped over the devices by parallel.py; this module only decides what happens when.
"""

import contextlib
import dataclasses
import json
import os
import signal
import time

from absl import logging
import jax
import numpy as np

from dcgan_jax import checkpoints
from dcgan_jax.datasets import data as data_lib
from dcgan_jax import members
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import progress
from dcgan_jax import randomness
from dcgan_jax import sampling
from dcgan_jax import step as step_lib
from dcgan_jax import stopping
from dcgan_jax import workdir as workdir_lib
from dcgan_jax import writers
from dcgan_jax.config import Config, ConfigError

TrainingDivergedError = progress.TrainingDivergedError


def train_and_evaluate(config: Config, workdir: str) -> list:
  """Trains a DCGAN as configured, writing logs, samples, checkpoints and the config into workdir.

  With --seeds (and --sweep), one member per seed (and combination of swept values) trains in this one
  program, each the run of its own settings with its own run directory (members.py's layout): on every
  platform each member's steps run the single run's compiled program, so a member is bitwise the single
  run of its settings. Without them the program is a group of one run, and nothing else differs.

  Returns the runs' final TrainStates (replicated over the devices), in members.runs' order.
  """
  # ---- Settings, devices, checkpoints and data: every refusal before anything is written ---------
  config = config.resolved()
  mesh = parallel.global_mesh()
  policy = platforms.of_mesh(mesh)  # every per-platform choice of the run's programs
  parallel.check_devices(config, mesh.devices.size)
  per_device = config.batch_size // mesh.devices.size
  if (config.num_steps * config.d_steps + 1) * config.batch_size >= 2**31:
    raise ConfigError(f"--num_steps={config.num_steps}: more than 2**31 examples would be drawn; "
                      "train for fewer steps (or a smaller batch).")
  runs = members.runs(config, workdir)
  form = policy.members_form(config.members_form) if len(runs) > 1 else "dispatch"
  with contextlib.ExitStack() as closing:
    locks = _lock(runs, workdir, closing)  # nothing is written until claim()
    start = members.common_step(runs)
    for run in runs:
      checkpoints.check_resume(run.directory, run.config)
    weights = _inception_weights(config)  # (a missing weights file is refused before the data load)
    datas = _open_data(runs, mesh, per_device, closing)
    _check_members(runs, datas[0], form)
    scorer = _make_scorer(config, datas[0].image_shape, weights) if config.eval_every else None

    # ---- Outputs and state: fresh, or the newest checkpoint every run has -------------------------
    for lock in locks:
      lock.claim()
    where = dict(devices=jax.local_device_count(), device_kind=jax.local_devices()[0].device_kind,
                 backend=platforms.backend_name(), git_commit=checkpoints.git_commit())  # config.json's "run"
    synchronous_saves = jax.process_count() > 1 and len(runs) > 1  # (members save the same steps)
    group = [_Member(run, data, mesh, where, sample, scorer, i if form == "vmap" else None, synchronous_saves)
             for i, (run, data, sample) in enumerate(zip(runs, datas, _samplers(runs, datas[0].channels)))]
    states = [m.restore(start) for m in group]
    if len({m.step for m in group}) > 1:  # a member's newest common checkpoint was unreadable
      states = [m.restore(min(m.step for m in group)) for m in group]
    if form == "vmap":  # one program steps all members, stacked on a leading axis
      runner = _Stacked(group, states, _Steps(group[0].config, datas[0], mesh, policy, per_device,
                                              over_members=True))
    else:
      runner = _Dispatched(group, states, datas[0], mesh, policy, per_device)
    del states  # the runner holds the states (stacked ones: not the unstacked copies as well)

    # ---- Train, then finish ---------------------------------------------------------------------
    step = _train(config, group, runner, mesh)
    for i, m in enumerate(group):
      m.finish(runner.state(i), step)
    if len(group) > 1 and step == config.num_steps and group[0].writer.enabled:
      logging.info("The members' study table (python -m dcgan_jax.study %s):\n%s", workdir,
                   members.study_table(workdir))
    return [runner.state(i) for i in range(len(group))]


def _train(config, group, runner, mesh) -> int:
  """The loop: calls of --steps_per_call steps, each followed by every member's logging, samples,
  evaluation and checkpoint as due, until the last step or an agreed stop. Returns the step reached."""
  step = group[0].step
  agree_to_stop = parallel.StopAgreement(mesh)
  with stopping.requests(lambda: workdir_lib.resume_point([m.workdir for m in group])) as requests:
    while step < config.num_steps:
      k = min(config.steps_per_call, config.num_steps - step)
      runner.run(step, k)
      step += k
      # A signal to any process stops every process after the same call (never on the local signal
      # alone: the others would wait for it in the next step's collectives).
      stop = agree_to_stop(requests.signal or 0)
      for i, m in enumerate(group):
        m.after_call(runner.state(i), step, k, stop)
      if stop:
        logging.warning("Stopped by %s at step %d%s; checkpoint written. Run the same command again to "
                        "resume.", signal.Signals(stop).name, step,
                        " (sent to one or more of the processes)" if jax.process_count() > 1 else "")
        break
  agree_to_stop.finish()
  return step


def _lock(runs, workdir, closing) -> list:
  """Process 0 holds the run directories (all processes of a run share them), and with members their
  parent directory too (it holds no run.lock: each member may be continued alone as a single run)."""
  if jax.process_index() != 0:
    return []
  directories = [run.directory for run in runs]
  locks = [closing.enter_context(workdir_lib.RunLock(directories))]
  if workdir not in directories:
    locks.append(closing.enter_context(workdir_lib.RunLock([workdir], holder_file=None)))
  return locks


def _open_data(runs, mesh, per_device, closing) -> list:
  """Each run's TrainingData. The in-memory dataset is the same for every seed (the order is drawn
  inside the step); the streamed paths read in their run's order, one reader per member."""
  first = data_lib.open_training_data(runs[0].config, mesh, per_device)
  closing.callback(first.close)
  datas = [first]
  for run in runs[1:]:
    datas.append(first if first.in_memory else data_lib.open_training_data(run.config, mesh, per_device))
    if datas[-1] is not first:
      closing.callback(datas[-1].close)
  return datas


def _per_computation(configs, make) -> list:
  """[make(config)] for each config, made once per computation: configs that differ only in their seed
  (the seed is in the state, not in the program) share one result, and its compilations."""
  made = {}
  for config in configs:
    computation = dataclasses.replace(config, seed=0)
    if computation not in made:
      made[computation] = make(config)
  return [made[dataclasses.replace(config, seed=0)] for config in configs]


def _samplers(runs, channels) -> list:
  """Each run's jitted sampler (sampling.make_sampler), one per computation."""
  return _per_computation([run.config for run in runs], lambda config: sampling.make_sampler(
      models.build_models(config, channels)[0], config.sample_bn))


def _check_members(runs, data, form) -> None:
  """ConfigError when the members' states and the dataset would not fit on a device (members.
  check_memory, from shapes alone), or --members_form=vmap with a dataset read by index."""
  def state_bytes(config):
    return step_lib.state_bytes(jax.eval_shape(lambda: step_lib.create_train_state(config, data.channels)))
  if len(runs) > 1:
    largest = max(state_bytes(c) for c in {dataclasses.replace(r.config, seed=0) for r in runs})
    limit = (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    data_bytes = data.num_examples * int(np.prod(data.image_shape)) if data.in_memory else 0
    members.check_memory(len(runs), largest, limit, data_bytes)
  if form == "vmap" and not data.in_memory:
    raise ConfigError("--members_form=vmap: the members share one dataset in device memory, and this "
                      "one is read by index (--in_memory); use --members_form=dispatch")


class _Member:
  """One run in the program: its settings (its own seed), run directory, outputs, checkpoints and
  evaluation. Its state is held by the runner (_Dispatched, _Stacked) and passed in."""

  def __init__(self, run, data, mesh, where, sample, scorer, index, synchronous_saves):
    self.config, self.workdir, self.name = run.config, run.directory, run.name
    self.data, self.mesh, self.sample = data, mesh, sample  # sample: the run's jitted sampler (_samplers)
    self.index = index  # the member's position on a stacked program's metrics (--members_form=vmap)
    self.writer = writers.RunWriter(self.workdir, enabled=jax.process_index() == 0)
    self.writer.write_config(self.config, extra=dict(
        where, in_memory=data.in_memory, data_path=data.path, num_examples=data.num_examples,
        channels=data.channels))
    logging.info("Config%s: %s", f" of {self.name}" if self.name else "",
                 json.dumps(dict(self.config.__dict__)))
    # Several members save the same step: in a multi-process run each save completes before the next
    # member's starts (Checkpointer's asynchronous=False).
    self.checkpointer = checkpoints.Checkpointer(self.workdir, self.config,
                                                 asynchronous=not synchronous_saves)
    self.grid_z = randomness.eval_latents(jax.random.key(self.config.seed), self.config.num_samples,
                                          self.config.latent_dim)
    self.evaluation = (_Evaluation(self.config, self.workdir, self.sample, scorer, self.name)
                       if scorer else None)

  def restore(self, at_most):
    """The fresh state, or the newest checkpoint (of step <= at_most); drops metrics lines after it and
    starts the step metrics from its step."""
    state = parallel.replicate(step_lib.create_train_state(self.config, self.data.channels), self.mesh)
    restored, restored_step = self.checkpointer.restore_latest(state, at_most)
    if restored is not None:
      state = restored
      logging.info("Resuming %sfrom step %d (%s).", f"{self.name} " if self.name else "", restored_step,
                   os.path.join(self.checkpointer.directory, str(restored_step)))
      if not self.data.exact_order:
        logging.warning("tf.data streaming path: the data order after a resume differs from an "
                        "uninterrupted run's.")
    self.step = int(state.step)
    self.writer.truncate_metrics(self.step)  # lines a killed run logged after its last checkpoint
    self.progress = progress.Progress(self.config, self.writer, self.step, self.name, self.index)
    return state

  def after_call(self, state, step, k, stopping):
    """Log, sample, evaluate and checkpoint as due after the call that reached `step`."""
    config, writer = self.config, self.writer
    reached = lambda every: step // every > (step - k) // every  # (step - k, step] holds a multiple
    done = step == config.num_steps or stopping
    save = done or reached(config.checkpoint_every)
    log = done or reached(config.log_every)
    if save or log:
      self.progress.fetch(step)  # never checkpoint a state that is not finite: this raises first
    if log:
      self.progress.log(step)
    if (done or reached(config.sample_every)) and writer.enabled:
      # From a host copy of G, on this process's default device: only process 0 draws samples.
      writer.write_samples(step, sampling.sample_images(self.sample, state.generator(), self.grid_z))
      if state.g_ema is not None:
        writer.write_samples(step, sampling.sample_images(self.sample, state.g, self.grid_z), prefix="raw_")
    # Not on a stop: the resumed run evaluates at the multiples an uninterrupted run does, so
    # evaluations.jsonl lines and best/ are the same however often the run was stopped.
    if self.evaluation and (step == config.num_steps or reached(config.eval_every)):
      self.evaluation.run(state, step, writer)
    if save:
      self.checkpointer.save(state, step)  # (asynchronous: returns once the arrays are off the devices)
    if stopping:
      self.checkpointer.wait()

  def finish(self, state, step):
    self.checkpointer.close()
    if self.evaluation:
      self.evaluation.close()
    if step == self.config.num_steps:
      path = checkpoints.export_generator(self.workdir, state, self.config, self.data.channels)
      logging.info("Done%s: %d steps. Generator exported to %s.", f" ({self.name})" if self.name else "",
                   step, path)
      gif = self.writer.write_progress_gif()
      if gif:
        logging.info("Sample grids over training: %s", gif)
    self.writer.close()


class _Dispatched:
  """Each run's (member's) k steps by its own compiled program, one after the other; members that differ
  only in their seed share one program (the seed is in the state, not in the program)."""

  def __init__(self, group, states, data, mesh, policy, per_device):
    self.group, self.states = group, list(states)
    self.steps = _per_computation([m.config for m in group],
                                  lambda config: _Steps(config, data, mesh, policy, per_device))

  def run(self, step, k):
    for i, m in enumerate(self.group):
      self.states[i], metrics = self.steps[i](self.states[i], step, k, m.data)
      m.progress.ran(step + k, metrics)

  def state(self, i):
    return self.states[i]


class _Stacked:
  """--members_form=vmap: the members' states stacked on a leading axis, stepped by one program. A
  member's state is its slice, taken when something needs it (a checkpoint, samples, evaluation)."""

  def __init__(self, group, states, steps):
    self.group, self.steps = group, steps
    self.stacked = parallel.stack_members(states)
    self._slices = [None] * len(group)  # member i's state, sliced from the stacked one when needed

  def run(self, step, k):
    self.stacked, metrics = self.steps(self.stacked, step, k, self.group[0].data)
    self._slices = [None] * len(self.group)
    for m in self.group:
      m.progress.ran(step + k, metrics)

  def state(self, i):
    if self._slices[i] is None:
      self._slices[i] = parallel.member_of(self.stacked, i)
    return self._slices[i]


class _Steps:
  """steps(state, step, k, data): k training steps from state step `step` in one call
  (parallel.make_multi_step), one compiled program per k, made on first use (on XLA:CPU all of them
  dispatch the single step's program). over_members: of a state with a leading member axis."""

  def __init__(self, config, data, mesh, policy, per_device, over_members=False):
    self._data, self._positions = data, parallel.batch_positions(mesh, per_device)
    self._train_step = step_lib.make_train_step(config, data.channels, data.step_num_examples, policy)
    if over_members:
      self._train_step = parallel.over_members(self._train_step)
    self._scan = policy.scan_steps
    self._calls = {1: parallel.pmap_step(self._train_step, data.replicated)}

  def __call__(self, state, step, k, data):
    """data: the run's TrainingData (the members' readers differ; their programs do not)."""
    if k not in self._calls:
      self._calls[k] = parallel.make_multi_step(self._train_step, k, self._data.replicated, self._scan,
                                                p_step=self._calls[1])
    return self._calls[k](state, self._positions, data.for_call(step, k))


def _inception_weights(config):
  """--eval_features=inception: the weights (found, fetched or converted by process 0 first, then by
  the others from the cache); None otherwise."""
  if not (config.eval_every and config.eval_features == "inception"):
    return None
  from dcgan_jax.evaluation import inception_metrics  # pylint: disable=g-import-not-at-top
  return parallel.process_0_first(lambda: inception_metrics.load_weights(
      config.inception_weights, config.inception_dir), "the Inception weights")


def _make_scorer(config, image_shape, inception_weights=None):
  """The evaluator (trained and cached by process 0 first, then loaded by the others) and its scorer,
  shared by all members; or, with --eval_features=inception, the Inception network's."""
  if inception_weights is not None:
    from dcgan_jax.evaluation import inception_metrics  # pylint: disable=g-import-not-at-top
    return inception_metrics.GeneratorScorer(inception_weights, config.dataset, config.data_dir,
                                             image_shape, config.inception_dir)
  from dcgan_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from dcgan_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top
  ev = parallel.process_0_first(lambda: evaluator.load_or_train(
      config.dataset, config.data_dir, image_shape, config.evaluator_dir), "the evaluator")
  logging.info("Evaluator %s: test accuracy %.4f.", ev.path, ev.test_accuracy)
  return scoring.Scorer(ev, config.data_dir, kid_subsets=20)


class _Evaluation:
  """--eval_every: FID/KID of the generator (and of the raw one beside an EMA one) on the fixed
  evaluation noise, and the best checkpoint by FID in <workdir>/best.

  Process 0 trains and caches the evaluator first, then the others load it (no race on the cache).
  Each process generates and embeds its share of the samples; the metrics, computed by every process
  from all the gathered embeddings, are the same everywhere, so all take the best-checkpoint decision
  together (process 0's FID decides, broadcast). Only process 0 writes."""

  def __init__(self, config, workdir, sample, scorer, name=""):
    self.sample, self.scorer, self.prefix = sample, scorer, f"{name} | " if name else ""
    # After the evaluator's data are read (_make_scorer): orbax's background clean-up of a new checkpoint
    # directory must not overlap tfds's file access (tfds.testing.mock_data patches the file system).
    # Synchronous: complete before the rolling checkpoint of the same step starts (Checkpointer).
    self.checkpointer = checkpoints.Checkpointer(workdir, config, subdir="best", max_to_keep=1,
                                                 asynchronous=False)
    best = self.checkpointer.latest_score() or {}
    self.features = config.eval_features
    # A best/ chosen in other features holds an FID on another scale: the first evaluation replaces it.
    same = best.get("features", "evaluator") == self.features
    self.best = best.get("fid", float("inf")) if same else float("inf")
    self.z = randomness.eval_latents(jax.random.key(config.seed), config.eval_samples, config.latent_dim)

  def _score(self, g) -> dict:
    """The scorer's in-training metrics of g's images from the fixed evaluation noise: each process
    generates and embeds its share, and every process computes the same metrics from all of them."""
    return self.scorer.score_generator(self.sample, g, self.z)

  def run(self, state, step, writer) -> None:
    start = time.time()
    results = self._score(state.generator())
    ema = state.g_ema is not None
    if ema:
      results.update({f"{k}_raw": v for k, v in self._score(state.g).items()})
    writer.write_metrics(step, results)
    if writer.enabled:
      logging.info("%sstep %d | %s | evaluated in %.1f s", self.prefix, step,
                   " ".join(f"{k} {v:.4g}" for k, v in results.items()), time.time() - start)
    fid = parallel.broadcast_from_process_0(results["fid"])  # every process takes the same decision
    if fid < self.best:
      self.best = fid
      self.checkpointer.save(state, step, score=dict(fid=fid, step=step, ema=ema, features=self.features))
      logging.info("%sNew best FID %.4g at step %d: checkpoint in %s.", self.prefix, fid, step,
                   self.checkpointer.directory)

  def close(self):
    self.checkpointer.close()
