"""pytorch-fid's FID network with the seeded random weights of tests/fixtures/inception_reference.npz,
rebuilt without torch (experiments/inception_reference_fixtures.py recorded the fixture), and a stand-in
weights file whose converted variables are those weights (for the command-line and training tests)."""
import functools
import importlib.util
import os

import flax
import numpy as np

from dcgan_jax.evaluation import inception

from dcgan_jax.evaluation import inception_metrics

from dcgan_jax.evaluation import torch_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@functools.lru_cache(maxsize=None)
def recorder():
  """experiments/inception_reference_fixtures.py as a module (its torch imports are inside main())."""
  spec = importlib.util.spec_from_file_location(
      "inception_reference_fixtures", os.path.join(ROOT, "experiments", "inception_reference_fixtures.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@functools.lru_cache(maxsize=None)
def reference():
  with np.load(os.path.join(FIXTURES, "inception_reference.npz")) as f:
    return dict(f)


def random_state_dict() -> dict:
  """The recorded network's state dict: BatchNorm tensors read from inception_random_bn.pth (torch's
  zip format, by dcgan_jax.evaluation.torch_file), every other weight from the recorder's seeded numpy rule."""
  state = torch_file.load_state_dict(os.path.join(FIXTURES, "inception_random_bn.pth"))
  ref = reference()
  for name, shape in zip(ref["names"], ref["shapes"]):
    name = str(name)
    if name not in state:
      state[name] = recorder().random_weight(name, tuple(int(s) for s in str(shape).split(",") if s))
  return state


@functools.lru_cache(maxsize=None)
def random_variables() -> dict:
  return inception.variables_from_state_dict(random_state_dict())


def stand_in_weights(cache_dir: str) -> str:
  """A weights file for the tools (its bytes are arbitrary) whose converted variables, cached in
  `cache_dir` under its hash, are random_variables(): the tools then run the recorded network."""
  os.makedirs(cache_dir, exist_ok=True)
  path = os.path.join(cache_dir, "stand-in.pth")
  with open(path, "wb") as f:
    f.write(b"stand-in for pt_inception-2015-12-05-6726825d.pth")
  sha = inception_metrics._sha256(path)  # pylint: disable=protected-access
  with open(inception_metrics.converted_path(cache_dir, sha), "wb") as f:
    f.write(flax.serialization.to_bytes(random_variables()))
  return path
