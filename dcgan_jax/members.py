"""Many runs in one program (--seeds): which members there are and where each one writes. No JAX here.

    python -m dcgan_jax.main --flagfile=fashion_mnist.flags --seeds=0-3 --workdir=runs/fm4
    runs/fm4/seed_0/ ... runs/fm4/seed_3/      each an ordinary run directory (workdir.py's layout)

Member s is the run of `--seed=s`: its config.json holds seed=s and no --seeds, so `sample`, `evaluate`
and `study` read it unchanged, and it continues alone as a single run
(`--workdir=runs/fm4/seed_3 --seed=3`). The training loop (train.py) runs every member's steps with
the single run's compiled program, one member after the other within each call.
"""

import dataclasses
import os

from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import Config, ConfigError


def member_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, f"seed_{seed}")


def runs(config: Config, workdir: str) -> list:
  """[(config, run directory, name)]: the run itself without --seeds (name ""), else one per seed."""
  seeds = config.member_seeds()
  if not seeds:
    return [(config, workdir, "")]
  return [(dataclasses.replace(config, seed=s, seeds=""), member_dir(workdir, s), f"seed {s}")
          for s in seeds]


def workdirs(config: Config, workdir: str) -> list:
  """The run directories a training run writes: workdir, or its members'."""
  return [w for _, w, _ in runs(config, workdir)]


def common_step(member_runs: list) -> int:
  """The newest step every member has a complete checkpoint of (0: start afresh). A run killed while
  its members were saving one step resumes all of them from the step before, so they stay in step."""
  return min(max(workdir_lib.checkpoint_steps(w), default=0) for _, w, _ in member_runs)


def study_table(workdir: str) -> str:
  """The markdown table of `python -m dcgan_jax.study WORKDIR` over the members (mean ± std per
  configuration)."""
  from dcgan_jax import study  # pylint: disable=g-import-not-at-top
  found = [study.load_run(w) for w in study.find_workdirs([workdir])]
  metrics = study.choose_metrics(found, None)
  return study.format_markdown(study.table_rows(found, metrics), metrics)


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
    raise ConfigError(f"--seeds: {num_members} members need {need / 2**30:.1f} GiB of state and data on "
                      f"each device, more than half its {device_bytes_limit / 2**30:.1f} GiB; pass at most "
                      f"{fit} seeds per run")
