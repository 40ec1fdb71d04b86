"""The accelerator programs, inspected without an accelerator: each built as the trainer builds it for a
GPU or TPU mesh, lowered for that platform (jax.export works on a CPU-only machine), and described.

    python experiments/accelerator_check.py --platforms=cuda,tpu     (one JSON line per program)

    program = programs.build("mnist_b128_f32", num_devices=8, platform="cuda")
    report = programs.describe(program, "cuda")   # op counts, FLOPs, collectives, donation, ...

A training program is parallel.step_program (what pmap_step compiles, as jit over shard_map) of
step.make_train_step for the export platform's devices, under that platform's policy (platforms.py:
the convolution form, "lax" for gpu/tpu and "exact" with --invariant_groups; the scan of
--steps_per_call; lazy R1's lax.cond), members vmapped (parallel.over_members). The
sampling and evaluation programs are sampling.make_sampler's and evaluator.features_program's.

What `describe` reports, from the lowered StableHLO (operations walked, nested regions included):
  op_counts            operation name -> count (a loop body once, every branch of a conditional)
  flops_per_image      XLA's HloCostAnalysis of the lowered module (before XLA's own optimisation),
  bytes_per_image      per device and call, divided by the images one device handles per step: a
                       loop's body is counted once (one step of a scan), a conditional as its costliest
                       branch (lazy R1: an R1 update). Bytes: before fusion, an upper bound of traffic.
  collectives_per_step all_reduce / all_gather / reduce_scatter / collective_permute / all_to_all
  collective_bytes_per_step   and the bytes of their results (static count: one step)
  custom_calls         custom_call targets; host_callbacks: those that call the host, plus send/recv/
                       infeed/outfeed; f64_ops: operations with a float64 result
  large_constants      constants of more than 4096 elements (the CPU forms' DFT and patch matrices)
  form_ops             operations traced from each convolution form's source file (cpu_kernels.py,
                       dft.py, patches.py): from the locations the lowering keeps
  nondeterministic_ops scatter and select_and_scatter (atomics on GPU; XLA documents them as
                       non-deterministic unless --xla_gpu_deterministic_ops)
  donated              every argument of the state is donated (its buffers reused for the new state)
"""

import dataclasses
import math
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dcgan_jax.evaluation import evaluator
from dcgan_jax.evaluation import inception
from dcgan_jax import models
from dcgan_jax import parallel
from dcgan_jax import platforms
from dcgan_jax import sampling
from dcgan_jax import step as step_lib
from dcgan_jax.config import Config

# jax.export's platform names -> jax.Device.platform (what the platform policy is chosen by).
DEVICE_PLATFORM = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}
NUM_EXAMPLES = 60_000  # the in-memory dataset's size in the programs' shapes (Fashion-MNIST's train split)

# The configurations users run: name -> (kind, Config settings). Names: preset[size]_b<batch>_<what>.
_MNIST, _DCGAN32, _DCGAN64 = dict(preset="mnist"), dict(preset="dcgan", image_size=32), dict(
    preset="dcgan", image_size=64)
CONFIGURATIONS = {
    "mnist_b128_f32": ("train", dict(_MNIST, batch_size=128)),
    "mnist_b1024_f32": ("train", dict(_MNIST, batch_size=1024)),
    "mnist_b128_bf16": ("train", dict(_MNIST, batch_size=128, compute_dtype="bfloat16")),
    "dcgan32_b128_f32": ("train", dict(_DCGAN32, batch_size=128)),
    "dcgan64_b128_f32": ("train", dict(_DCGAN64, batch_size=128)),
    "dcgan64_b128_bf16": ("train", dict(_DCGAN64, batch_size=128, compute_dtype="bfloat16")),
    "mnist_b128_minimax": ("train", dict(_MNIST, batch_size=128, loss="minimax")),
    "mnist_b128_least_squares": ("train", dict(_MNIST, batch_size=128, loss="least_squares")),
    "mnist_b128_hinge": ("train", dict(_MNIST, batch_size=128, loss="hinge")),
    "mnist_b128_wgan_gp": ("train", dict(_MNIST, batch_size=128, loss="wasserstein", gp_weight=10.0)),
    "dcgan64_b128_lazy_r1": ("train", dict(_DCGAN64, batch_size=128, r1_weight=10.0, r1_every=16)),
    "dcgan64_b128_spectral_hinge": ("train", dict(_DCGAN64, batch_size=128, d_norm="spectral", loss="hinge")),
    "mnist_b128_k8": ("train", dict(_MNIST, batch_size=128, steps_per_call=8)),
    "mnist_b128_streaming": ("train", dict(_MNIST, batch_size=128, in_memory="false")),
    "mnist_b128_members4_vmap": ("train", dict(_MNIST, batch_size=128, seeds="0-3", members_form="vmap")),
    "mnist_b128_invariant16": ("train", dict(_MNIST, batch_size=128, invariant_groups=16)),
    "mnist_sample_b500": ("sample", dict(_MNIST)),
    "dcgan64_sample_b500": ("sample", dict(_DCGAN64)),
    "mnist_features_b1000": ("features", dict(_MNIST)),
    "dcgan32_inception_b50": ("inception", dict(_DCGAN32)),
}
CHANNELS = {"mnist": 1, "dcgan": 3}  # the presets' usual data: Fashion-MNIST, colour photographs
# The chunks sampling.sample_images, Evaluator.embed and (per device) inception_metrics.Features use.
_SAMPLES = {"sample": 500, "features": 1000, "inception": 50}


@dataclasses.dataclass(frozen=True)
class Program:
  """A jitted program and the abstract arguments (shapes, dtypes, shardings) it is lowered with."""
  name: str
  kind: str  # "train", "sample", "features" (the evaluator) or "inception"
  config: Config
  fn: Callable
  args: tuple
  images_per_device: int  # per step (training: per-device batch x members) or per call
  state_leaves: int  # the leading arguments that must be donated (training: the state's leaves)
  num_devices: int


def _abstract(tree, sharding, leading=()):
  """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs), with extra leading axes `leading`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(leading + tuple(x.shape), x.dtype, sharding=sharding),
                      tree)


def build(name: str, num_devices: Optional[int] = None, platform: str = "cuda",
          settings: Optional[dict] = None) -> Program:
  """The program `name` (CONFIGURATIONS; `settings` replace some of its Config settings) over the first
  `num_devices` devices (default: all), as the trainer builds it for `platform` (jax.export's name)."""
  kind, base = CONFIGURATIONS[name]
  config = Config(**dict(base, **(settings or {}))).resolved()
  policy = platforms.Policy(DEVICE_PLATFORM[platform])
  channels = CHANNELS[config.preset]
  shape = config.image_shape(channels)
  if kind != "train":
    n = _SAMPLES[kind]
    one = NamedSharding(Mesh(np.array(jax.devices()[:1]), (parallel.AXIS,)), P())
    if kind == "sample":
      generator, _ = models.build_models(config, channels, policy=policy)
      g = jax.eval_shape(lambda: step_lib.create_train_state(config, channels).g)
      fn = sampling.make_sampler(generator)
      args = (_abstract(g, one), jax.ShapeDtypeStruct((n, config.latent_dim), jnp.float32, sharding=one))
    elif kind == "inception":
      fn = inception.features_program()
      variables = jax.eval_shape(lambda: inception.FIDInceptionV3().init(
          jax.random.key(0), jnp.zeros((1, inception.SIZE, inception.SIZE, 3))))
      args = (_abstract(variables, one), jax.ShapeDtypeStruct((n,) + shape, jnp.uint8, sharding=one))
    else:
      fn = evaluator.features_program(10)
      variables = jax.eval_shape(lambda: evaluator.Classifier(10).init(jax.random.key(0), jnp.zeros((1,) + shape)))
      args = (_abstract(variables, one), jax.ShapeDtypeStruct((n,) + shape, jnp.uint8, sharding=one))
    return Program(name, kind, config, fn, args, n, 0, 1)

  num_devices = num_devices or jax.device_count()
  parallel.check_devices(config, num_devices)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), (parallel.AXIS,))
  replicated, mapped = NamedSharding(mesh, P()), NamedSharding(mesh, P(parallel.AXIS))
  per_device = config.batch_size // num_devices
  in_memory = config.in_memory != "false"
  members = len(config.member_seeds()) or 1
  train_step = step_lib.make_train_step(config, channels, NUM_EXAMPLES if in_memory else None, policy)
  if members > 1:
    train_step = parallel.over_members(train_step)
  k = config.steps_per_call
  if k > 1:
    assert policy.scan_steps, "accelerators scan their steps"
    train_step = parallel.scanned_steps(train_step, k, replicated_data=in_memory)
  state = jax.eval_shape(lambda: step_lib.create_train_state(config, channels))
  state = _abstract(state, replicated, (members,) if members > 1 else ())
  positions = jax.ShapeDtypeStruct((num_devices, per_device), jnp.int32, sharding=mapped)
  if in_memory:
    data = jax.ShapeDtypeStruct((NUM_EXAMPLES,) + shape, jnp.uint8, sharding=replicated)
  else:
    steps = (k,) if k > 1 else ()
    data = jax.ShapeDtypeStruct((num_devices,) + steps + (config.d_steps, per_device) + shape, jnp.uint8,
                                sharding=mapped)
  fn = parallel.step_program(train_step, in_memory, mesh)
  return Program(name, kind, config, fn, (state, positions, data), per_device * members,
                 len(jax.tree.leaves(state)), num_devices)


# ---------------------------------------------------------------------------------------------------
# Reading the lowered module
# ---------------------------------------------------------------------------------------------------
COLLECTIVES = ("stablehlo.all_reduce", "stablehlo.all_gather", "stablehlo.reduce_scatter",
               "stablehlo.collective_permute", "stablehlo.all_to_all", "stablehlo.collective_broadcast")
HOST_OPS = ("stablehlo.send", "stablehlo.recv", "stablehlo.infeed", "stablehlo.outfeed")
NONDETERMINISTIC = ("stablehlo.scatter", "stablehlo.select_and_scatter")
LARGE_CONSTANT = 4096
# The convolution forms' source files (convolutions.py): operations traced from them carry their location.
FORM_SOURCES = {"cpu": "/cpu_kernels.py", "dft": "/dft.py", "exact": "/patches.py"}
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "ui64": 8, "i32": 4, "ui32": 4, "i16": 2,
          "ui16": 2, "i8": 1, "ui8": 1, "i1": 1}


def _tensor_bytes(type_text: str) -> int:
  """Bytes of 'tensor<128x4xf32>' (0 for tokens and the like)."""
  match = re.fullmatch(r"tensor<(?:([\dx]+)x)?(\w+)>", type_text)
  if not match or match.group(2) not in _BYTES:
    return 0
  dims = [int(d) for d in match.group(1).split("x")] if match.group(1) else []
  return math.prod(dims) * _BYTES[match.group(2)]


def _operations(operation):
  """Every operation nested in `operation` (regions, blocks), depth first."""
  for region in operation.regions:
    for block in region:
      for op in block.operations:
        yield op.operation
        yield from _operations(op.operation)


def lower(program: Program, platform: str):
  """jax's Lowered for `platform` (the module jax.export serialises)."""
  return program.fn.trace(*program.args).lower(lowering_platforms=(platform,))


def describe(program: Program, platform: str) -> dict:
  """The JSON-able description of `program` lowered for `platform` (module docstring)."""
  try:  # the artifact a user would ship (refused, e.g., for programs with host callbacks)
    exported, error = jax.export.export(program.fn, platforms=(platform,))(*program.args), None
  except Exception as e:  # pylint: disable=broad-except  (reported: ok False, and the description)
    exported, error = None, f"{type(e).__name__}: {e}"[:2000]
  lowered = lower(program, platform)
  module = lowered.compiler_ir("stablehlo")
  counts, custom_calls = {}, []
  host, f64, large, collectives, collective_bytes = 0, 0, 0, 0, 0
  donated, forms = 0, {form: 0 for form in FORM_SOURCES}
  for op in _operations(module.operation):
    name = op.name
    counts[name] = counts.get(name, 0) + 1
    location = str(op.location)
    for form, source in FORM_SOURCES.items():
      forms[form] += source in location
    result_types = [str(r.type) for r in op.results]
    if any("f64" in t for t in result_types):
      f64 += 1
    if name == "stablehlo.custom_call":
      target = str(op.attributes["call_target_name"]).strip('"')
      custom_calls.append(target)
      host += "callback" in target
    host += name in HOST_OPS
    if name == "stablehlo.constant" and result_types and _tensor_bytes(result_types[0]):
      elements = math.prod(int(d) for d in re.findall(r"(\d+)x", result_types[0]))
      splat = not str(op.attributes["value"]).startswith(("dense<[", 'dense<"'))  # one value repeated
      large += elements > LARGE_CONSTANT and not splat
    if name in COLLECTIVES:
      collectives += 1
      collective_bytes += sum(_tensor_bytes(t) for t in result_types)
    if name == "func.func" and str(op.attributes["sym_name"]).strip('"') == "main" and "arg_attrs" in op.attributes:
      attrs = [str(a) for a in op.attributes["arg_attrs"]]
      donated = sum("jax.buffer_donor" in a or "tf.aliasing_output" in a for a in attrs[:program.state_leaves])
  cost = lowered.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  per_image = lambda v: None if v is None else round(float(v) / program.images_per_device, 1)
  return dict(
      name=program.name, platform=platform, ok=error is None, **({"error": error} if error else {}),
      kind=program.kind, devices=program.num_devices, images_per_device=program.images_per_device,
      stablehlo_bytes=len(exported.mlir_module_serialized) if exported else None,
      op_counts=dict(sorted(counts.items())),
      flops_per_image=per_image(cost.get("flops")), bytes_per_image=per_image(cost.get("bytes accessed")),
      collectives_per_step=collectives, collective_bytes_per_step=collective_bytes,
      custom_calls=sorted(set(custom_calls)), host_callbacks=host, f64_ops=f64, large_constants=large,
      nondeterministic_ops=sum(counts.get(n, 0) for n in NONDETERMINISTIC), form_ops=forms,
      donated=(donated == program.state_leaves) if program.state_leaves else None)


def check(name: str, platform: str, num_devices: Optional[int] = None) -> dict:
  """describe(build(...)), or {name, platform, ok: False, error} when building or lowering fails."""
  try:
    return describe(build(name, num_devices, platform), platform)
  except Exception as e:  # pylint: disable=broad-except  (a report line, not a crash, per program)
    return dict(name=name, platform=platform, ok=False, error=f"{type(e).__name__}: {e}"[:2000])
