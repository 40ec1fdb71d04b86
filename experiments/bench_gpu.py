"""Side-by-side GPU throughput, seed model: dcgan_jax against ../shared/bench's PyTorch eager and plain
Flax references, batches 128 / 1024 / 8192, float32 and bfloat16, interleaved repeats, medians; at
batch 128 also 4 and 16 members in one program (--seeds; images/s is their total). Then the FID
Inception network's feature throughput (experiments/inception_throughput.py).

At batch 128 also two --invariant_groups=16 runs (first repeat only): their cost, and whether both end
with one final state (their `state_sha256`; XLA:GPU's deterministic mode is on with groups).

Made to run once on the device tool's H200 (no network, no TensorFlow there), inside its 15 minutes:

  # here, once: copy the references and Fashion-MNIST's train images (the references read them) into
  # .bench/ (.gitignore'd; 26 MB, within the device tool's 64 MiB)
  python experiments/bench_gpu.py --stage
  # on the device: device.run(command="python experiments/bench_gpu.py --out=$OUT", carry=[".bench"])

Every run is a subprocess with a time limit, and its JSON line is appended to OUT/gpu.jsonl as soon as
it ends, so a run cut short still returns what it measured. At the end one summary line per
configuration (median images/s). dcgan_jax's runs share a persistent XLA compilation cache, so a
configuration compiles once; `compile_sec` of the first repeat is the cold compile.

Tested on CPU with small sizes: python experiments/bench_gpu.py --device=cpu --batches=8 --steps=2
"""
import argparse
import collections
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE = os.path.join(ROOT, ".bench")
IDX = "train-images-idx3-ubyte.gz"


def stage(bench_dir: str, idx_dir: str) -> None:
  """Copies the reference scripts and the images they read into .bench/ (ignored by git)."""
  os.makedirs(STAGE, exist_ok=True)
  for name in ("common.py", "ref_jax.py", "ref_torch.py"):
    shutil.copy(os.path.join(bench_dir, name), STAGE)
  shutil.copy(os.path.join(idx_dir, IDX), STAGE)
  print(f"staged into {STAGE}: " + ", ".join(sorted(os.listdir(STAGE))))


def configurations(batches, steps_for, device):
  """(name, command, cwd) of every run of one repeat, interleaved by batch size."""
  py = sys.executable
  runs = []
  for b in batches:
    steps = steps_for(b)
    # Launch-bound at small batches: K steps per call (one lax.scan on the GPU) are what removes the
    # host from the loop; at 8192 one step is long enough by itself.
    k = 16 if b <= 128 else (4 if b <= 1024 else 1)
    for dtype in ("float32", "bfloat16"):
      for kk in sorted({1, k}):
        if dtype == "bfloat16" and kk != k:
          continue
        runs.append((f"dcgan_jax b{b} {dtype} k{kk}",
                     [py, "-m", "dcgan_jax.benchmark", "--preset=mnist", f"--batch_size={b}",
                      f"--steps={steps}", "--warmup=2", f"--compute_dtype={dtype}",
                      f"--steps_per_call={kk}"], ROOT))
    if b == 128:  # many members in one program (--seeds): the chip that one run leaves idle; both
      # member forms, to choose --members_form=auto's GPU entry (platforms.MEMBERS_FORM) by measurement
      for members in (4, 16):
        for form in ("dispatch", "vmap"):
          runs.append((f"dcgan_jax b{b} float32 k{k} members{members} {form}",
                       [py, "-m", "dcgan_jax.benchmark", "--preset=mnist", f"--batch_size={b}",
                        f"--steps={steps}", "--warmup=2", f"--steps_per_call={k}",
                        f"--seeds=0-{members - 1}", f"--members_form={form}"], ROOT))
    if b == 128:  # --invariant_groups: its cost, and two runs whose states must be bitwise equal
      for run in (1, 2):  # (XLA:GPU's deterministic mode is on with groups: convolutions.py)
        runs.append((f"dcgan_jax b{b} float32 k{k} invariant16 run{run}",
                     [py, "-m", "dcgan_jax.benchmark", "--preset=mnist", f"--batch_size={b}",
                      f"--steps={steps}", "--warmup=2", f"--steps_per_call={k}", "--invariant_groups=16"],
                     ROOT))
    runs.append((f"torch-eager b{b}", [py, "ref_torch.py", "--batch", str(b), "--steps", str(steps),
                                        "--warmup", "10", "--alternating", "--device", device], STAGE))
    runs.append((f"jax-flax-jit b{b}", [py, "ref_jax.py", "--batch", str(b), "--steps", str(steps),
                                         "--warmup", "10", "--alternating"], STAGE))
  # The FID Inception network's throughput (inception_metrics.Features), once per repeat.
  runs.append(("inception features 32x32", [py, "experiments/inception_throughput.py", "--images=5000",
                                            "--per_device=200"], ROOT))
  return runs


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--stage", action="store_true", help="copy the references and data into .bench/")
  p.add_argument("--bench_dir", default=os.path.join(ROOT, "..", "shared", "bench"))
  p.add_argument("--idx_dir", default="/usr/share/datasets/fashion-mnist")
  p.add_argument("--out", default=os.environ.get("OUT") or ROOT)
  p.add_argument("--batches", default="128,1024,8192")
  p.add_argument("--steps", type=int, default=0, help="timed steps per run (0: by batch size)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--timeout", type=int, default=150, help="seconds per run")
  p.add_argument("--device", default="cuda", help="ref_torch.py's --device")
  args = p.parse_args()
  if args.stage:
    stage(args.bench_dir, args.idx_dir)
    return
  if not os.path.exists(os.path.join(STAGE, IDX)):
    sys.exit("error: .bench/ is not staged; run `python experiments/bench_gpu.py --stage` first and "
             "carry .bench")
  batches = [int(b) for b in args.batches.split(",")]
  steps_for = lambda b: args.steps or max(20, min(200, 200 * 1024 // b))
  env = dict(os.environ, FASHION_MNIST_DIR=STAGE, PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="xla_cache_"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "gpu.jsonl")
  results, digests = collections.defaultdict(list), collections.defaultdict(set)
  t_start = time.time()
  for r in range(args.repeats):
    for name, cmd, cwd in configurations(batches, steps_for, args.device):
      if r and "invariant" in name:  # (two grouped runs are the comparison; their compile is long)
        continue
      t0 = time.time()
      try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=args.timeout)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        result = json.loads(lines[-1]) if proc.returncode == 0 and lines else dict(
            error=f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:] or ''}",
            stderr_tail=proc.stderr[-3000:])  # in gpu.jsonl only: to diagnose without a second run
      except subprocess.TimeoutExpired:
        result = dict(error=f"timed out after {args.timeout} s")
      result.update(run=name, repeat=r, wall_sec=round(time.time() - t0, 1))
      with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")
      print(json.dumps({k: result.get(k) for k in ("run", "repeat", "images_per_sec", "compile_sec",
                                                     "wall_sec", "error")}), flush=True)
      if "images_per_sec" in result:
        results[name].append(result["images_per_sec"])
      if "state_sha256" in result:
        digests[name.split(" run")[0]].add(result["state_sha256"])
  for name, ips in results.items():
    print(json.dumps(dict(summary=name, median_images_per_sec=round(statistics.median(ips)),
                          runs=[round(x) for x in ips])))
  for name, found in digests.items():
    if "invariant" in name:  # every run and repeat of one configuration: one final state
      print(json.dumps(dict(summary=name, bitwise_equal_runs=len(found) == 1, digests=sorted(found))))
  print(f"total {time.time() - t_start:.0f} s; lines in {path}")


if __name__ == "__main__":
  main()
