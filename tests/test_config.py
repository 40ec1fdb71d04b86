"""Config: one declaration per setting, and everything derived from it (flags, resume, study)."""
import dataclasses
import os

from absl import flags
import pytest

from dcgan_jax import cli
from dcgan_jax import config as config_lib
from dcgan_jax.config import COMPUTATION, OUTCOME, OUTPUT, Config, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_setting_declares_help_and_role_and_becomes_a_flag_with_them():
  """Each Config field has a help text and a role, and define_flags makes a flag of the same name,
  default and help. Catches a field added without help or role, or flags that drift from the fields."""
  values = flags.FlagValues()
  config_lib.define_flags(flag_values=values)
  for field in dataclasses.fields(Config):
    assert field.metadata["help"] and field.metadata["role"] in (COMPUTATION, OUTCOME, OUTPUT), field.name
    assert values[field.name].default == field.default and values[field.name].help == field.metadata["help"]
  values(["prog", "--latent_dim=64", "--g_ema_decay=0.99", "--data_dir=/d"])
  config = config_lib.from_flags(flag_values=values)
  assert (config.latent_dim, config.g_ema_decay, config.data_dir) == (64, 0.99, "/d")


def test_resume_refuses_exactly_the_settings_that_change_a_step():
  """A resumed run may change OUTCOME and OUTPUT settings only. Catches a computation setting (model,
  optimizer, seed, batch) accepted on resume, or a harmless one (num_steps, logging) refused."""
  saved = dataclasses.asdict(Config())
  now = Config(num_steps=10, log_every=7, data_dir="/elsewhere", steps_per_call=4, eval_every=5)
  assert config_lib.resume_differences(saved, now) == []
  changed = Config(latent_dim=64, seed=3, learning_rate_d=1e-3, batch_size=64)
  assert config_lib.resume_differences(saved, changed) == [
      "batch_size: 128 -> 64", "latent_dim: 100 -> 64", "learning_rate_d: 0.0002 -> 0.001", "seed: 0 -> 3"]
  # A setting the saved run did not know yet counts as its default.
  del saved["g_ema_decay"]
  assert config_lib.resume_differences(saved, Config()) == []
  assert config_lib.resume_differences(saved, Config(g_ema_decay=0.9)) == ["g_ema_decay: 0.0 -> 0.9"]
  # A preset-dependent setting the saved run did not know counts as its preset's value.
  del saved["d_norm"]
  assert config_lib.resume_differences(saved, Config().resolved()) == []
  assert config_lib.resume_differences(saved, Config(d_norm="spectral")) == ["d_norm: 'none' -> 'spectral'"]


def test_study_groups_on_everything_but_the_seed_and_the_output_settings():
  """Catches study pooling runs of different computations or scores (e.g. num_steps, eval_samples,
  sample_bn) or separating runs that differ only in where and how often they wrote."""
  assert config_lib.STUDY_IGNORED == {"seed", "seeds", "sweep", "data_dir", "log_every", "sample_every", "num_samples",
                                      "checkpoint_every", "keep_checkpoints", "eval_every", "evaluator_dir",
                                      "inception_weights", "inception_dir"}
  from dcgan_jax.studies import study_table
  assert set(study_table.IGNORED_FIELDS) == config_lib.STUDY_IGNORED


def test_saved_configs_of_other_versions_load():
  """from_dict drops keys this version does not know and defaults missing ones.
  Catches a config.json of an older or newer version that can no longer be read (sample, evaluate and
  study on old runs)."""
  config = config_lib.from_dict({"latent_dim": 64, "a_setting_from_the_future": 1})
  assert config.latent_dim == 64 and config.seed == 0


def test_validation_errors_are_one_line_naming_the_setting_and_the_fix():
  """Each invalid setting (unknown preset or norm, out-of-bounds numbers, a preset's fixed size, wasserstein
  without a Lipschitz constraint, penalties or layer/spectral norms with --invariant_groups) raises one
  single-line ConfigError that starts with the flag and its value. Catches a bad value that passes
  validation (and fails later, deep in JAX) and multi-line or unnamed errors."""
  for bad, text in ((dict(preset="resnet"), "--preset='resnet': unknown value; use one of mnist, dcgan"),
                    (dict(batch_size=0), "--batch_size=0: must be a whole number in [1, 1,048,576]"),
                    (dict(image_size=32), "--image_size=32: the mnist preset"),
                    (dict(g_ema_decay=1.0), "--g_ema_decay=1.0: must be in [0, 1)"),
                    (dict(loss="wasserstein"), "--loss='wasserstein': needs a Lipschitz-constrained"),
                    (dict(gp_weight=-1.0), "--gp_weight=-1.0: must be >= 0"),
                    (dict(r1_every=0), "--r1_every=0: must be a whole number in [1, 1,000,000]"),
                    (dict(r1_weight=1.0, invariant_groups=8), "--invariant_groups=8: does not support "
                     "gradient penalties"),
                    (dict(d_norm="layer", invariant_groups=8), "--d_norm='layer': is not supported with "
                     "--invariant_groups"),
                    (dict(d_norm="group"), "--d_norm='group': unknown value; use one of none, batch")):
    with pytest.raises(ConfigError) as e:
      Config(**bad).validate()
    assert str(e.value).startswith(text) and "\n" not in str(e.value)
  Config(loss="wasserstein", d_norm="spectral").validate()  # a Lipschitz constraint of its own


def test_shipped_flagfiles_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
  """`--flagfile=mnist.flags` finds the copy inside the package, also outside the checkout (an installed
  package has no experiments/ folder beside it).
  Catches a lookup relative to the working directory or the checkout."""
  monkeypatch.chdir(tmp_path)
  assert cli.flagfile_names() == ["celeb_a.flags", "cifar10.flags", "fashion_mnist.flags", "mnist.flags"]
  resolved = cli.resolve_flagfiles(["prog", "--flagfile=mnist.flags", "--seed=1"])
  assert resolved == ["prog", f"--flagfile={os.path.join(cli.FLAGFILES_DIR, 'mnist.flags')}", "--seed=1"]
  (tmp_path / "mine.flags").write_text("--seed=2\n")
  assert cli.resolve_flagfiles(["--flagfile=mine.flags"]) == ["--flagfile=mine.flags"]


EXPERIMENT_FLAGFILES = sorted(
    os.path.relpath(os.path.join(d, f), REPO) for d, _, files in os.walk(os.path.join(REPO, "experiments"))
    for f in files if f.endswith(".flags"))


@pytest.mark.parametrize("path", EXPERIMENT_FLAGFILES)
def test_experiment_flagfiles_parse_after_the_dataset_flagfile_into_valid_configs(path):
  """Each flagfile under experiments/ (the variant families, fashion_mnist_fast.flags), given after
  fashion_mnist.flags as their comments say, parses and validates. Catches a misspelt flag, a value the
  setting refuses, or a combination the config refuses (e.g. wasserstein without a penalty)."""
  values = flags.FlagValues()
  config_lib.define_flags(flag_values=values)
  flags.DEFINE_string("workdir", None, "", flag_values=values)
  values(["prog", f"--flagfile={os.path.join(cli.FLAGFILES_DIR, 'fashion_mnist.flags')}",
          f"--flagfile={os.path.join(REPO, path)}"])
  config_lib.from_flags(flag_values=values).validate()


@pytest.mark.parametrize("module,absent", [
    ("dcgan_jax.sample", ("dcgan_jax.train", "dcgan_jax.datasets.data", "tensorflow", "tensorflow_datasets")),
    ("dcgan_jax.study", ("jax", "tensorflow")),
    pytest.param("dcgan_jax.benchmark", ("dcgan_jax.train", "tensorflow", "tensorflow_datasets"),
                 marks=pytest.mark.slow),
])
def test_tools_import_only_what_they_need(module, absent):
  """`sample` needs no training loop and no TensorFlow, `study` no JAX, `benchmark` neither the loop nor
  TensorFlow (the GPU machine has no TensorFlow). Catches an import that drags them in."""
  import subprocess
  import sys
  code = f"import sys, {module}; print(sorted(m for m in {absent!r} if m in sys.modules))"
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.strip() == "[]", r.stdout


def test_seeds_lists_and_ranges_parse_and_bad_ones_are_one_line():
  """--seeds: lists, ranges and both mixed give the seeds in order; a repeated seed, a descending range
  or a word is a ConfigError naming --seeds. Catches a range parsed without its last seed, and members
  silently trained twice."""
  assert Config(seeds="0-3").member_seeds() == [0, 1, 2, 3]
  assert Config(seeds="5, 1,7-8").member_seeds() == [5, 1, 7, 8]
  assert Config().member_seeds() == []
  for bad in ("1,1", "0-3,2", "3-1", "a", "1-b", "-1"):
    with pytest.raises(ConfigError, match="--seeds="):
      Config(seeds=bad).resolved()


def test_sweep_parses_the_settings_that_may_vary_and_refuses_the_rest_in_one_line():
  """--sweep: 'setting:v,v;setting:v' gives each setting's values in order; members are the product of
  the values and the seeds, each directory named by its values. A setting that shapes the program
  (batch_size), an unknown one, a repeated setting or value, a word for a number, and a value the
  setting itself refuses (beta1 1.5) are one-line ConfigErrors naming --sweep. Catches a sweep that
  silently ignores a setting, members missing from the product, and unvalidated swept values."""
  from dcgan_jax import members
  config = Config(sweep="learning_rate_d:1e-4, 2e-4; beta1:0", seeds="3,5")
  assert config.sweep_values() == [("learning_rate_d", [1e-4, 2e-4]), ("beta1", [0.0])]
  found = members.runs(config, "w")
  assert [(r.config.learning_rate_d, r.config.beta1, r.config.seed, r.config.seeds, r.config.sweep)
          for r in found] == [
      (1e-4, 0.0, 3, "", ""), (1e-4, 0.0, 5, "", ""), (2e-4, 0.0, 3, "", ""), (2e-4, 0.0, 5, "", "")]
  assert (found[1].directory, found[1].name) == ("w/learning_rate_d=0.0001_beta1=0.0_seed_5",
                                                 "learning_rate_d=0.0001 beta1=0.0 seed 5")
  assert [r.directory for r in members.runs(Config(sweep="g_ema_decay:0,0.999", seed=7), "w")] == [
      "w/g_ema_decay=0.0_seed_7", "w/g_ema_decay=0.999_seed_7"]
  for bad, says in (("batch_size:64,128", "batch_size cannot differ between members"),
                    ("learning_rate:1e-4", "learning_rate is not a setting"),
                    ("beta1:0.5;beta1:0", "beta1 appears twice"), ("beta1:0.5,0.5", "appears twice"),
                    ("beta1:half", "not a list of numbers"), ("beta1", "not setting:value"),
                    ("beta1:0.5,1.5", "--beta1=1.5: must be in")):
    with pytest.raises(ConfigError, match="--sweep=") as e:
      Config(sweep=bad).resolved()
    assert says in str(e.value) and "\n" not in str(e.value), (bad, str(e.value))
  with pytest.raises(ConfigError, match="^--members_form='vmap': stacks members that share one program"):
    Config(sweep="beta1:0,0.5", members_form="vmap").resolved()


def test_a_member_count_that_cannot_fit_the_device_is_refused_with_the_count_that_fits():
  """members.check_memory: 16 members of 1 GiB of state on a 16 GiB device (half for the states) is a
  one-line ConfigError naming the count that fits (8); 8 members pass, and so does any count where the
  backend reports no limit (CPU). Catches a check that ignores the member count or the dataset."""
  from dcgan_jax import members
  gib = 2**30
  with pytest.raises(ConfigError, match="run at most 8 members"):
    members.check_memory(16, gib, 16 * gib)
  members.check_memory(8, gib, 16 * gib)
  with pytest.raises(ConfigError, match="run at most 6 members"):
    members.check_memory(8, gib, 16 * gib, data_bytes=2 * gib)
  members.check_memory(1000, gib, None)
