"""Exports every accelerator program users run (dcgan_jax/programs.py's CONFIGURATIONS) for GPU and TPU on
this machine, without the hardware, and prints one JSON line per program and platform.

    python experiments/accelerator_check.py --platforms=cuda,tpu [--devices=8] [--only=mnist_b128_f32] [--brief]

Keys: name, platform, ok (else error), op_counts, flops_per_image, bytes_per_image, collectives_per_step,
collective_bytes_per_step, custom_calls, host_callbacks, f64_ops, large_constants, nondeterministic_ops,
donated, devices, images_per_device, stablehlo_bytes, seconds (to build and lower here). Their meanings:
dcgan_jax/programs.py. The training programs run over --devices devices (virtual CPU devices here; the
programs' collectives and per-device shapes are those of a --devices GPU or TPU mesh). Exit status 1 when a
program fails to export.
"""
import argparse
import json
import os
import sys
import time

# Dense peak FLOP/s of one H100 SXM5 and one H200 SXM (the same compute; NVIDIA's data sheets, without
# sparsity): float32 on CUDA cores, TF32 and bfloat16 on tensor cores (XLA's default precision lets
# float32 convolutions and matrix products use TF32 on these GPUs).
PEAKS = {"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12}


def cost_table(reports) -> str:
  """A markdown table: FLOPs per image per step and the images/s they allow at each peak."""
  rows = ["| program | GFLOP / image | bound at FP32 | at TF32 | at BF16 |", "|---|---|---|---|---|"]
  for r in reports:
    if r["ok"] and r["platform"] == reports[0]["platform"] and r["flops_per_image"]:
      f = r["flops_per_image"]
      bounds = [f"{PEAKS[p] / f / 1e3:,.0f}k" for p in ("fp32", "tf32", "bf16")]
      rows.append(f"| {r['name']} | {f / 1e9:.3f} | " + " | ".join(bounds) + " |")
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("--platforms", default="cuda,tpu", help="jax.export platforms, comma-separated")
  parser.add_argument("--devices", type=int, default=8, help="devices of the training mesh (1..64)")
  parser.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
  parser.add_argument("--brief", action="store_true", help="leave op_counts out (shorter lines)")
  parser.add_argument("--table", action="store_true",
                      help="then a markdown table: FLOPs per image and the images/s each peak allows")
  args = parser.parse_args()
  if not 1 <= args.devices <= 64:
    sys.exit(f"error: --devices={args.devices}: must be in 1..64")
  # Virtual CPU devices for the mesh, set before JAX starts; the programs never run here.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
  from dcgan_jax import programs  # pylint: disable=g-import-not-at-top

  names = [n for n in args.only.split(",") if n] or list(programs.CONFIGURATIONS)
  unknown = sorted(set(names) - set(programs.CONFIGURATIONS))
  if unknown:
    sys.exit(f"error: --only: unknown configuration(s) {unknown}; known: {sorted(programs.CONFIGURATIONS)}")
  failed, reports = 0, []
  for name in names:
    for platform in args.platforms.split(","):
      t0 = time.time()
      report = programs.check(name, platform, args.devices)
      report["seconds"] = round(time.time() - t0, 1)
      if args.brief:
        report.pop("op_counts", None)
      failed += not report["ok"]
      reports.append(report)
      print(json.dumps(report), flush=True)
  if args.table:
    print(cost_table(reports))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
