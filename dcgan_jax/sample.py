"""Command line: images from a trained generator. No TensorFlow needed.

    python -m dcgan_jax.sample --workdir=W --num=64 --out=grid.png      # a sample grid
    python -m dcgan_jax.sample --workdir=W --num=10000 --out=s.npy      # float32 (N, H, W, C) in [-1, 1]
    python -m dcgan_jax.sample --workdir=W --interpolate --num=8 --out=walk.png   # + walk.gif

The generator is the workdir's newest checkpoint (--step=N for another, --best for the best by FID), or
its generator export (<workdir>/generator) when it has no checkpoints; --workdir may also be the export
directory itself. With an EMA generator (--g_ema_decay at training) the EMA weights are used unless
--use_ema=false. The noise is the run's fixed evaluation noise (the same z as the run's sample grids)
unless --seed is given.

--interpolate: each of --num rows walks in a straight line through latent space between two random
points, in --interpolation_steps images (the DCGAN paper's figure 4); the animated GIF shows all rows
walking together, forth and back.
"""

import os

from absl import flags
import numpy as np

from dcgan_jax import cli
from dcgan_jax import sampling
from dcgan_jax import workdir as workdir_lib
from dcgan_jax import writers
from dcgan_jax.config import ConfigError
from dcgan_jax.cli import exit_with_error


def define_flags():
  """The command line's flags; defined only when run as a program, so that importing this module
  (as a library) defines none."""
  flags.DEFINE_string("workdir", None, "A training run's --workdir, or a generator export directory.")
  flags.DEFINE_string("out", None, "Output file: .png (a grid) or .npy (float32 (N, H, W, C) in [-1, 1]).")
  flags.DEFINE_integer("num", 64, "Number of images (with --interpolate: number of rows).",
                       lower_bound=1, upper_bound=10**4)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest; 0: the untrained "
                       "generator).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_bool("best", False, "Use the best checkpoint by FID (runs with --eval_every).")
  flags.DEFINE_integer("seed", None, "Noise seed (default: the run's, i.e. its sample grids' noise).",
                       lower_bound=0, upper_bound=2**31 - 1)
  flags.DEFINE_bool("use_ema", True, "Use the EMA generator when the run has one.")
  flags.DEFINE_enum("sample_bn", None, ["running", "batch"], "BatchNorm statistics (default: the run's).")
  flags.DEFINE_bool("interpolate", False, "Write a latent interpolation grid (and a GIF beside it).")
  flags.DEFINE_integer("interpolation_steps", 10, "Images per interpolation row.",
                       lower_bound=2, upper_bound=1000)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  for name in ("workdir", "out"):
    if not FLAGS[name].value:
      exit_with_error(f"--{name} is required")
  ext = os.path.splitext(FLAGS.out)[1].lower()
  if ext not in (".png", ".npy"):
    exit_with_error(f"--out={FLAGS.out}: unknown file type {ext!r}; use .png (a grid) or .npy (an array)")
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  try:
    workdir_lib.check_writable(out_dir, "--out")
    sample, config, step, used_ema = sampling.load(FLAGS.workdir, FLAGS.step, FLAGS.best, FLAGS.use_ema,
                                          FLAGS.sample_bn)
  except (ConfigError, FileNotFoundError) as e:
    exit_with_error(str(e))
  os.makedirs(out_dir, exist_ok=True)
  if FLAGS.interpolate:
    z = sampling.interpolation_latents(config, FLAGS.num, FLAGS.interpolation_steps, FLAGS.seed)
    images = sample(z.reshape(-1, config.latent_dim))
    images = images.reshape(z.shape[:2] + images.shape[1:])  # (rows, steps, H, W, C)
    if ext == ".npy":
      _save_npy(images, FLAGS.out)
    else:
      writers.save_png(writers.image_grid(images.reshape((-1,) + images.shape[2:]),
                                          columns=FLAGS.interpolation_steps), FLAGS.out)
      gif = os.path.splitext(FLAGS.out)[0] + ".gif"
      frames = [writers.image_grid(images[:, t]) for t in range(images.shape[1])]
      writers.save_gif(frames + frames[-2:0:-1], gif, frame_ms=120, last_frame_ms=120)
      print(f"wrote {gif}")
  else:
    images = sample(sampling.latents(config, FLAGS.num, FLAGS.seed))
    if ext == ".npy":
      _save_npy(images.astype(np.float32), FLAGS.out)
    else:
      writers.save_png(writers.image_grid(images), FLAGS.out)
  print(f"wrote {FLAGS.out}: {images.shape} from step {step}{' (EMA generator)' if used_ema else ''}")


def _save_npy(array: np.ndarray, path: str) -> None:
  """np.save, whole or not at all."""
  import io  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  np.save(buffer, array)
  workdir_lib.write_atomic(path, buffer.getvalue())


if __name__ == "__main__":
  define_flags()
  cli.run(main)
