"""Many runs in one program (--seeds, --sweep): which members there are and where each one writes.
No JAX here.

    python -m dcgan_jax.main --flagfile=fashion_mnist.flags --seeds=0-3 --workdir=runs/fm4
    runs/fm4/seed_0/ ... runs/fm4/seed_3/      each an ordinary run directory (workdir.py's layout)
    ... --seeds=0-2 --sweep='learning_rate_d:1e-4,2e-4' --workdir=runs/lr
    runs/lr/learning_rate_d=0.0001_seed_0/ ... runs/lr/learning_rate_d=0.0002_seed_2/    (6 members)

Member s is the run of `--seed=s`: its config.json holds seed=s and no --seeds, so `sample`, `evaluate`
and `study` read it unchanged, and it continues alone as a single run
(`--workdir=runs/fm4/seed_3 --seed=3`). The training loop (train.py) runs every member's steps with
the single run's compiled program, one member after the other within each call.
"""

import dataclasses
import itertools
import os
from typing import Optional

from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import Config, ConfigError


def member_dir(workdir: str, seed: int, values: tuple = ()) -> str:
  """<workdir>/seed_<s>, or with swept values <workdir>/<setting>=<value>_..._seed_<s>."""
  return os.path.join(workdir, "_".join([f"{n}={v!r}" for n, v in values] + [f"seed_{seed}"]))


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a training program: its own settings (one seed, no --seeds or --sweep), the directory
  it writes (workdir.py's layout) and its name in log lines ("" for a program of one run)."""
  config: Config
  directory: str
  name: str = ""


def runs(config: Config, workdir: str) -> list:
  """[Run]: the run itself without --seeds or --sweep (a group of one, named ""), else one member per
  combination of swept values (in --sweep's order) and seed."""
  seeds, sweep = config.member_seeds(), config.sweep_values()
  if not seeds and not sweep:
    return [Run(config, workdir)]
  out = []
  for values in itertools.product(*[[(name, v) for v in vs] for name, vs in sweep]):
    for s in seeds or [config.seed]:
      member = dataclasses.replace(config, seed=s, seeds="", sweep="", **dict(values))
      name = " ".join([f"{n}={v!r}" for n, v in values] + [f"seed {s}"])
      out.append(Run(member, member_dir(workdir, s, values), name))
  return out


def workdirs(config: Config, workdir: str) -> list:
  """The run directories a training run writes: workdir, or its members'."""
  return [run.directory for run in runs(config, workdir)]


def common_step(member_runs: list) -> Optional[int]:
  """The newest step every member has a complete checkpoint of (0: start afresh). A run killed while
  its members were saving one step resumes all of them from the step before, so they stay in step.
  None for a group of one: its newest readable checkpoint, whichever it is.

  ConfigError when some members have checkpoints and another was never started (a seed or a value
  added to a run's command): starting all afresh would overwrite the others' results."""
  if len(member_runs) == 1:
    return None
  newest = {run.directory: max(workdir_lib.checkpoint_steps(run.directory), default=0) for run in member_runs}
  new = [w for w in newest if not workdir_lib.has_config(w)]
  if new and max(newest.values()) > 0:
    raise ConfigError(f"{new[0]}: a new member of a run whose other members are at step "
                      f"{max(newest.values())}; train new seeds or values in another --workdir (or "
                      "remove them from --seeds/--sweep)")
  return min(newest.values())


def study_table(workdir: str) -> str:
  """The markdown table of `python -m dcgan_jax.study WORKDIR` over the members (mean ± std per
  configuration)."""
  from dcgan_jax.studies import study_table as table  # pylint: disable=g-import-not-at-top
  found = [table.load_run(w) for w in table.find_workdirs([workdir])]
  metrics = table.choose_metrics(found, None)
  return table.format_markdown(table.table_rows(found, metrics), metrics)


def check_memory(num_members: int, state_bytes: int, device_bytes_limit, data_bytes: int = 0) -> None:
  """ConfigError, before any member is made, when the members' states (each held whole on every device:
  parameters, optimizer moments, BatchNorm statistics, EMA) and the in-memory dataset take more than
  half the device's memory (the other half: one member's step at a time, its activations and
  gradients, and XLA's workspace). device_bytes_limit None (the CPU backend reports none): no check."""
  if not device_bytes_limit or num_members < 2:
    return
  need = num_members * state_bytes + data_bytes
  if need > device_bytes_limit / 2:
    fit = max(1, int((device_bytes_limit / 2 - data_bytes) // state_bytes))
    raise ConfigError(f"--seeds/--sweep: {num_members} members need {need / 2**30:.1f} GiB of state and "
                      f"data on each device, more than half its {device_bytes_limit / 2**30:.1f} GiB; run at "
                      f"most {fit} members (seeds times swept values) per run")
