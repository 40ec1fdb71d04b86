"""Every setting of a run, in one frozen dataclass, with validation.

The trainer takes a `Config`, never global flags, so tests and scripts build one directly:

    config = Config(dataset="fashion_mnist", num_steps=100)

`main.py` maps absl flags onto these fields one to one (same names). `validate()` turns every bad value
into a `ConfigError` whose message is one line naming the setting and the fix.
"""

import dataclasses
import json
import sys
from typing import NoReturn, Optional

PRESETS = ("mnist", "dcgan")
LOSSES = ("non_saturating", "minimax")
OPTIMIZERS = ("adam", "rmsprop")
SAMPLE_BN_MODES = ("running", "batch")
IN_MEMORY_MODES = ("auto", "true", "false")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Preset defaults that differ between the seed's Keras model and the DCGAN paper's.
#   mnist: Keras BatchNormalization(momentum=0.8) -> running = 0.8*running + 0.2*batch, epsilon 1e-3.
#   dcgan: PyTorch BatchNorm2d defaults (momentum=0.1 in torch's convention = 0.9 in flax's), epsilon 1e-5.
PRESET_DEFAULTS = {
    "mnist": dict(image_size=28, bn_momentum=0.8, bn_epsilon=1e-3, dropout_rate=0.3),
    "dcgan": dict(image_size=64, bn_momentum=0.9, bn_epsilon=1e-5, dropout_rate=0.0),
}


class ConfigError(ValueError):
  """A setting is invalid. The message is one line: the setting, the problem, the fix."""


def exit_with_error(message: str) -> NoReturn:
  """How the command-line tools end on bad input: `error: <message>` on stderr, exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


@dataclasses.dataclass(frozen=True)
class Config:
  """One run. Field names equal the command-line flag names (see main.py for their help)."""

  # Data.
  dataset: str = "mnist"
  split: str = "train"
  data_dir: Optional[str] = None
  in_memory: str = "auto"  # "auto": keep the dataset on device when it is at most max_in_memory_mb.
  max_in_memory_mb: int = 4096
  shuffle_buffer: int = 10_000  # streaming (tf.data) path only.

  # Model.
  preset: str = "mnist"
  image_size: Optional[int] = None  # None: the preset's default (mnist 28, dcgan 64).
  channels: Optional[int] = None  # None: taken from the dataset.
  latent_dim: int = 100
  base_width: int = 64  # dcgan preset: feature maps of D's first / G's last hidden layer.
  bn_momentum: Optional[float] = None  # None: the preset's default (flax convention).
  bn_epsilon: Optional[float] = None
  dropout_rate: Optional[float] = None  # D's dropout; None: the preset's default.
  compute_dtype: str = "float32"  # "bfloat16": mixed precision (float32 params, optimizer, BN stats, loss).

  # Optimisation.
  batch_size: int = 128  # Global: summed over all devices and hosts.
  num_steps: int = 2000
  seed: int = 0
  optimizer: str = "adam"
  learning_rate_g: float = 2e-4
  learning_rate_d: float = 2e-4
  beta1: float = 0.5
  beta2: float = 0.999
  loss: str = "non_saturating"
  d_steps: int = 1  # Discriminator updates per generator update.
  g_ema_decay: float = 0.0  # Exponential moving average of G's weights; 0 = off.
  steps_per_call: int = 1  # Training steps per call (train.make_steps_call); the same math.
  invariant_groups: int = 0  # > 0: bitwise the same results on any device count dividing it (invariant.py).

  # Outputs.
  log_every: int = 100
  sample_every: int = 500
  num_samples: int = 64  # Images in each sample grid (fixed evaluation noise).
  sample_bn: str = "running"  # BatchNorm statistics used when sampling: "running" or "batch".
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3

  # Evaluation during training (evaluator.py).
  eval_every: int = 0  # Steps between FID/KID evaluations; 0 = off.
  eval_samples: int = 2000  # Generated images per evaluation.
  evaluator_dir: Optional[str] = None  # Cache of trained evaluator networks; None: ~/.cache/dcgan_jax.

  # ---------------------------------------------------------------------------------------------
  def resolved(self) -> "Config":
    """Returns a copy with every preset-dependent `None` filled in, validated."""
    self.validate()
    defaults = PRESET_DEFAULTS[self.preset]
    filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
    return dataclasses.replace(self, **filled)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  def validate(self) -> None:
    """Raises ConfigError (one line) for the first invalid setting."""

    def fail(name, problem, fix):
      raise ConfigError(f"--{name}={getattr(self, name)!r}: {problem}; {fix}.")

    def choice(name, options):
      if getattr(self, name) not in options:
        fail(name, "unknown value", f"use one of {', '.join(options)}")

    def positive(name):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        fail(name, "must be a positive integer", "pass a whole number >= 1")

    choice("preset", PRESETS)
    choice("loss", LOSSES)
    choice("optimizer", OPTIMIZERS)
    choice("sample_bn", SAMPLE_BN_MODES)
    choice("in_memory", IN_MEMORY_MODES)
    choice("compute_dtype", COMPUTE_DTYPES)
    for name in ("batch_size", "num_steps", "latent_dim", "base_width", "d_steps", "log_every",
                 "sample_every", "num_samples", "max_in_memory_mb", "shuffle_buffer", "checkpoint_every",
                 "keep_checkpoints", "steps_per_call"):
      positive(name)
    if not isinstance(self.eval_every, int) or self.eval_every < 0:
      fail("eval_every", "must be >= 0", "pass 0 (off) or a number of steps")
    if not isinstance(self.eval_samples, int) or self.eval_samples < 10:
      fail("eval_samples", "must be >= 10", "pass e.g. 2000 (more samples: less noisy FID)")
    if not isinstance(self.invariant_groups, int) or self.invariant_groups < 0:
      fail("invariant_groups", "must be >= 0", "pass 0 (off) or a number of groups such as 8")
    if self.invariant_groups and self.batch_size % self.invariant_groups:
      fail("invariant_groups", f"must divide --batch_size={self.batch_size}",
           "pick a divisor of the batch size that every device count you use divides, e.g. 8")
    if not 0 <= self.g_ema_decay < 1:
      fail("g_ema_decay", "must be in [0, 1)", "pass 0 (off) or e.g. 0.999")
    if not self.dataset:
      fail("dataset", "is empty", "name a tfds image dataset, e.g. mnist or fashion_mnist")
    for name in ("learning_rate_g", "learning_rate_d"):
      if not getattr(self, name) > 0:
        fail(name, "must be > 0", "pass a positive learning rate such as 2e-4")
    for name in ("beta1", "beta2"):
      if not 0 <= getattr(self, name) < 1:
        fail(name, "must be in [0, 1)", "the DCGAN paper uses beta1=0.5, beta2=0.999")
    if self.bn_momentum is not None and not 0 <= self.bn_momentum < 1:
      fail("bn_momentum", "must be in [0, 1)", "flax convention: running = m*running + (1-m)*batch")
    if self.bn_epsilon is not None and not self.bn_epsilon > 0:
      fail("bn_epsilon", "must be > 0", "pass e.g. 1e-3")
    if self.dropout_rate is not None and not 0 <= self.dropout_rate < 1:
      fail("dropout_rate", "must be in [0, 1)", "pass e.g. 0.3")
    if self.channels is not None and self.channels not in (1, 3):
      fail("channels", "must be 1 or 3", "or leave it unset to take the dataset's")
    if self.image_size is not None:
      size = self.image_size
      if self.preset == "mnist" and size != 28:
        fail("image_size", "the mnist preset (the seed's Keras model) makes 28x28 images only",
             "use --image_size=28, or --preset=dcgan for 32, 64, 128, ...")
      if self.preset == "dcgan" and (size < 32 or size & (size - 1)):
        fail("image_size", "the dcgan preset needs a power of two >= 32",
             "use 32, 64, 128, ... (or --preset=mnist for 28)")
