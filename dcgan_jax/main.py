"""Command line: parse flags into a Config and train.

    python -m dcgan_jax.main --flagfile=fashion_mnist.flags --data_dir=data/tfds
    python -m dcgan_jax.main --flagfile=mnist.flags --batch_size=256 --seed=3   # later flags override
    python -m dcgan_jax.main --helpfull                                          # every flag, documented

Every Config field is a flag of the same name (config.py holds their help texts). Errors in the input
(unknown values, missing files, data that cannot be had, a diverging run) end the run with one line on
stderr and exit status 2.
"""

import os

from absl import flags
from absl import logging

from dcgan_jax import cli
from dcgan_jax import config as config_lib
from dcgan_jax import stopping
from dcgan_jax.config import ConfigError
from dcgan_jax.cli import exit_with_error

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, TensorBoard events, samples and "
                    "checkpoints (docs/training.md). Rerunning with the same workdir resumes.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0, e.g. 10.0.0.1:1234 (with --num_processes, "
                    "--process_id). Without them, clusters JAX detects itself (TPU pods, SLURM, Open MPI) "
                    "are joined automatically.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                     lower_bound=1, upper_bound=10**5)
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.",
                     lower_bound=0, upper_bound=10**5)
flags.DEFINE_integer("heartbeat_timeout", 100, "Multi-host: seconds without a heartbeat after which a "
                     "process counts as lost and the others exit (non-zero); resume from the last "
                     "checkpoint. Bounds how long survivors wait for a dead process.",
                     lower_bound=1, upper_bound=86400)
config_lib.define_flags()


def main(argv):
  del argv
  if not FLAGS.workdir:
    exit_with_error("--workdir is required; pass a directory for the run's outputs, e.g. --workdir=/tmp/dcgan")
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    exit_with_error(f"--workdir={FLAGS.workdir}: is a file, not a directory; pass a directory (new or a "
                    "run's) for the run's outputs")
  # Imported here so that --help is fast and JAX starts after cli.run's setup.
  from dcgan_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from dcgan_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dcgan_jax import parallel  # pylint: disable=g-import-not-at-top
  from dcgan_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    config = config_lib.from_flags().resolved()
    from dcgan_jax import members  # pylint: disable=g-import-not-at-top
    stopping.install(lambda: workdir_lib.resume_point(members.workdirs(config, FLAGS.workdir)))
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.heartbeat_timeout)
    stopping.install(process=f"process {jax.process_index()} of {jax.process_count()}")
    logging.info("Training in %s", FLAGS.workdir)
    train.train_and_evaluate(config, FLAGS.workdir)
  except (ConfigError, input_pipeline.DataUnavailableError, train.TrainingDivergedError) as e:
    if jax.process_count() > 1:
      # At once: a normal exit waits in jax.distributed's shutdown barrier for the other processes,
      # which may be waiting for this one in a collective (an error only this process saw).
      _end_now(str(e), 2)
    exit_with_error(str(e))
  except checkpoints.CheckpointWriteError as e:
    # At once: orbax's writer threads would add a traceback each while the interpreter shuts down.
    _end_now(str(e), 2)
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1 or not isinstance(e, jax.errors.JaxRuntimeError):
      raise
    _lost_a_process(e)


def _lost_a_process(error: Exception) -> None:
  """A collective failed in a multi-process run: another process died (killed, preempted, crashed).
  One line naming what failed and where the run resumes, then exit 3 at once: JAX's own shutdown would
  wait for the lost process and abort with a stack trace."""
  import jax  # pylint: disable=g-import-not-at-top
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from dcgan_jax import members  # pylint: disable=g-import-not-at-top
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  workdirs = members.workdirs(config_lib.from_flags(), FLAGS.workdir)
  _end_now(f"process {jax.process_index()} of {jax.process_count()}: lost another process of the run "
           f"({first[:200]}); start all processes again to resume from "
           + workdir_lib.resume_point(workdirs), 3)


_end_now = stopping.end_now


if __name__ == "__main__":
  stopping.install()  # first thing: a SIGTERM or Ctrl-C while the run starts is never lost
  cli.run(main, deterministic=lambda: FLAGS.invariant_groups > 0)
