"""What a program does differently per platform, decided in one place.

    policy = platforms.of_mesh(mesh)          # the devices the step is compiled for
    policy.conv_form(exact)                   # how the models compute convolutions (convolutions.py)
    policy.branches_skip_work                 # lazy R1 as a lax.cond, or weighted by 0 (step.py)
    policy.scan_steps                         # --steps_per_call as one lax.scan, or dispatched (parallel.py)
    policy.members_form(requested)            # --members_form=auto resolved (train.py)
    policy.unroll_loops                       # fixed-length loops written out (randomness.permuted_index)

Every choice is the same mathematics computed another way; none changes what a run means. Each is made
for the platform a program is *compiled for*, which is not always JAX's default backend: the host
reader compiles its data order for the CPU on a GPU host (HOST), and programs.py builds GPU and TPU
programs on a CPU-only machine (Policy("gpu")). `default()` and `backend_name()` are the only places that
ask JAX for its default backend.
"""

import dataclasses

import jax

# --members_form=auto, per platform. XLA:CPU: dispatch, measured (docs/reproducibility.md: 4 vmapped
# members train at 0.6x the images/s of 4 dispatched ones; vmapped convolution parameters become grouped
# convolutions). GPU and TPU: not measured yet (experiments/bench_gpu.py times both forms), so until
# then the form that is bitwise the single runs.
MEMBERS_FORM = {"cpu": "dispatch", "gpu": "dispatch", "tpu": "dispatch"}


@dataclasses.dataclass(frozen=True)
class Policy:
  """The choices for programs compiled for `platform` (a jax Device's .platform: "cpu", "gpu", "tpu")."""
  platform: str

  def conv_form(self, exact: bool = False) -> str:
    """The models' convolution form (convolutions.py): "exact" (the patches form, for
    --invariant_groups: exact is set), "cpu" (the XLA:CPU rewrites) or "lax" (XLA's own ops)."""
    if exact:
      return "exact"
    return "cpu" if self.platform == "cpu" else "lax"

  @property
  def branches_skip_work(self) -> bool:
    """Whether a `lax.cond` whose branches hold convolutions saves the untaken branch's work. Not on
    XLA:CPU: there a convolution inside a conditional's branch takes a far slower path (like one inside
    a loop body, jax-ml/jax#12868): the lazy R1 step as a lax.cond took 10.0 s per step against 0.32 s
    for R1 on every update (`bash experiments/variants_bench.sh`, docs/variants.md)."""
    return self.platform != "cpu"

  @property
  def scan_steps(self) -> bool:
    """Whether --steps_per_call > 1 runs its steps as one lax.scan (parallel.make_multi_step): on
    accelerators, so the host does not keep them waiting; not on XLA:CPU, where convolutions in a loop
    body take a far slower path and a dispatch costs microseconds against a step's milliseconds."""
    return self.platform != "cpu"

  def members_form(self, requested: str) -> str:
    """"dispatch" or "vmap": --members_form, with auto resolved for the platform (MEMBERS_FORM)."""
    return MEMBERS_FORM.get(self.platform, "dispatch") if requested == "auto" else requested

  @property
  def unroll_loops(self) -> bool:
    """Whether short fixed-length loops (the data order's 128 shuffle rounds) are written out: on
    accelerators one fused kernel instead of a launch per iteration; on XLA:CPU a rolled loop (written
    out, 128 rounds cost ~4 s of compile time). The same operations either way: the same result."""
    return self.platform != "cpu"


HOST = Policy("cpu")  # programs on this host's CPU (the random-access reader's data order)


def of_mesh(mesh) -> Policy:
  """The policy for programs over `mesh`'s devices (one platform per mesh)."""
  return Policy(mesh.devices.flat[0].platform)


def default() -> Policy:
  """The policy for programs on JAX's default backend (sampling, evaluation, tools outside a mesh)."""
  return Policy(jax.default_backend())


def backend_name() -> str:
  """JAX's default backend ("cpu", "gpu", "tpu"), for records (config.json, benchmarks)."""
  return jax.default_backend()
