"""Command line: parse flags into a Config and train.

    python -m dcgan_jax.main --flagfile=experiments/mnist.flags --workdir=/tmp/run
    python -m dcgan_jax.main --flagfile=mnist.flags          # bare names are looked up in experiments/

Every flag is a field of dcgan_jax.config.Config (same name); flags given after the flagfile override it.
Errors in the input (unknown values, missing files, data that cannot be had) end the run with one line
on stderr and exit status 2.
"""

import dataclasses
import logging as logging_std
import os
import typing

from absl import app
from absl import flags
from absl import logging

from dcgan_jax.config import Config, exit_with_error

FLAGS = flags.FLAGS
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")

HELP = {
    "dataset": "tfds image dataset name (mnist, fashion_mnist, cifar10, celeb_a, ...).",
    "split": "tfds split to train on.",
    "data_dir": "tfds data directory (default: tfds's own, ~/tensorflow_datasets). See prepare_data.",
    "in_memory": "auto|true|false: keep the dataset on the devices (batches gathered inside the step, "
                 "order a pure function of (seed, step)); auto = when it fits in --max_in_memory_mb.",
    "max_in_memory_mb": "Largest dataset (uint8, at model resolution) that --in_memory=auto keeps on device.",
    "shuffle_buffer": "tf.data shuffle buffer (streaming path only).",
    "preset": "mnist (the seed's Keras model, 28x28) or dcgan (Radford et al. 2015, 32/64/128...).",
    "image_size": "Image side in pixels; default: the preset's (mnist 28, dcgan 64).",
    "channels": "1 or 3; default: the dataset's. Converts grayscale <-> RGB.",
    "latent_dim": "Dimension of the generator's input noise z ~ N(0, I).",
    "base_width": "dcgan preset: feature maps of D's first and G's last hidden layer.",
    "bn_momentum": "BatchNorm running-average momentum, flax convention (running = m*running + "
                   "(1-m)*batch); default: mnist 0.8 (Keras momentum=0.8), dcgan 0.9 (PyTorch's 0.1).",
    "bn_epsilon": "BatchNorm epsilon; default: mnist 1e-3 (Keras), dcgan 1e-5 (PyTorch).",
    "dropout_rate": "Discriminator dropout; default: mnist 0.3 (the seed), dcgan 0.",
    "compute_dtype": "float32, or bfloat16 for mixed precision: convolutions and activations in bfloat16; "
                     "parameters, optimizer states, BatchNorm statistics and losses stay float32.",
    "batch_size": "Global batch size (all devices and hosts together).",
    "num_steps": "Generator updates to train for.",
    "seed": "Seeds initialisation, noise, dropout and data order.",
    "optimizer": "adam (DCGAN paper) or rmsprop (the seed's choice; --beta1 is then RMSprop's decay).",
    "learning_rate_g": "Generator learning rate.",
    "learning_rate_d": "Discriminator learning rate.",
    "beta1": "Adam beta1 (DCGAN paper: 0.5), or RMSprop decay.",
    "beta2": "Adam beta2.",
    "loss": "non_saturating (-log D(G(z)), default) or minimax (log(1 - D(G(z)))) generator loss.",
    "d_steps": "Discriminator updates per generator update.",
    "log_every": "Steps between metric lines (metrics.jsonl, TensorBoard, console).",
    "sample_every": "Steps between sample grids (samples/step_XXXXXXXX.png).",
    "num_samples": "Images in each sample grid (a fixed evaluation noise batch).",
    "sample_bn": "BatchNorm statistics when sampling: running (inference mode, default) or batch.",
    "checkpoint_every": "Steps between checkpoints (<workdir>/checkpoints/<step>); one is also written "
                        "at the end and on SIGTERM/SIGINT. A rerun with the same workdir resumes.",
    "keep_checkpoints": "How many of the newest checkpoints to keep.",
    "steps_per_call": "Training steps per call, one host round trip (for fast accelerators: one "
                      "lax.scan, the same math; on CPU bitwise the same results as single steps). "
                      "Logging, sampling and checkpoints happen after the call that reaches their step.",
    "invariant_groups": "0 (default, fastest) or G > 0: split the global batch into G fixed groups and "
                        "sum gradients and BatchNorm statistics group by group in one fixed order, so the "
                        "run is bitwise identical on every number of devices and processes that divides G "
                        "(slower: see the README, 'Many devices').",
    "g_ema_decay": "Exponential moving average of the generator's weights (e.g. 0.999); 0 = off. When on, "
                   "sample grids, evaluation and the export use the EMA generator (the raw one is logged "
                   "too).",
    "eval_every": "Steps between FID/KID evaluations against the test split (metrics.jsonl, TensorBoard); "
                  "the best checkpoint by FID is kept in <workdir>/best. 0 = off. Needs a labelled dataset.",
    "eval_samples": "Generated images per in-training evaluation.",
    "evaluator_dir": "Cache of the evaluator classifiers (trained once per dataset); default "
                     "~/.cache/dcgan_jax/evaluators.",
}

flags.DEFINE_string("workdir", None, "Directory for config.json, metrics, TensorBoard events and samples.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host: host:port of process 0, e.g. 10.0.0.1:1234 (with --num_processes, "
                    "--process_id). Without them, clusters JAX detects itself (TPU pods, SLURM, Open MPI) "
                    "are joined automatically.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index, 0..num_processes-1.")


def _define_config_flags():
  """One flag per Config field, with the field's default and type."""
  hints = typing.get_type_hints(Config)
  for field in dataclasses.fields(Config):
    kind = hints[field.name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}[kind]
    define(field.name, field.default, HELP[field.name])


_define_config_flags()


def config_from_flags() -> Config:
  return Config(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Config)})



def _resolve_flagfiles(argv):
  """A --flagfile that does not exist as given is looked up in experiments/ (e.g. mnist.flags)."""
  out = []
  for arg in argv:
    if arg.startswith("--flagfile="):
      path = arg.split("=", 1)[1]
      if not os.path.exists(path):
        candidate = os.path.join(EXPERIMENTS_DIR, path)
        if not os.path.exists(candidate):
          exit_with_error(f"--flagfile={path}: file not found (also looked in {EXPERIMENTS_DIR}); "
               f"use one of: {', '.join(sorted(os.listdir(EXPERIMENTS_DIR)))}")
        arg = f"--flagfile={candidate}"
    out.append(arg)
  return out


def parse_flags(argv):
  try:
    return FLAGS(_resolve_flagfiles(argv))
  except flags.Error as e:
    exit_with_error(f"{e}; see --helpfull")


class _QuietLibraries(logging_std.Filter):
  """Keeps orbax's per-save INFO chatter off the console (its warnings and errors still show)."""

  def filter(self, record):
    return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def _init_distributed():
  """jax.distributed.initialize from the flags, or from the cluster's environment when JAX can read it."""
  import jax  # pylint: disable=g-import-not-at-top
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      exit_with_error("--coordinator_address, --num_processes and --process_id go together; pass all three")
    if not 0 <= FLAGS.process_id < FLAGS.num_processes:
      exit_with_error(f"--process_id={FLAGS.process_id}: must be in 0..{FLAGS.num_processes - 1}")
    # Cross-process collectives on CPU need gloo; the setting does nothing on GPU/TPU backends.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("Process %d of %d; %d local devices of %d.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def _cluster_detected() -> bool:
  """A multi-process launch that jax.distributed.initialize() can configure by itself."""
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    exit_with_error(f"unexpected arguments {argv[1:]}; flags look like --name=value")
  if not FLAGS.workdir:
    exit_with_error("--workdir is required; pass a directory for the run's outputs, e.g. --workdir=/tmp/dcgan")
  # Imported after flag parsing so that --help is fast and JAX starts with the final environment.
  from dcgan_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dcgan_jax import ops  # pylint: disable=g-import-not-at-top
  from dcgan_jax import train  # pylint: disable=g-import-not-at-top
  from dcgan_jax.config import ConfigError  # pylint: disable=g-import-not-at-top
  ops.configure_xla_cpu()  # before JAX starts a backend
  try:
    config = config_from_flags().resolved()
    _init_distributed()
    logging.info("Training in %s", FLAGS.workdir)
    train.train_and_evaluate(config, FLAGS.workdir)
  except (ConfigError, input_pipeline.DataUnavailableError, train.TrainingDivergedError) as e:
    exit_with_error(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
