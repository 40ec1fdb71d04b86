"""The layout of a run's directory (--workdir), and reading a run back. No JAX here.

    config.json          {"config": every Config field, resolved; "run": where and on what it ran}
    metrics.jsonl        one JSON line per log step (and per in-training evaluation)
    evaluations.jsonl    reports of `python -m dcgan_jax.evaluate --workdir=...`
    tensorboard/         TensorBoard events
    samples/             step_XXXXXXXX.png grids (raw_step_... for the raw generator beside an EMA one),
                         progress.gif
    checkpoints/<step>/  the rolling checkpoints (checkpoints.py)
    best/<step>/         the checkpoint with the lowest in-training FID (--eval_every)
    generator/           the generator-only export
    run.lock             held (flock) by the trainer writing this workdir; a dead process holds nothing

Every module that reads or writes one of these asks this one for its path.
"""

import datetime
import fcntl
import json
import os
import socket
from typing import IO, Tuple

from dcgan_jax import config as config_lib
from dcgan_jax.config import Config, ConfigError

CONFIG = "config.json"
METRICS = "metrics.jsonl"
EVALUATIONS = "evaluations.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
BEST = "best"
GENERATOR = "generator"
LOCK = "run.lock"


def hold_lock(workdir: str) -> IO:
  """Creates workdir if needed and takes its lock for this process's lifetime (keep the returned file
  open). ConfigError when workdir cannot be written, or when another live trainer holds the lock (the
  message names it). An flock: the kernel releases it when its holder exits or is killed, so a crashed
  run never blocks the next one."""
  try:
    os.makedirs(workdir, exist_ok=True)
    lock = open(path(workdir, LOCK), "a+")
  except OSError as e:
    raise ConfigError(f"--workdir={workdir}: cannot be written ({e.strerror}); pass a directory you can "
                      "write to") from None
  try:
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    lock.seek(0)
    holder = lock.read().strip() or "another process"
    lock.close()
    raise ConfigError(f"--workdir={workdir}: in use by a training run ({holder}); wait for it to end or "
                      "stop it (SIGTERM), or pass another --workdir") from None
  except OSError:  # a file system without locks: go on without one
    return lock
  lock.truncate(0)
  lock.write(f"pid {os.getpid()} on {socket.gethostname()}, since "
             f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
  lock.flush()
  return lock


def path(workdir: str, *parts: str) -> str:
  """<workdir>/<parts...>, e.g. path(w, METRICS)."""
  return os.path.join(workdir, *parts)


def has_config(workdir: str) -> bool:
  return os.path.exists(path(workdir, CONFIG))


def read_saved(workdir: str) -> dict:
  """config.json as written: {"config": {...}, "run": {...}}. ConfigError when there is none or it is not
  one dcgan_jax wrote."""
  file = path(workdir, CONFIG)
  if not os.path.exists(file):
    raise ConfigError(f"--workdir={workdir}: no {CONFIG}; pass the --workdir of a training run")
  try:
    with open(file) as f:
      saved = json.load(f)
    if not isinstance(saved["config"], dict):
      raise TypeError("config is not an object")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{file}: not a {CONFIG} written by dcgan_jax.main ({type(e).__name__}); "
                      "leave that run out") from None
  saved.setdefault("run", {})
  return saved


def read_config(workdir: str) -> Tuple[Config, dict]:
  """(the run's resolved Config, its "run" record: channels, devices, backend, git_commit, ...)."""
  saved = read_saved(workdir)
  return config_lib.from_dict(saved["config"]).resolved(), saved["run"]


def read_jsonl(file: str, warn=None) -> list:
  """The JSON records of a JSON-lines file ([] when there is none). A line that is not JSON (cut short by
  a killed process) is skipped, and `warn(message)` called when given."""
  records = []
  if os.path.exists(file):
    with open(file) as f:
      for number, line in enumerate(f, 1):
        try:
          records.append(json.loads(line))
        except ValueError:
          if line.strip() and warn:
            warn(f"{file}:{number}: not a JSON line; skipped")
  return records


def checkpoint_steps(workdir: str, subdir: str = CHECKPOINTS) -> list:
  """The steps of the complete checkpoints under <workdir>/<subdir>, ascending."""
  directory = path(workdir, subdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())
