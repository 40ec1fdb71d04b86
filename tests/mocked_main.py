"""Runs `python -m dcgan_jax.main` with tfds mocked (random images, no files, no network).

    python tests/mocked_main.py NUM_EXAMPLES --flag=value ...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from dcgan_jax import main  # noqa: E402

if __name__ == "__main__":
  with tfds.testing.mock_data(num_examples=int(sys.argv[1])):
    app.run(main.main, argv=[sys.argv[0]] + sys.argv[2:], flags_parser=main.parse_flags)
