"""dcgan_jax: a pure-JAX, functional DCGAN trainer (Flax models, optax, pmap, tfds, orbax)."""

__version__ = "0.1.0"
