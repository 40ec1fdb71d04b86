"""One process of the Inception topology test: embeds fixed images and the images of a stand-in generator
with inception_metrics.Features, takes a dataset split's reference features (from its own cache
directory, CACHE/p<process index>, or computed with the other processes), and process 0 saves what it
received (all processes' shares).

    python tests/inception_probe.py OUT.npz DATA_DIR CACHE [PROCESS_ID NUM_PROCESSES PORT]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dcgan_jax.ops import convolutions  # noqa: E402

convolutions.configure_xla_cpu()  # the XLA:CPU flags every dcgan_jax program (and the tests) runs with

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dcgan_jax.evaluation import evaluator  # noqa: E402
from dcgan_jax.evaluation import inception_metrics  # noqa: E402

from dcgan_jax import parallel  # noqa: E402
from inception_fixture import random_variables, recorder  # noqa: E402

PROBE_IMAGES = 7  # odd: the processes' shares differ in size, and the devices' chunks are padded


def probe_inputs():
  """(uint8 images (7, 32, 32, 3), latents (7, 3 * 16 * 16), the stand-in generator's parameter)."""
  images = recorder().colour_images(PROBE_IMAGES, 32, 5)
  z = np.random.default_rng(0).standard_normal((PROBE_IMAGES, 3 * 16 * 16)).astype(np.float32)
  return images, z, np.float32(0.7)


@jax.jit
def stand_in_sample(g, z):
  """A 'generator' (g, z (n, 768)) -> float32 (n, 16, 16, 3) in [-1, 1]."""
  return jnp.tanh(g * z.reshape(-1, 16, 16, 3))


def main():
  out, data_dir, cache = sys.argv[1:4]
  if len(sys.argv) > 4:
    process_id, num_processes, port = map(int, sys.argv[4:7])
    parallel.initialize(f"127.0.0.1:{port}", num_processes, process_id)
  features = inception_metrics.Features(inception_metrics.Weights("random", "0" * 64, random_variables()),
                                        per_device=2)
  images, z, g = probe_inputs()
  pool3, logits = features.embed(images)
  gen_pool3, gen_logits = features.embed_generated(stand_in_sample, g, z)
  rounded = evaluator.as_uint8_images(stand_in_sample(g, z), (16, 16, 3))
  gen_rounded_pool3, _ = features.embed(rounded)  # generating first, then embedding the uint8 images
  reference = inception_metrics.reference_features(features, "fashion_mnist", "train", data_dir, (28, 28, 1),
                                                   os.path.join(cache, f"p{jax.process_index()}"))
  if jax.process_index() == 0:
    np.savez(out, pool3=pool3, logits=logits, gen_pool3=gen_pool3, gen_logits=gen_logits,
             gen_rounded_pool3=gen_rounded_pool3, reference=reference.features)


if __name__ == "__main__":
  main()
