"""How the models' convolutions and dense layers are computed: one form per program, chosen once.

The platform policy picks the form when the models are built, for the platform the step is compiled for
(platforms.Policy.conv_form, through models.build_models); the layers then call `conv`,
`conv_transpose` and `dense` with it:

  "lax"    XLA's own ops (GPU: cuDNN, TPU): plain `lax.conv_general_dilated` / `lax.conv_transpose` /
           `jnp.dot`, exactly what flax's layers run. No custom VJP, so forward-mode AD works.
  "cpu"    the XLA:CPU rewrites (cpu_kernels.py, dft.py): the same math without XLA:CPU's slow paths.
  "exact"  the patches form (patches.py), for --invariant_groups: plain-layout matrix products only, so
           every device count and process rounds alike (on CPU, where it is verified).

Hardware-specific code is reached only from here: a GPU/TPU program never contains the CPU rewrites
(tests/test_models.py checks that jax.jvp runs through a "lax" G and D). `configure_xla_cpu` and
`configure_xla_gpu` are the places that set XLA flags.
"""

import os

import jax
import jax.numpy as jnp

from dcgan_jax.ops import cpu_kernels
from dcgan_jax.ops import patches

FORMS = ("lax", "cpu", "exact")
_DN = ("NHWC", "HWIO", "NHWC")


def _lax_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _lax_conv_transpose(x, kernel, strides, padding):
  return jax.lax.conv_transpose(x, kernel, strides, padding, dimension_numbers=_DN)


_CONV = {"lax": _lax_conv, "cpu": cpu_kernels.conv, "exact": patches.patches_conv_2d}
_CONV_TRANSPOSE = {"lax": _lax_conv_transpose, "cpu": cpu_kernels.conv_transpose,
                   "exact": patches.patches_conv_transpose}


def conv(x, kernel, strides, padding: str, form: str):
  """= flax.linen.Conv's computation: x (B, H, W, cin), kernel (kh, kw, cin, cout) -> (B, H', W', cout)."""
  return _CONV[form](x, kernel, tuple(strides), padding)


def conv_transpose(x, kernel, strides, padding: str, form: str):
  """= flax.linen.ConvTranspose's (transpose_kernel=False): x (B, h, w, cin) -> (B, H, W, cout)."""
  return _CONV_TRANSPOSE[form](x, kernel, tuple(strides), padding)


def dense(x, kernel, form: str):
  """= flax.linen.Dense's: x (B, in) @ kernel (in, out). "exact": a 1x1 convolution in patches form."""
  if form == "exact":
    y = patches.patches_conv(x[:, None, None, :], kernel[None, None], (1, 1), ((0, 0), (0, 0)))
    return y[:, 0, 0, :]
  return jnp.dot(x, kernel)


# jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK; this leaves it the matrix products only, and
# convolutions go to Eigen, faster for these models (docs/performance.md). Read by XLA:CPU only.
EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
_FLAG_CHECKED_JAXLIB = "0.10."  # the flag's name is XLA-internal; an unknown XLA flag aborts the process


def configure_xla_cpu(convolutions: str = "eigen") -> bool:
  """Chooses XLA:CPU's convolution library ("eigen" or "ynnpack", jaxlib's default) through XLA_FLAGS.

  Called once per program by cli.run, before JAX initialises its backends. Changes nothing, and
  returns False, when the choice is already in XLA_FLAGS (the user's wins), for "ynnpack", when
  JAX_PLATFORMS names no CPU (an accelerator run), once backends are up, or on a jaxlib whose flags
  were not checked. Returns True when it set the flag."""
  import jaxlib  # pylint: disable=g-import-not-at-top  (its version, without starting a backend)
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if (convolutions != "eigen" or "xla_cpu_experimental_ynn_fusion_type" in flags
      or (platforms and "cpu" not in platforms.split(","))
      or not jaxlib.__version__.startswith(_FLAG_CHECKED_JAXLIB)
      or getattr(xla_bridge, "backends_are_initialized", lambda: False)()):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
  return True


# XLA:GPU's deterministic mode: no atomics (scatter, reductions) and deterministic cuDNN/cuBLAS algorithm
# choices; --invariant_groups fixes the order of every batch sum, which is only worth it with this on.
DETERMINISTIC_GPU = "--xla_gpu_deterministic_ops=true"


def configure_xla_gpu(deterministic: bool) -> bool:
  """With `deterministic` (--invariant_groups), XLA:GPU's deterministic mode through XLA_FLAGS, before
  JAX initialises its backends (cli.run). Changes nothing, and returns False, without `deterministic`,
  when XLA_FLAGS already says (the user's wins), or once backends are up. The flag is read by XLA:GPU
  only; every jaxlib knows it (an unknown XLA flag would abort the process)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  if (not deterministic or "xla_gpu_deterministic_ops" in flags
      or getattr(xla_bridge, "backends_are_initialized", lambda: False)()):
    return False
  os.environ["XLA_FLAGS"] = f"{flags} {DETERMINISTIC_GPU}".strip()
  return True
