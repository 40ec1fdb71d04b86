"""Every setting of a run, in one frozen dataclass: its default, its help text and its role.

The trainer takes a `Config`, never global flags, so tests and scripts build one directly:

    config = Config(dataset="fashion_mnist", num_steps=100)

Each field declares (dataclass metadata, through `setting`) its help text and its *role*; everything
else derives from that one declaration:
  * the command-line flags of `main` and `benchmark` (`define_flags`: same names, defaults and help);
  * what may change when a run is resumed (`resume_differences`: only roles other than COMPUTATION);
  * how `study` groups runs into configurations (`STUDY_IGNORED`: the seed and the OUTPUT settings).

`validate()` turns every bad value into a `ConfigError` whose message is one line naming the setting
and the fix. This module imports no JAX.
"""

import dataclasses
import typing
from typing import Iterable, Optional

PRESETS = ("mnist", "dcgan")
LOSSES = ("non_saturating", "minimax", "least_squares", "hinge", "wasserstein")  # losses.py
OPTIMIZERS = ("adam", "rmsprop")
SAMPLE_BN_MODES = ("running", "batch")
IN_MEMORY_MODES = ("auto", "true", "false")
COMPUTE_DTYPES = ("float32", "bfloat16")
EVAL_FEATURES = ("evaluator", "inception")
MEMBERS_FORMS = ("auto", "dispatch", "vmap")
D_NORMS = ("none", "batch", "layer", "spectral")
# Settings --sweep may vary between the members of one program: scalars of the optimizers and the EMA.
# Everything else (shapes, the model, the loss, the batch) is one program's, shared by all members.
SWEEPABLE = ("learning_rate_g", "learning_rate_d", "beta1", "beta2", "g_ema_decay", "g_ema_rampup")

# Roles of a setting.
COMPUTATION = "computation"  # changes what a training step computes: a resumed run must keep it
OUTCOME = "outcome"  # changes what a run reports (its length, its scores), not its steps
OUTPUT = "output"  # where and how often a run writes: changes neither its steps nor its scores

# Preset defaults that differ between the seed's Keras model and the DCGAN paper's.
#   mnist: Keras BatchNormalization(momentum=0.8) -> running = 0.8*running + 0.2*batch, epsilon 1e-3.
#   dcgan: PyTorch BatchNorm2d defaults (momentum=0.1 in torch's convention = 0.9 in flax's), epsilon 1e-5.
PRESET_DEFAULTS = {
    "mnist": dict(image_size=28, bn_momentum=0.8, bn_epsilon=1e-3, dropout_rate=0.3, d_norm="none"),
    "dcgan": dict(image_size=64, bn_momentum=0.9, bn_epsilon=1e-5, dropout_rate=0.0, d_norm="batch"),
}


class ConfigError(ValueError):
  """A setting is invalid. The message is one line: the setting, the problem, the fix."""


INT_MAX = 2**31 - 1  # steps, seeds and intervals: int32 on the devices


def setting(default, help: str, role: str = COMPUTATION, bounds=None):  # pylint: disable=redefined-builtin
  """A Config field with its help text, its role (COMPUTATION, OUTCOME or OUTPUT) and, for a number,
  the closed interval (low, high) of values it accepts: every number has both bounds, so a value that
  would need gigabytes (or wrap around) is refused before any work. The bounds end its help text."""
  if bounds:
    help = f"{help} [{bounds[0]:,}..{bounds[1]:,}]"  # pylint: disable=redefined-builtin
  return dataclasses.field(default=default, metadata=dict(help=help, role=role, bounds=bounds))


@dataclasses.dataclass(frozen=True)
class Config:
  """One run. Field names are the command-line flag names."""

  # Data.
  dataset: str = setting("mnist", "tfds image dataset name (mnist, fashion_mnist, cifar10, celeb_a, ...).")
  split: str = setting("train", "tfds split to train on.")
  data_dir: Optional[str] = setting(
      None, "tfds data directory (default: tfds's own, ~/tensorflow_datasets). See prepare_data.", OUTPUT)
  in_memory: str = setting(
      "auto", "auto|true|false: keep the dataset on the devices (batches gathered inside the step), or "
      "read it by index on the host (array_record datasets; the same order, a pure function of (seed, "
      "step)); auto = on the devices when the decoded split fits in --max_in_memory_mb.", OUTCOME)
  max_in_memory_mb: int = setting(
      4096, "Largest dataset (uint8, at model resolution) that --in_memory=auto keeps on device.", OUTCOME,
      bounds=(1, 2**24))
  shuffle_buffer: int = setting(10_000, "tf.data shuffle buffer (streaming path only).", OUTCOME,
                                bounds=(1, 10**8))

  # Model.
  preset: str = setting("mnist", "mnist (the seed's Keras model, 28x28) or dcgan (Radford et al. 2015, "
                        "32/64/128...).")
  image_size: Optional[int] = setting(None, "Image side in pixels; default: the preset's (mnist 28, dcgan 64).",
                                      bounds=(1, 1024))
  channels: Optional[int] = setting(None, "1 or 3; default: the dataset's. Converts grayscale <-> RGB.",
                                    bounds=(1, 3))
  latent_dim: int = setting(100, "Dimension of the generator's input noise z ~ N(0, I).", bounds=(1, 4096))
  base_width: int = setting(64, "dcgan preset: feature maps of D's first and G's last hidden layer.",
                            bounds=(1, 1024))
  bn_momentum: Optional[float] = setting(
      None, "BatchNorm running-average momentum, flax convention (running = m*running + (1-m)*batch); "
      "default: mnist 0.8 (Keras momentum=0.8), dcgan 0.9 (PyTorch's 0.1).", bounds=(0, 1))
  bn_epsilon: Optional[float] = setting(None, "BatchNorm epsilon; default: mnist 1e-3 (Keras), dcgan 1e-5 "
                                        "(PyTorch).", bounds=(0, 1))
  dropout_rate: Optional[float] = setting(None, "Discriminator dropout; default: mnist 0.3 (the seed), dcgan 0.",
                                          bounds=(0, 1))
  d_norm: Optional[str] = setting(
      None, "Discriminator normalisation: batch, layer or none after every hidden layer but the first, or "
      "spectral (Miyato et al. 2018: every weight over its largest singular value); default: the "
      "preset's (mnist none, as the seed; dcgan batch, as the paper).")
  compute_dtype: str = setting(
      "float32", "float32, or bfloat16 for mixed precision: convolutions and activations in bfloat16; "
      "parameters, optimizer states, BatchNorm statistics and losses stay float32.")

  # Optimisation.
  batch_size: int = setting(128, "Global batch size (all devices and hosts together).", bounds=(1, 2**20))
  num_steps: int = setting(2000, "Generator updates to train for.", OUTCOME, bounds=(1, INT_MAX))
  seed: int = setting(0, "Seeds initialisation, noise, dropout and data order.", bounds=(0, INT_MAX))
  seeds: str = setting(
      "", "Many runs in one program, one member per seed, e.g. 0,1,2,3 or 0-15: member s is the run of "
      "--seed=s, written to its own run directory <workdir>/seed_<s>. Empty: one run (--seed).", OUTPUT)
  sweep: str = setting(
      "", "Scalar settings that differ between members, e.g. 'learning_rate_d:1e-4,2e-4;beta1:0,0.5' "
      "(settings separated by ';'): one member per combination of their values and seed (--seeds, else "
      "--seed), in <workdir>/<setting>=<value>_..._seed_<s>. May vary: " + ", ".join(SWEEPABLE) + ".",
      OUTPUT)
  members_form: str = setting(
      "auto", "How members (--seeds) run: dispatch (each member's step is the single run's compiled "
      "program, one member after the other: bitwise the single runs), vmap (one program over a leading "
      "member axis of the state: the same math, other rounding; in-memory data, no --sweep), or auto "
      "(the platform's measured choice: docs/performance.md).", OUTCOME)
  optimizer: str = setting("adam", "adam (DCGAN paper) or rmsprop (the seed's choice; --beta1 is then "
                           "RMSprop's decay).")
  # Learning rates up to what float32 holds (huge ones are how the tests make a run diverge).
  learning_rate_g: float = setting(2e-4, "Generator learning rate.", bounds=(0, 1e38))
  learning_rate_d: float = setting(2e-4, "Discriminator learning rate.", bounds=(0, 1e38))
  beta1: float = setting(0.5, "Adam beta1 (DCGAN paper: 0.5), or RMSprop decay.", bounds=(0, 1))
  beta2: float = setting(0.999, "Adam beta2.", bounds=(0, 1))
  loss: str = setting(
      "non_saturating", "The GAN loss (losses.py): non_saturating (default: G minimises -log D(G(z))), "
      "minimax (log(1 - D(G(z)))), least_squares (LSGAN), hinge, or wasserstein (needs --gp_weight or "
      "--d_norm=spectral).")
  gp_weight: float = setting(
      0.0, "Gradient penalty (WGAN-GP, Gulrajani et al. 2017): weight of E[(||grad D(x_hat)||-1)^2] on "
      "random interpolates of real and fake images, e.g. 10; 0 = off.", bounds=(0, 10**6))
  r1_weight: float = setting(
      0.0, "R1 penalty (Mescheder et al. 2018): weight gamma of E[||grad D(x)||^2]/2 on real images, e.g. "
      "10 (or 0.1 for small models); 0 = off.", bounds=(0, 10**6))
  r1_every: int = setting(
      1, "Lazy R1 (StyleGAN2): the R1 penalty on every k-th discriminator update only, weighted by k; "
      "1 = every update.", bounds=(1, 10**6))
  d_steps: int = setting(1, "Discriminator updates per generator update.", bounds=(1, 100))
  g_ema_decay: float = setting(
      0.0, "Exponential moving average of the generator's weights (e.g. 0.999); 0 = off. When on, sample "
      "grids, evaluation and the export use the EMA generator (the raw one is logged too).", bounds=(0, 1))
  g_ema_rampup: float = setting(
      0.0, "The EMA's warm-up. 0: its decay after n G updates is min(decay, (1 + n) / (10 + n)) (that of "
      "tf.train.ExponentialMovingAverage: it averages roughly the last 11% of the updates). r > 0: "
      "StyleGAN2's ramp-up: the average's half-life is at most r * n updates, i.e. the decay is "
      "min(decay, 0.5 ** (1 / (r * n))) (StyleGAN2: 0.05).", bounds=(0, 1))
  steps_per_call: int = setting(
      1, "Training steps per call, one host round trip (for fast accelerators: one lax.scan, the same "
      "math; on CPU bitwise the same results as single steps). Logging, sampling and checkpoints happen "
      "after the call that reaches their step.", OUTCOME, bounds=(1, 10**5))
  invariant_groups: int = setting(
      0, "0 (default, fastest) or G > 0: split the global batch into G fixed groups and sum gradients and "
      "BatchNorm statistics group by group in one fixed order, so the run is bitwise identical on every "
      "number of devices and processes D with 2D dividing G (slower: docs/reproducibility.md).",
      bounds=(0, 2**20))

  # Outputs.
  log_every: int = setting(100, "Steps between metric lines (metrics.jsonl, TensorBoard, console).", OUTPUT,
                           bounds=(1, INT_MAX))
  sample_every: int = setting(500, "Steps between sample grids (samples/step_XXXXXXXX.png).", OUTPUT,
                              bounds=(1, INT_MAX))
  num_samples: int = setting(64, "Images in each sample grid (a fixed evaluation noise batch).", OUTPUT,
                             bounds=(1, 10**4))
  sample_bn: str = setting("running", "BatchNorm statistics when sampling and evaluating: running "
                           "(inference mode, default) or batch.", OUTCOME)
  checkpoint_every: int = setting(
      1000, "Steps between checkpoints (<workdir>/checkpoints/<step>); one is also written at the end and "
      "on SIGTERM/SIGINT. A rerun with the same workdir resumes.", OUTPUT, bounds=(1, INT_MAX))
  keep_checkpoints: int = setting(3, "How many of the newest checkpoints to keep.", OUTPUT, bounds=(1, 10**4))

  # Evaluation during training (evaluator.py).
  eval_every: int = setting(
      0, "Steps between FID/KID evaluations against the test split (metrics.jsonl, TensorBoard); the best "
      "checkpoint by FID is kept in <workdir>/best. 0 = off. Needs a labelled dataset.", OUTPUT,
      bounds=(0, INT_MAX))
  eval_samples: int = setting(2000, "Generated images per in-training evaluation.", OUTCOME,
                              bounds=(10, 2 * 10**5))
  evaluator_dir: Optional[str] = setting(
      None, "Cache of the evaluator classifiers (trained once per dataset); default "
      "~/.cache/dcgan_jax/evaluators.", OUTPUT)
  eval_features: str = setting(
      "evaluator", "Features of the in-training FID/KID (and of the choice of best/): evaluator (the "
      "library's own offline network, vs the test split) or inception (pytorch-fid's, vs the train "
      "split, as papers; needs --inception_weights or a cached copy; adds the Inception Score).", OUTCOME)
  inception_weights: Optional[str] = setting(
      None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: the copy in --inception_dir, "
      "downloaded there once when online).", OUTPUT)
  inception_dir: Optional[str] = setting(
      None, "Cache of the Inception weights and the datasets' reference features; default "
      "~/.cache/dcgan_jax/inception.", OUTPUT)

  # ---------------------------------------------------------------------------------------------
  def image_shape(self, channels: int) -> tuple:
    """(H, W, C): the models' image shape for a dataset of `channels` channels (a resolved config)."""
    return (self.image_size, self.image_size, channels)

  def member_seeds(self) -> list:
    """--seeds as a list of ints in the order given ([] when empty). ConfigError for bad syntax,
    negative or repeated seeds."""
    seeds = []
    for part in filter(None, (p.strip() for p in self.seeds.split(","))):
      try:
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
      except ValueError:
        raise ConfigError(f"--seeds={self.seeds!r}: {part!r} is not a seed or a range; pass e.g. 0,1,2 "
                          "or 0-15") from None
      if low < 0 or high < low:
        raise ConfigError(f"--seeds={self.seeds!r}: {part!r} is not an ascending range of seeds >= 0; "
                          "pass e.g. 0-15")
      seeds += range(low, high + 1)
    if len(set(seeds)) != len(seeds):
      raise ConfigError(f"--seeds={self.seeds!r}: a seed appears twice; list each seed once")
    return seeds

  def sweep_values(self) -> list:
    """--sweep as [(setting, [float values])] in the order given ([] when empty). ConfigError for bad
    syntax, a setting that cannot vary between members, or a repeated setting or value."""
    def fail(problem):
      raise ConfigError(f"--sweep={self.sweep!r}: {problem}")
    out = []
    for part in filter(None, (p.strip() for p in self.sweep.split(";"))):
      name, colon, values = (x.strip() for x in part.partition(":"))
      if not colon or not values:
        fail(f"{part!r} is not setting:value,value; pass e.g. learning_rate_d:1e-4,2e-4")
      if name not in SWEEPABLE:
        known = "is not a setting" if name not in FIELDS else "cannot differ between members of one program"
        fail(f"{name} {known}; vary one of {', '.join(SWEEPABLE)} (others: separate runs)")
      if name in dict(out):
        fail(f"{name} appears twice; list all its values after one {name}:")
      try:
        numbers = [float(v) for v in values.split(",")]
      except ValueError:
        fail(f"{values!r} is not a list of numbers; pass e.g. {name}:1e-4,2e-4")
      if len(set(numbers)) != len(numbers):
        fail(f"a value of {name} appears twice; list each value once")
      out.append((name, numbers))
    return out

  def resolved(self) -> "Config":
    """Returns a copy with every preset-dependent `None` filled in, validated."""
    self.validate()
    defaults = PRESET_DEFAULTS[self.preset]
    filled = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}
    return dataclasses.replace(self, **filled)

  def validate(self) -> None:
    """Raises ConfigError (one line) for the first invalid setting."""

    def fail(name, problem, fix):
      raise ConfigError(f"--{name}={getattr(self, name)!r}: {problem}; {fix}.")

    def choice(name, options):
      if getattr(self, name) not in options:
        fail(name, "unknown value", f"use one of {', '.join(options)}")

    def within(name, bounds):
      v = getattr(self, name)
      if bounds is None or v is None:
        return
      whole = FIELDS[name].type in (int, Optional[int])
      number = isinstance(v, int) if whole else isinstance(v, (int, float))
      if not number or isinstance(v, bool) or not bounds[0] <= v <= bounds[1]:
        default = FIELDS[name].default
        fail(name, f"must be {'a whole number' if whole else 'a number'} in [{bounds[0]:,}, {bounds[1]:,}]",
             "pass a value in that range" + (f" (the default is {default})" if default is not None else ""))

    self.member_seeds()
    for name, values in self.sweep_values():
      for value in values:
        try:
          dataclasses.replace(self, sweep="", **{name: value}).validate()
        except ConfigError as e:
          raise ConfigError(f"--sweep={self.sweep!r}: {e}") from None
    choice("preset", PRESETS)
    choice("loss", LOSSES)
    choice("optimizer", OPTIMIZERS)
    choice("sample_bn", SAMPLE_BN_MODES)
    choice("in_memory", IN_MEMORY_MODES)
    choice("compute_dtype", COMPUTE_DTYPES)
    choice("members_form", MEMBERS_FORMS)
    choice("eval_features", EVAL_FEATURES)
    if self.d_norm is not None:
      choice("d_norm", D_NORMS)
      if self.invariant_groups and self.d_norm in ("layer", "spectral"):
        fail("d_norm", "is not supported with --invariant_groups (its layers sum only convolution and "
             "BatchNorm gradients in the fixed order)", "use --d_norm=batch or none, or drop --invariant_groups")
    if self.members_form == "vmap" and self.sweep:
      fail("members_form", "stacks members that share one program, and --sweep members each have their "
           "own", "use --members_form=dispatch (or auto) with --sweep")
    for name in ("batch_size", "invariant_groups", "eval_samples"):  # used by the checks below
      within(name, FIELDS[name].metadata["bounds"])
    if self.invariant_groups and self.batch_size % self.invariant_groups:
      fail("invariant_groups", f"must divide --batch_size={self.batch_size}",
           "pick a divisor of the batch size that every device count you use divides, e.g. 8")
    for name in ("gp_weight", "r1_weight"):
      if not getattr(self, name) >= 0:
        fail(name, "must be >= 0", "pass 0 (off) or a weight such as 10")
    if self.loss == "wasserstein" and not self.gp_weight and self.d_norm != "spectral":
      fail("loss", "needs a Lipschitz-constrained discriminator", "add --gp_weight=10 (WGAN-GP) or "
           "--d_norm=spectral")
    if self.invariant_groups and (self.gp_weight or self.r1_weight):
      fail("invariant_groups", "does not support gradient penalties (the grouped layers' exact gradients "
           "are not differentiated twice)", "drop --gp_weight/--r1_weight or --invariant_groups")
    if not 0 <= self.g_ema_decay < 1:
      fail("g_ema_decay", "must be in [0, 1)", "pass 0 (off) or e.g. 0.999")
    if not 0 <= self.g_ema_rampup <= 1:
      fail("g_ema_rampup", "must be in [0, 1]", "pass 0 (the default warm-up) or e.g. 0.05 (StyleGAN2)")
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
        fail("image_size", "the dcgan preset needs a power of two in [32, 1024]",
             "use 32, 64, 128, ... (or --preset=mnist for 28)")
    for name, field in FIELDS.items():  # the rest: every number within its bounds
      within(name, field.metadata["bounds"])


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def names_with_role(*roles: str) -> frozenset:
  return frozenset(name for name, f in FIELDS.items() if f.metadata["role"] in roles)


# Settings a resumed run may change: they steer the run without changing what a step computes.
RESUMABLE_CHANGES = names_with_role(OUTCOME, OUTPUT)
# Settings `study` leaves out of a configuration: the seed (what a study replicates over) and those
# that change neither the trained networks nor their scores.
STUDY_IGNORED = frozenset({"seed"}) | names_with_role(OUTPUT)


def from_dict(values: dict) -> Config:
  """A Config from a saved dict (config.json, a checkpoint): keys this version does not know are
  dropped, missing ones take their defaults (what the code that wrote it did)."""
  return Config(**{k: v for k, v in values.items() if k in FIELDS})


def resume_differences(saved: dict, config: Config) -> list:
  """'name: saved -> now' for every setting a resumed run may not change (COMPUTATION) that differs."""
  def with_preset_defaults(values):  # e.g. a setting newer than the saved run: what its preset gives
    preset = PRESET_DEFAULTS.get(values.get("preset"), {})
    return {**values, **{k: v for k, v in preset.items() if values.get(k) is None}}
  now = with_preset_defaults(dataclasses.asdict(config))
  saved = with_preset_defaults({**{name: f.default for name, f in FIELDS.items()}, **saved})
  return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(now) | set(saved))
          if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k)]


def define_flags(names: Optional[Iterable[str]] = None, flag_values=None) -> None:
  """One absl flag per Config field (or per field in `names`), with the field's type, default and help
  text, in `flag_values` (default: absl's global FLAGS)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  hints = typing.get_type_hints(Config)
  for name in (names or FIELDS):
    kind = hints[name]
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float}[kind]
    define(name, FIELDS[name].default, FIELDS[name].metadata["help"],
           flag_values=flags.FLAGS if flag_values is None else flag_values)


def from_flags(names: Optional[Iterable[str]] = None, flag_values=None, **fixed) -> Config:
  """The Config of the parsed flags defined by define_flags(names), plus `fixed` fields."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  values = flags.FLAGS if flag_values is None else flag_values
  return Config(**{name: values[name].value for name in (names or FIELDS)}, **fixed)
