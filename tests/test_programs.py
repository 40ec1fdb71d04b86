"""The GPU and TPU programs, exported here without the hardware (dcgan_jax/programs.py): what they hold
and what they must not. experiments/accelerator_check.py prints the same descriptions for every
configuration; these tests assert on a representative set (4 virtual devices)."""
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcgan_jax import parallel
from dcgan_jax import programs
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config

pytestmark = pytest.mark.slow  # each program is traced and lowered: seconds apiece

CHECKED = ["mnist_b128_f32", "dcgan64_b128_bf16", "mnist_b128_wgan_gp", "dcgan64_b128_lazy_r1",
           "dcgan64_b128_spectral_hinge", "mnist_b128_k8", "mnist_b128_streaming", "mnist_b128_members4_vmap",
           "mnist_b128_invariant16", "mnist_sample_b500", "mnist_features_b1000", "dcgan32_inception_b50"]
SMALL = dict(base_width=8, latent_dim=16)  # (the structure, not the widths, is what is checked)


def _settings(name):
  return {} if programs.CONFIGURATIONS[name][0] != "train" and "dcgan" not in name else SMALL


@pytest.mark.parametrize("in_memory", [True, False])
def test_the_exported_step_is_the_pmapped_step(in_memory):
  """parallel.step_program (jit over shard_map, what programs.py exports) lowers, for the CPU, to the
  same operations, the same collectives and the same donated arguments as parallel.pmap_step, the
  pmapped step the trainer runs. Catches an exported program that is not the trainer's: data mapped
  where pmap replicates it (or the reverse), the state not donated, a step built with other settings."""
  config = Config(batch_size=8, latent_dim=16).resolved()
  step = step_lib.make_train_step(config, 1, 64 if in_memory else None)
  state = jax.eval_shape(lambda: step_lib.create_train_state(config, 1))
  positions = jax.ShapeDtypeStruct((4, 2), jnp.int32)
  data = jax.ShapeDtypeStruct((64, 28, 28, 1) if in_memory else (4, 1, 2, 28, 28, 1), jnp.uint8)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), (parallel.AXIS,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  mapped = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(parallel.AXIS))
  sharded = (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state),
             jax.ShapeDtypeStruct(positions.shape, positions.dtype, sharding=mapped),
             jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=replicated if in_memory else mapped))
  ours = parallel.step_program(step, in_memory, mesh).trace(*sharded).lower().as_text()
  theirs = parallel.pmap_step(step, in_memory).lower(state, positions, data).as_text()

  def summary(text):
    ops = collections.Counter(re.findall(r"\b(stablehlo\.[a-z_]+|chlo\.[a-z_]+)\b", text))
    return ops, text.count("jax.buffer_donor"), text.count("tf.aliasing_output")

  ours, theirs = summary(ours), summary(theirs)
  assert ours[1:] == theirs[1:] and ours[0] - theirs[0] == theirs[0] - ours[0] == collections.Counter(), (
      ours[0] - theirs[0], theirs[0] - ours[0])
  assert ours[0]["stablehlo.all_reduce"] > 0 and ours[1] + ours[2] > 0


@pytest.mark.parametrize("name", CHECKED)
def test_accelerator_programs_hold_no_cpu_form_callback_or_float64_and_donate_the_state(name):
  """Each program exported for cuda (and the first one for tpu too) has: no operation traced from the
  CPU convolution forms (cpu_kernels.py, dft.py) and, except with --invariant_groups, none from the
  patches form; no large constant (the CPU forms' DFT matrices); no custom call, host callback or
  transfer; no float64; convolutions (XLA's own, for cuDNN and the TPU); the training state donated.
  With --invariant_groups: the patches form and no scatter (atomics on GPU). Catches a program built
  for the CPU's forms (the platform not passed to make_train_step), a jax.debug.callback or host
  transfer left in the step, float64 leaking in, the donation dropped, and the data order's loop
  rolled for the machine that exports instead of the platform it is built for."""
  for platform in ("cuda", "tpu") if name == CHECKED[0] else ("cuda",):
    report = programs.describe(programs.build(name, 4, platform, _settings(name)), platform)
    assert report["ok"], report
    grouped = "invariant" in name
    assert report["form_ops"]["cpu"] == report["form_ops"]["dft"] == 0, report["form_ops"]
    assert (report["form_ops"]["exact"] > 0) == grouped, report["form_ops"]
    # (The FID Inception network's one large constant is its 299x32 resize matrix.)
    assert report["large_constants"] == (1 if report["kind"] == "inception" else 0)
    assert report["custom_calls"] == [] and report["host_callbacks"] == 0
    assert report["f64_ops"] == 0
    if not grouped:
      assert report["op_counts"]["stablehlo.convolution"] > 0
    else:
      assert report["nondeterministic_ops"] == 0
    assert report["donated"] is (True if report["kind"] == "train" else None)
    # Loops: the --steps_per_call scan only; the data order's fixed rounds are written out for an
    # accelerator (one fused kernel instead of a launch per round), whatever machine builds it.
    scans = 1 if programs.build(name, 4, platform, _settings(name)).config.steps_per_call > 1 else 0
    assert report["op_counts"].get("stablehlo.while", 0) == (scans if report["kind"] == "train" else 0)


def test_the_checks_see_what_they_look_for():
  """The detectors behind the assertions above, each given a program that has what it looks for: the
  CPU forms (the mnist step built for "cpu", lowered for cuda), a host callback, a float64 operation,
  a scatter-add, and a step without donation. Catches a detector that can never fire (a check that
  cannot fail)."""
  cpu_form = programs.describe(programs.build("mnist_b128_f32", 4, "cpu", SMALL), "cuda")
  assert cpu_form["form_ops"]["cpu"] > 0 and cpu_form["form_ops"]["dft"] > 0 and cpu_form["large_constants"] > 0

  def report_of(fn, *args, platform="cuda"):
    return programs.describe(programs.Program("probe", "sample", None, jax.jit(fn), args, 1, 0, 1), platform)

  x = jax.ShapeDtypeStruct((8,), jnp.float32)
  # (a host callback lowers only for the platform JAX runs on; its custom call has the same form there)
  assert report_of(lambda v: jax.pure_callback(np.sin, v, v), x, platform="cpu")["host_callbacks"] == 1
  assert report_of(lambda v: v.at[jnp.array([0, 0])].add(1.0), x)["nondeterministic_ops"] == 1
  with jax.enable_x64(True):
    assert report_of(lambda v: v.astype(jnp.float64) * 2, x)["f64_ops"] > 0
  program = programs.build("mnist_b128_f32", 4, "cuda", SMALL)
  undonated = dataclasses.replace(program, fn=jax.jit(lambda *args: program.fn(*args)))
  assert programs.describe(undonated, "cuda")["donated"] is False


def _collective_bytes(name, settings):
  """{where: [bytes of each all_reduce]} for program `name`: where is "BatchNorm", "d_update", "g_update"
  or "step" (the metrics), from the operations' source locations."""
  program = programs.build(name, 4, "cuda", settings)
  found = collections.defaultdict(list)
  for op in programs._operations(programs.lower(program, "cuda").compiler_ir("stablehlo").operation):  # pylint: disable=protected-access
    if op.name in programs.COLLECTIVES:
      assert op.name == "stablehlo.all_reduce", op.name
      location = str(op.location)
      where = next((w for w in ("BatchNorm", "d_update", "g_update") if w in location), "step")
      found[where].append(sum(programs._tensor_bytes(str(r.type)) for r in op.results))  # pylint: disable=protected-access
  return program, found


@pytest.mark.parametrize("name,d_steps", [("mnist_b128_f32", 1), ("dcgan32_b128_f32", 2)])
def test_gradients_and_batchnorm_statistics_are_reduced_once_per_update(name, d_steps):
  """The all-reduces of one training step: each D update reduces D's gradient once (every parameter
  once: their bytes are D's parameter bytes), the G update G's once; one all-reduce per BatchNorm layer
  and pass (its mean and mean square together) and one for its transpose in the backward pass: G's
  layers forward once per D update (a fake batch each; the last one's vjp is kept for the G update)
  and backward once, D's on the real and the fake batch of each D update and on the fake batch of the G
  update, forward and backward; and one per logged metric. Catches a gradient averaged twice or not at
  all, statistics reduced per example or left per device, and G run again for its update."""
  program, found = _collective_bytes(name, dict(SMALL, d_steps=d_steps))
  state = jax.eval_shape(lambda: step_lib.create_train_state(program.config, programs.CHANNELS[program.config.preset]))
  param_bytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  assert sum(found["d_update"]) == d_steps * param_bytes(state.d.params)
  assert sum(found["g_update"]) == param_bytes(state.g.params)
  g_norms, d_norms = len(state.g.batch_stats), len(state.d.batch_stats)
  assert len(found["BatchNorm"]) == g_norms * (d_steps + 1) + 2 * d_norms * (2 * d_steps + 1), (g_norms, d_norms)
  assert all(b == 4 for b in found["step"])  # scalars: the metrics' means
