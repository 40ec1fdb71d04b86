"""Where one training step's time goes: a jax.profiler trace of the real (pmapped, in-memory) step,
summed per XLA op. Prints one JSON line per op (the slowest first), then one per op kind.

    python experiments/profile_step.py [--batch 128] [--steps 5] [--top 15]

Each op is matched to the model layer it comes from through the compiled HLO's metadata (op_name).
On XLA:CPU with Eigen convolutions (dcgan_jax's setting) the convolutions emit no trace events: they are
the part of the step time that no op accounts for (`untraced_ms_per_step`). With
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION` (YNNPACK,
jaxlib's default) they appear as `ynn_fusion` ops.
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from dcgan_jax.ops import convolutions

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--steps", type=int, default=5)
p.add_argument("--top", type=int, default=15)
a = p.parse_args()
convolutions.configure_xla_cpu()  # what dcgan_jax's programs run with

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dcgan_jax import parallel  # noqa: E402
from dcgan_jax import platforms  # noqa: E402
from dcgan_jax import step as step_lib  # noqa: E402
from dcgan_jax.config import Config  # noqa: E402

config = Config(preset="mnist", batch_size=a.batch, dataset="synthetic").resolved()
mesh = parallel.global_mesh()
data = parallel.replicate(np.random.default_rng(0).integers(0, 256, (60000, 28, 28, 1), np.uint8), mesh)
slots = parallel.batch_positions(mesh, a.batch // mesh.devices.size)
state = parallel.replicate(step_lib.create_train_state(config, 1), mesh)
step = parallel.pmap_step(step_lib.make_train_step(config, 1, 60000, platforms.of_mesh(mesh)), in_memory=True)
hlo = step.lower(state, slots, data).compile().as_text()
layer = {m.group(1): m.group(2) for m in re.finditer(r"%(\S+) = .*?op_name=\"([^\"]+)\"", hlo)}
for _ in range(3):  # compile and warm up
  state, _ = step(state, slots, data)
jax.block_until_ready(state)

trace_dir = tempfile.mkdtemp(prefix="dcgan_jax_trace_")
t0 = time.perf_counter()
for _ in range(a.steps):
  state, _ = step(state, slots, data)
jax.block_until_ready(state)
step_ms = (time.perf_counter() - t0) * 1e3 / a.steps  # untraced
with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
  for _ in range(a.steps):
    state, _ = step(state, slots, data)
  jax.block_until_ready(state)
events = json.load(gzip.open(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                                       recursive=True)[0]))
events = events["traceEvents"] if isinstance(events, dict) else events
per_op = collections.Counter()
for e in events:
  name = e.get("name", "")
  if e.get("ph") == "X" and not name.startswith("$") and "Thunk" not in name and "ThreadPool" not in name:
    per_op[name] += e.get("dur", 0) / 1e3 / a.steps  # ms per step
for name, ms in per_op.most_common(a.top):
  print(json.dumps(dict(op=name, ms_per_step=round(ms, 1), source=layer.get(name, ""))))
per_kind = collections.Counter()
for name, ms in per_op.items():
  per_kind[name.split(".")[0]] += ms
for kind, ms in per_kind.most_common(8):
  print(json.dumps(dict(kind=kind, ms_per_step=round(ms, 1))))
traced = sum(per_op.values())
print(json.dumps(dict(step_ms=round(step_ms, 1), traced_ms_per_step=round(traced, 1),
                      untraced_ms_per_step=round(step_ms - traced, 1))))
print(json.dumps(dict(batch=a.batch, backend=jax.default_backend(),
                      xla_flags=os.environ.get("XLA_FLAGS", ""),
                      note="ops may overlap in time (2 threads), so the sums can exceed the step time")))
