"""Checks that a change of the code changes no result: the same runs with this checkout and with an
earlier commit log the same metrics and write the same samples and generator export. One JSON line.

    python experiments/same_results_check.py --base=COMMIT --data_dir=data/tfds [--out=/tmp/same_results]

The runs (each a CLI run of `python -m dcgan_jax.main`, logging every call):
  seed:     the seed's model on Fashion-MNIST (fashion_mnist.flags), 200 steps, in memory;
  by_index: dcgan 32x32, read by index, --d_steps=2, lazy R1 (--r1_every=4), EMA, --steps_per_call=3;
  members:  dcgan 32x32, WGAN-GP with layer norm, --seeds=1,2 (two members in one program).
The base commit runs from a `git worktree` under --out, with this checkout's Python environment. Every
metrics.jsonl field but the timings (steps_per_sec, images_per_sec) must be equal, and every sample
grid, GIF and generator.json byte for byte.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMINGS = ("steps_per_sec", "images_per_sec")
RUNS = {
    "seed": ["--flagfile=fashion_mnist.flags", "--num_steps=200"],
    "by_index": ["--dataset=fashion_mnist", "--preset=dcgan", "--image_size=32", "--base_width=16",
                 "--batch_size=32", "--num_steps=60", "--d_steps=2", "--r1_weight=1", "--r1_every=4",
                 "--g_ema_decay=0.99", "--steps_per_call=3", "--in_memory=false"],
    "members": ["--dataset=fashion_mnist", "--preset=dcgan", "--image_size=32", "--base_width=16",
                "--batch_size=32", "--num_steps=30", "--loss=wasserstein", "--gp_weight=10",
                "--d_norm=layer", "--seeds=1,2"],
}
COMMON = ["--log_every=1", "--eval_every=0", "--sample_every=1000"]


def train(code_dir: str, data_dir: str, out: str) -> None:
  for name, flags in RUNS.items():
    subprocess.run([sys.executable, "-m", "dcgan_jax.main", *flags, *COMMON, f"--data_dir={data_dir}",
                    f"--workdir={os.path.join(out, name)}"], cwd=code_dir, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_dirs(out: str) -> list:
  """Every run directory under out (the members' too), relative to out."""
  return sorted(os.path.relpath(d, out) for d, _, files in os.walk(out) if "metrics.jsonl" in files)


def differences(base: str, new: str) -> list:
  found = []
  for run in run_dirs(base):
    read = lambda root: [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                         for line in open(os.path.join(root, run, "metrics.jsonl"))]
    if json.dumps(read(base)) != json.dumps(read(new)):
      found.append(f"{run}/metrics.jsonl")
    for sub in ("samples", "generator"):
      for name in sorted(os.listdir(os.path.join(base, run, sub))):
        a, b = os.path.join(base, run, sub, name), os.path.join(new, run, sub, name)
        if os.path.isfile(a) and (not os.path.isfile(b) or open(a, "rb").read() != open(b, "rb").read()):
          found.append(f"{run}/{sub}/{name}")
  return found


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--base", required=True, help="the commit to compare with")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--out", default="/tmp/same_results")
  a = p.parse_args()
  data_dir = os.path.abspath(a.data_dir)
  if os.path.exists(a.out):
    sys.exit(f"error: --out={a.out} exists; pass a new directory")
  base_code = os.path.join(a.out, "base_code")
  subprocess.run(["git", "worktree", "add", "-q", "--detach", base_code, a.base], cwd=ROOT, check=True)
  try:
    train(base_code, data_dir, os.path.join(a.out, "base"))
    train(ROOT, data_dir, os.path.join(a.out, "new"))
  finally:
    subprocess.run(["git", "worktree", "remove", "--force", base_code], cwd=ROOT, check=False)
  new_commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
  runs = run_dirs(os.path.join(a.out, "base"))
  diff = differences(os.path.join(a.out, "base"), os.path.join(a.out, "new"))
  print(json.dumps(dict(base=a.base, new=new_commit, runs=runs, same=not diff, differences=diff)))


if __name__ == "__main__":
  main()
