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
from dcgan_jax.cli import exit_with_error
from dcgan_jax.config import ConfigError

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
  from dcgan_jax.datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  from dcgan_jax import parallel  # pylint: disable=g-import-not-at-top
  from dcgan_jax import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dcgan_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from dcgan_jax import members  # pylint: disable=g-import-not-at-top
  # Where a restart resumes: named by the lines that end a run at once.
  resume_point = lambda: workdir_lib.resume_point(members.workdirs(config_lib.from_flags(), FLAGS.workdir))
  try:
    config = config_lib.from_flags().resolved()
    stopping.install(resume_point)
    parallel.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         FLAGS.heartbeat_timeout)
    stopping.install(process=f"process {jax.process_index()} of {jax.process_count()}")
    logging.info("Training in %s", FLAGS.workdir)
    train.train_and_evaluate(config, FLAGS.workdir)
  except Exception as e:  # pylint: disable=broad-except
    cli.end_run(e, refusals=(ConfigError, input_pipeline.DataUnavailableError, train.TrainingDivergedError),
                write_errors=(checkpoints.CheckpointWriteError,), resume_point=resume_point,
                shared=(train.TrainingDivergedError,))
    raise


if __name__ == "__main__":
  stopping.install()  # first thing: a SIGTERM or Ctrl-C while the run starts is never lost
  cli.run(main, deterministic=lambda: FLAGS.invariant_groups > 0)
