"""Test setup: 4 virtual CPU devices (before JAX starts), quiet TensorFlow, the repo on sys.path."""
import os
import sys
import tempfile

from helpers import TEST_XLA_FLAGS

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=4 {TEST_XLA_FLAGS}")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session and its CLI subprocesses: the same step function
# is compiled by many short runs (resume, kill, topology tests); caching cuts most of their time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dcgan_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# Evaluator networks trained by the tests go to a temporary cache, never the user's (~/.cache).
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dcgan_jax_cache_")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The XLA:CPU configuration of dcgan_jax's programs (Eigen convolutions), so tests run what users run.
from dcgan_jax.ops import convolutions  # noqa: E402
assert convolutions.configure_xla_cpu() or "ynn" in os.environ["XLA_FLAGS"], "conftest runs before JAX starts"

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
  """A tfds data_dir holding a 64-image synthetic fashion_mnist, written by prepare_data."""
  from dcgan_jax import prepare_data
  from helpers import make_idx_dir
  idx = tmp_path_factory.mktemp("idx")
  make_idx_dir(str(idx), n_train=64, n_test=8)
  data_dir = tmp_path_factory.mktemp("tfds")
  prepare_data.prepare("fashion_mnist", str(idx), str(data_dir))
  return str(data_dir)
