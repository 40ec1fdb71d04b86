"""A golden trajectory: the first steps of the seed's flagfile (mnist.flags' model and training
settings) on fixed synthetic data, compared with tests/golden/mnist_preset.json.

What it guards: the algorithm. A change of initialisation, update order, data order, noise, dropout,
loss or optimizer moves these numbers by far more than the tolerance; rounding differences between CPU
models (and between XLA versions' fusions) stay well inside it. A change that moves them on purpose
rewrites the file and says so in CHANGELOG.md:

    python tests/test_golden.py --update
    python tests/test_golden.py --calibrate   # how far rounding and small algorithm changes move it
"""
import json
import os
import sys

import numpy as np

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "mnist_preset.json")
STEPS = 5
METRICS = ("d_loss", "g_loss", "d_real", "d_fake", "g_param_norm", "d_param_norm")
# Relative tolerance per compared number. Measured with `python tests/test_golden.py --calibrate`:
# rounding alone (the same run on 2 or 4 devices: other reduction orders) moved them by 7e-5 at most;
# algorithmic changes by 1.7e-3 (dropout rate 0.3 -> 0.29), 1.1e-2 (other noise), 2.1e-2 (another data
# order). A nudge of a hyperparameter can stay inside (beta1 0.5 -> 0.51: 4e-4).
RTOL = 1e-3


def settings():
  """mnist.flags' model and training settings, a small batch."""
  return dict(dataset="synthetic", preset="mnist", latent_dim=100, optimizer="adam", learning_rate_g=2e-4,
              learning_rate_d=2e-4, beta1=0.5, loss="non_saturating", g_ema_decay=0.999, batch_size=32,
              seed=0)


def synthetic_images(n=256):
  """uint8 (n, 28, 28, 1): example i is the level (37 i mod 256) plus fixed noise, so that which
  examples a batch holds shows in D's outputs."""
  rng = np.random.default_rng(1234)
  levels = (37 * np.arange(n)) % 256
  noise = rng.integers(-20, 21, (n, 28, 28, 1))
  return np.clip(levels[:, None, None, None] + noise, 0, 255).astype(np.uint8)


def trajectory(devices=1, **overrides):
  """{"steps": [{metric: value} per step], "g_ema_norm": float} of STEPS steps on `devices` devices."""
  import jax
  import optax
  from dcgan_jax import parallel
  from dcgan_jax import platforms
  from dcgan_jax import step as step_lib
  from dcgan_jax.config import Config
  config = Config(**{**settings(), **overrides}).resolved()
  data = synthetic_images()
  train_step = jax.pmap(step_lib.make_train_step(config, 1, len(data), platforms.HOST),
                        axis_name=parallel.AXIS, in_axes=(None, 0, None), out_axes=(None, None),
                        devices=jax.devices()[:devices])
  state = step_lib.create_train_state(config, 1)
  positions = np.arange(config.batch_size, dtype=np.int32).reshape(devices, -1)
  steps = []
  for _ in range(STEPS):
    state, metrics = train_step(state, positions, data)
    steps.append({k: float(metrics[k]) for k in METRICS})
  return {"steps": steps, "g_ema_norm": float(optax.tree.norm(state.g_ema))}


def largest_gap(a, b) -> float:
  """The largest relative difference between two trajectories' numbers."""
  pairs = [(x[k], y[k]) for x, y in zip(a["steps"], b["steps"], strict=True) for k in METRICS]
  pairs.append((a["g_ema_norm"], b["g_ema_norm"]))
  return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def test_first_steps_of_the_seed_configuration_follow_the_golden_trajectory():
  """Catches any change of algorithm (init, update order, data order, noise, dropout, loss, optimizer,
  EMA): each moves a number by more than RTOL. If the change is intended, update the file (module
  docstring) and say so in CHANGELOG.md."""
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert golden["settings"] == settings() and golden["steps_run"] == STEPS
  gap = largest_gap(trajectory(), golden)
  print("largest relative gap from the golden trajectory:", gap)
  assert gap <= RTOL, f"the trajectory moved by {gap:.2e} (> {RTOL:.0e}): see this file's docstring"


def calibrate() -> dict:
  """Largest gaps from the 1-device trajectory: of rounding (other device counts) and of small changes
  of the algorithm (RTOL lies between them)."""
  import jax
  from dcgan_jax import randomness
  base, gaps = trajectory(), {}
  for devices in (2, 4):
    gaps[f"rounding: {devices} devices"] = largest_gap(trajectory(devices=devices), base)
  for name, overrides in (("dropout_rate 0.29", dict(dropout_rate=0.29)), ("beta1 0.51", dict(beta1=0.51))):
    gaps[name] = largest_gap(trajectory(**overrides), base)
  indices, latents = randomness.example_indices, randomness.latents
  try:
    randomness.example_indices = lambda key, *a: indices(jax.random.fold_in(key, 1), *a)
    gaps["another data order"] = largest_gap(trajectory(), base)
    randomness.example_indices = indices
    randomness.latents = lambda keys, d: latents(jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys), d)
    gaps["other noise"] = largest_gap(trajectory(), base)
  finally:
    randomness.example_indices, randomness.latents = indices, latents
  return gaps


if __name__ == "__main__":
  if sys.argv[1:] not in (["--update"], ["--calibrate"]):
    sys.exit("usage: python tests/test_golden.py --update | --calibrate")
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from dcgan_jax.ops import convolutions
  convolutions.configure_xla_cpu()  # the XLA:CPU setup of the library's programs, as in the tests
  if sys.argv[1] == "--calibrate":
    print(json.dumps(calibrate(), indent=1))
    sys.exit(0)
  with open(GOLDEN, "w") as f:
    json.dump({"settings": settings(), "steps_run": STEPS, **trajectory()}, f, indent=1)
    f.write("\n")
  print("wrote", GOLDEN)
