"""How the models compute: the convolution forms chosen per platform (convolutions.py: XLA's own ops,
the XLA:CPU rewrites of cpu_kernels.py and dft.py, the exact patches form of patches.py) and the
topology-invariant batch reductions of --invariant_groups (invariant.py). Imports nothing from the rest
of dcgan_jax but its foundations."""
