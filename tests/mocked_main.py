"""Runs `python -m dcgan_jax.main` with tfds mocked (random images, no files, no network).

    python tests/mocked_main.py NUM_EXAMPLES --flag=value ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow_datasets as tfds  # noqa: E402

from dcgan_jax import cli  # noqa: E402
from dcgan_jax import main  # noqa: E402

if __name__ == "__main__":
  num_examples = int(sys.argv.pop(1))
  with tfds.testing.mock_data(num_examples=num_examples):
    cli.run(main.main)
