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
    run.lock             who holds the workdir (the trainer's flock is on the directory; a dead
                         process holds nothing)

Every module that reads or writes one of these asks this one for its path.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
from typing import Optional, Tuple

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
GRID_PREFIX = "step_"  # samples/<prefix>step_XXXXXXXX.png: the prefix names the generator ("raw_")
PROGRESS_GIF = "progress.gif"  # in samples/


def sample_grid_name(step: int, prefix: str = "") -> str:
  """The file name (in SAMPLES) of the sample grid of `step`: <prefix>step_XXXXXXXX.png."""
  return f"{prefix}{GRID_PREFIX}{step:08d}.png"


def sample_grids(workdir: str) -> list:
  """The file names of the run's sample grids (its main generator's: the EMA one where both are
  drawn), in step order; [] when it has none."""
  folder = path(workdir, SAMPLES)
  if not os.path.isdir(folder):
    return []
  return sorted(n for n in os.listdir(folder) if n.startswith(GRID_PREFIX) and n.endswith(".png"))


class RunLock:
  """The trainer's hold on its run directories: an flock on each directory itself, so that a second
  trainer on the same workdir is refused while this one lives. The kernel releases it when its holder
  exits or is killed, so a crashed run never blocks the next one.

      lock = RunLock(workdirs)   # before anything is written: takes existing directories, writes nothing
      ...validate everything...
      lock.claim()               # creates the missing directories, locks them, writes run.lock
      lock.release()

  ConfigError (one line) when a directory cannot be written, or another live trainer holds it (the
  message names it from its run.lock). Locking the directory rather than a file in it means a refused
  command leaves the workdir byte for byte as it was, and a new workdir is created only by a run that
  starts.
  """

  def __init__(self, workdirs, flag: str = "--workdir", holder: str = "a training run",
               holder_file: Optional[str] = LOCK):
    """flag, holder: how the messages name the directories and the process that holds them;
    holder_file: the file claim() writes the holder into (None: none, e.g. in a dataset's folder)."""
    self.workdirs, self._held = list(dict.fromkeys(workdirs)), {}
    self._flag, self._holder, self._holder_file = flag, holder, holder_file
    for w in self.workdirs:
      check_writable(w, flag)
      if os.path.isdir(w):
        self._take(w)

  def _take(self, workdir: str) -> None:
    fd = os.open(workdir, os.O_RDONLY)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      try:
        with open(path(workdir, self._holder_file or LOCK)) as f:
          holder = f.read().strip() or "another process"
      except OSError:
        holder = "another process"
      raise ConfigError(f"{self._flag}={workdir}: in use by {self._holder} ({holder}); wait for it to end "
                        f"or stop it (SIGTERM), or pass another {self._flag}") from None
    except OSError:  # a file system without locks: go on without one
      pass
    self._held[workdir] = fd

  def claim(self) -> "RunLock":
    """Creates and locks the directories not yet held, and writes who holds them into run.lock."""
    for w in self.workdirs:
      try:
        os.makedirs(w, exist_ok=True)
        if w not in self._held:
          self._take(w)
        if self._holder_file:
          write_atomic(path(w, self._holder_file), f"pid {os.getpid()} on {socket.gethostname()}, since "
                       f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n")
      except OSError as e:
        raise ConfigError(f"{self._flag}={w}: cannot be written ({e.strerror}); pass a directory you can "
                          "write to") from None
    return self

  def release(self) -> None:
    for fd in self._held.values():
      os.close(fd)
    self._held = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def hold_lock(workdir: str) -> RunLock:
  """RunLock([workdir]).claim(): the workdir created and locked for as long as the result lives."""
  return RunLock([workdir]).claim()


def check_writable(target: str, flag: str) -> None:
  """ConfigError (one line naming `flag`) unless `target` is a directory this process can write, or
  could be created: its nearest existing ancestor is a writable directory. Creates nothing."""
  if os.path.exists(target) and not os.path.isdir(target):
    raise ConfigError(f"{flag}={target}: is a file, not a directory; pass a directory")
  existing = os.path.abspath(target)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={target}: cannot be written ({existing} is a file); pass a directory you "
                      "can write to")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ConfigError(f"{flag}={target}: cannot be written ({existing} is read-only for this user); pass "
                      "a directory you can write to")


def write_atomic(file: str, data) -> None:
  """Writes `data` (str or bytes) to `file` through a temporary file beside it and a rename: a kill or a
  full disk leaves the old file or the new one, never half of one."""
  tmp = f"{file}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, file)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


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
  """The JSON records (objects) of a JSON-lines file ([] when there is none). A line that is not one
  (cut short by a kill or a full disk, or damaged) is skipped, and `warn(message)` called when given."""
  records = []
  if os.path.exists(file):
    with open(file, errors="replace") as f:
      for number, line in enumerate(f, 1):
        try:
          record = json.loads(line)
        except ValueError:
          record = None
        if isinstance(record, dict):
          records.append(record)
        elif line.strip() and warn:
          warn(f"{file}:{number}: not a JSON line; skipped")
  return records


def append_jsonl(file: str, record: dict) -> None:
  """Appends one JSON line. After a line cut short by a kill (no newline at the end of the file) the
  record starts a line of its own, so the damage stays one unreadable line that readers skip."""
  with open(file, "ab+") as f:
    f.seek(0, os.SEEK_END)
    cut = False
    if f.tell():
      f.seek(-1, os.SEEK_END)
      cut = f.read(1) != b"\n"
    f.write((("\n" if cut else "") + json.dumps(record) + "\n").encode())


def checkpoint_steps(workdir: str, subdir: str = CHECKPOINTS) -> list:
  """The steps of the complete checkpoints under <workdir>/<subdir>, ascending."""
  directory = path(workdir, subdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


def resume_point(workdirs) -> str:
  """Where a restart of the run writing these directories resumes, in words: "step N (the newest
  checkpoint)" (with members: the newest step all of them have), or "the start (no checkpoint yet)"."""
  newest = [max(checkpoint_steps(w), default=0) for w in workdirs]
  step = min(newest, default=0)
  return f"step {step} (the newest checkpoint)" if step else "the start (no checkpoint yet)"
