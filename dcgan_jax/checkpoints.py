"""Orbax checkpoints: save, resume, provenance, and a generator-only export.

Layout of a workdir:
    checkpoints/<step>/state       TrainState: step, base key (as raw key data), G and D params,
                                   batch_stats and optax states. With the in-memory data path the batch
                                   order is a function of (seed, step), so this is all a resume needs.
    checkpoints/<step>/config      the resolved Config that wrote it (JSON)
    checkpoints/<step>/provenance  versions, git commit, devices, processes, time (JSON)
    generator/                     G's params + batch_stats and the config to rebuild it (export)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a process killed
mid-save (even by SIGKILL) leaves no checkpoint that looks complete; old checkpoints are deleted only
after a newer one is finalised (`max_to_keep`). Saving is asynchronous: the arrays are copied off the
devices, then written in a background thread while training goes on.
"""

import contextlib
import dataclasses
import datetime
import errno
import functools
import json
import os
import platform
import subprocess
from typing import Optional, Tuple

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from dcgan_jax import config as config_lib
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import Config, ConfigError

class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written (the disk is full). One line: where, and the step to resume."""


def provenance(config: Config) -> dict:
  """Where and with what a checkpoint was made."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  versions = dict(jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__,
                  optax=optax.__version__, orbax=getattr(ocp, "__version__", "?"), numpy=np.__version__,
                  python=platform.python_version())
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    versions["tensorflow_datasets"] = metadata.version("tensorflow-datasets")
  except Exception:  # pylint: disable=broad-except
    versions["tensorflow_datasets"] = None
  return dict(config=dataclasses.asdict(config), versions=versions, git_commit=git_commit(),
              device_kind=jax.devices()[0].device_kind, backend=platforms.backend_name(),
              device_count=jax.device_count(), local_device_count=jax.local_device_count(),
              process_count=jax.process_count(), host=platform.node(),
              time=datetime.datetime.now(datetime.timezone.utc).isoformat())


@functools.lru_cache(maxsize=None)
def git_commit() -> Optional[str]:
  """HEAD of the checkout this package runs from, "-dirty" appended when tracked files are modified;
  None outside a git checkout (e.g. an installed wheel). Read once per process (config.json and every
  checkpoint's provenance): the code that runs is the code imported at the start, whatever happens to
  the checkout during a run."""
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True,
                           timeout=10).stdout.strip()
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None
  except (OSError, subprocess.SubprocessError):
    return None


def _to_saveable(state):
  """Typed PRNG keys are not arrays orbax can write: store their raw uint32 data. In a multi-process run,
  the pmapped step returns per-process replicated arrays; orbax needs global ones (one logical array,
  written once), so the local replicas are reassembled into arrays replicated over all devices."""
  return parallel.global_replicated(state.replace(key=jax.random.key_data(state.key)))


def _from_saveable(state, like):
  return state.replace(key=jax.random.wrap_key_data(state.key, impl=jax.random.key_impl(like.key)))


class Checkpointer:
  """Saves and restores TrainStates under <workdir>/checkpoints."""

  def __init__(self, workdir: str, config: Config, subdir: str = "checkpoints",
               max_to_keep: Optional[int] = None, asynchronous: bool = True):
    """subdir "checkpoints": the rolling checkpoints; "best": the best one by FID (max_to_keep=1).
    asynchronous=False: save() returns once the checkpoint is complete, for managers that save the same
    step as another one in a multi-process run (orbax 0.12's barriers are then device collectives, which
    two managers' writer threads could enter in different orders on different processes)."""
    self.config = config
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or config.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True,
                                           enable_async_checkpointing=asynchronous)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "config", "provenance", "score"))

  def save(self, state, step: int, score: Optional[dict] = None) -> None:
    """Saves `state` as checkpoint `step`: asynchronously, returning once the arrays are off the devices
    (or, asynchronous=False, once it is complete).
    `score`: evaluation results stored beside it (JSON), e.g. {"fid": ...} for the best checkpoint.
    CheckpointWriteError when this or the previous save found the disk full."""
    if step in self.manager.all_steps():
      return
    with self._disk_full_is_one_line():
      self.manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_saveable(state)),
          config=ocp.args.JsonSave(dataclasses.asdict(self.config)),
          provenance=ocp.args.JsonSave(provenance(self.config)),
          score=ocp.args.JsonSave(score or {})))

  @contextlib.contextmanager
  def _disk_full_is_one_line(self):
    """orbax reports a full disk from its writer threads as RESOURCE_EXHAUSTED / ENOSPC errors: turned
    into one CheckpointWriteError naming the directory and the step the run resumes from."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      text = str(e)
      if not ((isinstance(e, OSError) and e.errno == errno.ENOSPC) or "RESOURCE_EXHAUSTED" in text
              or "No space left" in text):
        raise
      complete = [s for s in self.manager.all_steps() if os.path.isdir(os.path.join(self.directory, str(s)))]
      raise CheckpointWriteError(
          f"{self.directory}: the disk is full, a checkpoint could not be written; free space (or move "
          "the workdir) and run the same command again to resume from "
          + (f"step {max(complete)}" if complete else "the start (no checkpoint is complete)")) from None

  def latest_score(self) -> Optional[dict]:
    """The score saved with the newest checkpoint here, or None (no checkpoint, or none saved)."""
    step = self.manager.latest_step()
    if step is None:
      return None
    try:
      return self.manager.restore(step, args=ocp.args.Composite(score=ocp.args.JsonRestore())).score
    except Exception:  # pylint: disable=broad-except
      return None

  def wait(self) -> None:
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.manager.close()

  def restore_latest(self, like, at_most: Optional[int] = None) -> Tuple[Optional[object], Optional[int]]:
    """Restores the newest readable checkpoint (of step <= at_most, when given) into the structure and
    shardings of `like`.

    Returns (state, step), or (None, None) when there is no checkpoint. A checkpoint of another
    configuration raises ConfigError. An unreadable one is moved aside to <step>.unreadable (kept for
    inspection, out of the way of the step that will be saved again) with a warning naming it, and the
    next older one is tried.
    """
    target = _to_saveable(like)
    for step in sorted(self.manager.all_steps(), reverse=True):
      if at_most is not None and step > at_most:
        continue
      path = os.path.join(self.directory, str(step))
      try:
        saved_config = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config
        _refuse_other_settings(path, saved_config, self.config)
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target))).state
        _say_if_topology_changed(self.manager, step)
        return _from_saveable(restored, like), step
      except ConfigError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        aside = f"{path}.unreadable"
        logging.warning("Checkpoint %s is unreadable (%s: %s); moved to %s, trying an older one.", path,
                        type(e).__name__, str(e).splitlines()[0] if str(e) else "", aside)
        os.replace(path, aside)
        self.manager.reload()
    return None, None


def check_resume(workdir: str, config: Config, subdir: str = workdir_lib.CHECKPOINTS) -> None:
  """ConfigError when the newest checkpoint whose settings can be read was written with settings a
  resumed run may not change. Reads JSON only: made before any data is loaded or file written, so a
  refused resume changes nothing (Checkpointer.restore_latest checks again what it restores)."""
  for step in reversed(workdir_lib.checkpoint_steps(workdir, subdir)):
    path = workdir_lib.path(workdir, subdir, str(step))
    try:
      with open(os.path.join(path, "config", "metadata")) as f:
        saved = json.load(f)
    except (OSError, ValueError):
      continue  # unreadable: restore_latest sets it aside and an older one is checked
    _refuse_other_settings(os.path.abspath(path), saved, config)
    return


def _refuse_other_settings(path: str, saved: dict, config: Config) -> None:
  diff = config_lib.resume_differences(saved, config)
  if diff:
    raise ConfigError(f"checkpoint {path} was written with other settings ({'; '.join(diff)}); use the "
                      "same settings to resume, or another --workdir to start a new run.")


def _say_if_topology_changed(manager, step: int) -> None:
  """One console line when a checkpoint is resumed on another number of processes or devices (a
  preempted slice often comes back with another shape): the run continues, on the same data order."""
  try:
    saved = manager.restore(step, args=ocp.args.Composite(provenance=ocp.args.JsonRestore())).provenance
    before = (saved["process_count"], saved["device_count"])
  except Exception:  # pylint: disable=broad-except  (a checkpoint without provenance: nothing to say)
    return
  now = (jax.process_count(), jax.device_count())
  if before != now:
    logging.info("Topology changed: the checkpoint of step %d was written by %d process(es) with %d "
                 "devices in all; continuing on %d with %d. The data order does not depend on it (with "
                 "--invariant_groups neither do the results; otherwise they differ by float rounding).",
                 step, *before, *now)


def read_state_numpy(workdir: str, step: Optional[int] = None,
                     subdir: str = "checkpoints") -> Tuple[dict, int]:
  """A checkpoint's state as a tree of numpy arrays, on any machine (no devices or shardings needed).

  Returns (tree, step); `step` None reads the newest. For comparisons, inspection and the CLIs.
  """
  if step is None:
    step = workdir_lib.checkpoint_steps(workdir, subdir)[-1]
  path = os.path.abspath(workdir_lib.path(workdir, subdir, str(step), "state"))
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args)), step


def relative_l2(a: dict, b: dict) -> float:
  """||a - b|| / ||b|| over all floating-point leaves of two state trees (float64 sums)."""
  num = den = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if np.asarray(y).dtype.kind == "f":
      x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
      num, den = num + float(np.sum((x - y) ** 2)), den + float(np.sum(y ** 2))
  return (num / den) ** 0.5


# --------------------------------------------------------------------------------------------------
# Generator-only export
# --------------------------------------------------------------------------------------------------
def export_generator(workdir: str, state, config: Config, channels: int) -> str:
  """Writes <workdir>/generator: G's params and batch_stats, and the config that rebuilds G."""
  path = os.path.abspath(workdir_lib.path(workdir, workdir_lib.GENERATOR))
  g = state.generator()  # the EMA weights when --g_ema_decay > 0
  variables = parallel.global_replicated({"params": g.params, "batch_stats": g.batch_stats})
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(path, "variables"), variables, force=True)
  with open(os.path.join(path, "generator.json"), "w") as f:
    json.dump({"config": dataclasses.asdict(config), "channels": channels, "ema": state.g_ema is not None,
               "step": int(jax.device_get(state.step))}, f, indent=2, sort_keys=True)
  return path


def load_generator(path: str):
  """Loads an export: returns (generator module, variables, config, step). No D, no optimizer state."""
  from dcgan_jax import models  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "generator.json")) as f:
    meta = json.load(f)
  config = config_lib.from_dict(meta["config"])
  generator, _ = models.build_models(config, meta["channels"])
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(os.path.abspath(path), "variables"))
  return generator, variables, config, meta["step"]


def load_run_generator(path: str, step: Optional[int] = None, use_ema: bool = True,
                       best: bool = False):
  """G from a workdir (its newest checkpoint, checkpoint `step`, or with best=True its best-by-FID one),
  or from a generator export (<workdir>/generator, or the export directory itself) when there is no
  checkpoint.

  Returns (generator module, variables {"params", "batch_stats"}, config, step, used_ema).
  """
  from dcgan_jax import models  # pylint: disable=g-import-not-at-top
  subdir = workdir_lib.BEST if best else workdir_lib.CHECKPOINTS
  steps = workdir_lib.checkpoint_steps(path, subdir)
  if steps:
    if step is None:
      step = steps[-1]
    elif step not in steps:
      raise ConfigError(f"--step={step}: no such checkpoint in {workdir_lib.path(path, subdir)}; it has "
                        f"{steps}")
    config, run = workdir_lib.read_config(path)
    tree, step = read_state_numpy(path, step, subdir=subdir)
    used_ema = bool(use_ema and tree.get("g_ema"))
    params = tree["g_ema"] if used_ema else tree["g"]["params"]
    generator, _ = models.build_models(config, run["channels"])
    return generator, {"params": params, "batch_stats": tree["g"]["batch_stats"]}, config, step, used_ema
  if step is not None or best:
    what = f"checkpoint {step}" if step is not None else "best checkpoint (train with --eval_every)"
    raise ConfigError(f"--workdir={path}: has no {what}; pass the --workdir of a run that has one")
  export = path if os.path.exists(os.path.join(path, "generator.json")) else os.path.join(path, "generator")
  if not os.path.exists(os.path.join(export, "generator.json")):
    raise ConfigError(f"--workdir={path}: has neither checkpoints nor a generator export; pass the "
                      "--workdir of a training run")
  generator, variables, config, export_step = load_generator(export)
  with open(os.path.join(export, "generator.json")) as f:
    return generator, variables, config, export_step, json.load(f).get("ema", False)
