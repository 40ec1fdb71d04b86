"""dcgan_jax.study: runs grouped by configuration, statistics over seeds, the table (no JAX needed)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dcgan_jax import study
from dcgan_jax import writers
from dcgan_jax.config import Config, ConfigError
from helpers import ROOT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def make_run(path, records, commit=COMMIT, devices=1, **settings):
  """A workdir as the trainer writes it: config.json (the resolved Config) and metrics.jsonl."""
  config = Config(dataset="fashion_mnist", num_steps=4, **settings).resolved()
  writer = writers.RunWriter(str(path))
  writer.write_config(config, extra=dict(devices=devices, device_kind="cpu", backend="cpu",
                                         in_memory=True, num_examples=64, channels=1, git_commit=commit))
  for record in records:
    writer.write_metrics(record["step"], {k: v for k, v in record.items() if k != "step"})
  writer.close()
  return str(path)


def trained(fid_2, fid_4, d_loss=1.0):
  """A 4-step run's lines: training metrics at steps 2 and 4, evaluations after them."""
  return [dict(step=2, d_loss=d_loss + 0.5, g_loss=0.7), dict(step=2, fid=fid_2, kid=fid_2 / 100),
          dict(step=4, d_loss=d_loss, g_loss=0.8), dict(step=4, fid=fid_4, kid=fid_4 / 100)]


def test_seeds_pool_into_one_row_per_config(tmp_path):
  """Runs that differ only in their seed (and in output settings such as --log_every) pool into one row per
  configuration, with the values, count, mean and sample standard deviation (ddof 1) of each metric, and the
  markdown table shows them. Catches a population std (ddof 0), grouping on output settings, and seeds of
  another configuration pooled in."""
  fids = {(2e-4, 0): 9.0, (2e-4, 1): 10.0, (2e-4, 2): 12.5, (1e-4, 0): 20.0, (1e-4, 1): 22.0}
  runs = [study.load_run(make_run(tmp_path / f"lr{lr}_s{seed}", trained(30.0, fid), learning_rate_g=lr,
                                  seed=seed, log_every=1 + seed))  # log_every does not split groups
          for (lr, seed), fid in fids.items()]
  rows = study.table_rows(runs, ["fid", "kid", "d_loss"])
  assert [row["settings"] for row in rows] == [{"learning_rate_g": 2e-4}, {"learning_rate_g": 1e-4}]
  assert [row["seeds"] for row in rows] == [[0, 1, 2], [0, 1]]
  first = rows[0]["metrics"]["fid"]
  assert first["values"] == [9.0, 10.0, 12.5] and first["n"] == 3
  assert first["mean"] == pytest.approx(np.mean([9.0, 10.0, 12.5]))
  assert first["std"] == pytest.approx(np.std([9.0, 10.0, 12.5], ddof=1))
  assert rows[1]["metrics"]["kid"]["mean"] == pytest.approx(0.21)
  assert rows[1]["metrics"]["d_loss"]["values"] == [1.0, 1.0] and rows[1]["steps"] == [4, 4]
  table = study.format_markdown(rows, ["fid", "kid", "d_loss"])
  assert table.splitlines()[0] == "| learning_rate_g | runs | seeds | step | fid | kid | d_loss |"
  assert "| 0.0002 | 3 | 0-2 | 4 | 10.5 ± 1.8 |" in table
  assert "| 0.0001 | 2 | 0-1 | 4 | 21 ± 1.4 |" in table
  # --per_run: one row per run, the same columns.
  per_run = study.table_rows(runs, ["fid"], per_run=True)
  assert [row["metrics"]["fid"]["mean"] for row in per_run] == [9.0, 10.0, 12.5, 20.0, 22.0]
  assert per_run[3]["settings"] == {"learning_rate_g": 1e-4}
  assert f"| {tmp_path / 'lr0.0001_s0'} | 0.0001 | 1 | 0 | 4 | 20 |" in study.format_markdown(
      per_run, ["fid"], per_run=True)


def test_best_takes_the_lowest_line_of_best_by(tmp_path):
  """--at=best takes the evaluation line with the lowest --best_by (its step and every metric of that line),
  --at=final each metric's last value; an unknown --at is one error. Catches best taken per metric (mixing
  lines) or as the highest value."""
  run = study.load_run(make_run(tmp_path / "r", trained(fid_2=5.0, fid_4=7.0)))
  assert study.values_at(run, ["fid", "kid", "d_loss"], "best") == (2, dict(fid=5.0, kid=0.05, d_loss=None))
  assert study.values_at(run, ["fid", "kid", "d_loss"], "final") == (4, dict(fid=7.0, kid=0.07, d_loss=1.0))
  assert study.values_at(run, ["fid"], "best", best_by="kid") == (2, dict(fid=5.0))
  with pytest.raises(ConfigError, match="--at=last: unknown"):
    study.values_at(run, ["fid"], "last")


def test_other_code_or_hardware_is_not_pooled_unless_ignored(tmp_path):
  """Runs of another git commit (a dirty tree included) or device count are separate rows unless --ignore
  names those fields. Catches pooling runs of different code or hardware into one mean."""
  runs = [study.load_run(make_run(tmp_path / "a", trained(1.0, 2.0))),
          study.load_run(make_run(tmp_path / "b", trained(1.0, 4.0), commit=COMMIT + "-dirty", seed=1)),
          study.load_run(make_run(tmp_path / "c", trained(1.0, 6.0), devices=4, seed=2))]
  rows = study.table_rows(runs, ["fid"])
  assert [row["settings"] for row in rows] == [
      {"run.devices": 1, "run.git_commit": COMMIT}, {"run.devices": 1, "run.git_commit": COMMIT + "-dirty"},
      {"run.devices": 4, "run.git_commit": COMMIT}]
  assert "| 1 | 0123456789ab-dirty | 1 | 1 | 4 | 4 |" in study.format_markdown(rows, ["fid"])
  pooled = study.table_rows(runs, ["fid"], ignore=study.IGNORED_FIELDS + ("run.git_commit", "run.devices"))
  assert len(pooled) == 1 and pooled[0]["metrics"]["fid"]["mean"] == pytest.approx(4.0)


def test_short_runs_are_marked_and_missing_values_counted(tmp_path):
  """A run short of its --num_steps is marked (runs column and a footnote) with its step range, and a metric
  one run never logged is summarised over the runs that have it, with its count. Catches an unfinished run
  pooled silently, and a missing value taken as 0."""
  runs = [study.load_run(make_run(tmp_path / "done", trained(1.0, 3.0))),
          study.load_run(make_run(tmp_path / "short", trained(1.0, 3.0)[:2], seed=1))]
  rows = study.table_rows(runs, ["fid", "d_loss"])
  assert rows[0]["incomplete"] == [str(tmp_path / "short")] and rows[0]["steps"] == [4, 2]
  table = study.format_markdown(rows, ["fid", "d_loss"])
  assert "| 2* | 0-1 | 2-4 | 2 ± 1.4 | 1.25 ± 0.35 |" in table
  assert table.endswith(f"\\* not trained to its --num_steps: {tmp_path / 'short'}")
  assert study.format_markdown(study.table_rows(runs, ["fid"], at="best"), ["fid"]).count("| 1 ± 0 |") == 1
  # A metric one run never logged: the others' statistics, with their count.
  runs.append(study.load_run(make_run(tmp_path / "no_eval", trained(1.0, 3.0)[::2], seed=2)))
  assert "| 2 | 0-2 | 4 | 3 (n=1) |" in study.format_markdown(study.table_rows(runs[::2], ["fid"]), ["fid"])


def report(step, fid, num_samples=10000, ema=True, evaluator="/cache/fashion_mnist-28x28x1-n64-seed0-v1"):
  """An evaluate report as dcgan_jax.evaluate prints it (the keys study reads)."""
  return dict(fid=fid, kid=fid / 100, kid_std=0.001, precision=0.5, recall=0.4, coverage=10, num_classes=10,
              class_kl=0.02, classifier_score=8.0, num_samples=num_samples, num_real=10000, step=step,
              ema=ema, sample_bn="running", source="/runs/x", dataset="fashion_mnist",
              evaluator=dict(name="dcgan_jax-cnn-v1", test_accuracy=0.9, path=evaluator),
              reference=dict(fid=0.05, precision=0.87, num_samples=num_samples))


def test_evaluations_are_tabulated_and_only_comparable_ones_pooled(tmp_path):
  """--source=evaluations tabulates the reports `evaluate` recorded (the newest step's for final, the lowest
  for best), and pools only evaluations made alike (same sample count, generator, BatchNorm mode,
  evaluator). Catches FIDs at 2,000 and 10,000 samples averaged together, and the last-written report taken
  as the final step's."""
  from dcgan_jax import evaluate
  workdirs = [make_run(tmp_path / f"s{seed}", trained(9.0, 8.0), seed=seed) for seed in range(3)]
  evaluate.record(workdirs[0], report(4, 3.0))
  evaluate.record(workdirs[0], report(2, 2.0))  # --step=2 scored later: the best, not the final one
  evaluate.record(workdirs[1], report(4, 4.0))
  evaluate.record(workdirs[2], report(4, 5.0, num_samples=2000))  # fewer samples: not comparable
  runs = [study.load_run(w) for w in workdirs]
  assert runs[0].evaluations[0] == dict(
      step=4, fid=3.0, kid=0.03, kid_std=0.001, precision=0.5, recall=0.4, coverage=10, num_classes=10,
      class_kl=0.02, classifier_score=8.0, num_real=10000, reference_fid=0.05, reference_precision=0.87,
      eval=dict(num_samples=10000, ema=True, sample_bn="running",
                evaluator="/cache/fashion_mnist-28x28x1-n64-seed0-v1"))
  assert study.choose_metrics(runs, None, "evaluations") == ["fid", "kid", "precision", "recall", "coverage"]
  rows = study.table_rows(runs, ["fid", "reference_fid"], source="evaluations")
  assert [row["settings"] for row in rows] == [{"eval.num_samples": 10000}, {"eval.num_samples": 2000}]
  assert rows[0]["steps"] == [4, 4] and rows[0]["metrics"]["fid"]["values"] == [3.0, 4.0]
  assert rows[0]["metrics"]["reference_fid"]["mean"] == 0.05
  best = study.table_rows(runs[:2], ["fid"], at="best", source="evaluations")
  assert best[0]["metrics"]["fid"]["values"] == [2.0, 4.0] and best[0]["steps"] == [2, 4]
  evaluate.record(workdirs[1], report(4, 4.5))  # the same step scored again: the newer line counts
  assert study.evaluations_at(study.load_run(workdirs[1]), ["fid"])[0][:2] == (4, dict(fid=4.5))
  # The raw generator scored too: its own rows, beside the EMA generator's.
  for w, fid in zip(workdirs, (6.0, 7.0, 8.0)):
    evaluate.record(w, report(4, fid, ema=False))
  rows = study.table_rows([study.load_run(w) for w in workdirs], ["fid"], source="evaluations")
  assert [(row["settings"], row["metrics"]["fid"]["values"]) for row in rows] == [
      ({"eval.ema": True, "eval.num_samples": 10000}, [3.0, 4.5]),
      ({"eval.ema": False, "eval.num_samples": 10000}, [6.0, 7.0, 8.0]),
      ({"eval.ema": True, "eval.num_samples": 2000}, [5.0])]
  # The training log is still what says whether a run finished.
  assert rows[0]["incomplete"] == [] and study.table_rows(runs, ["fid"])[0]["steps"] == [4, 4, 4]


def test_an_unwritable_workdir_loses_no_evaluation(tmp_path, capsys):
  """evaluate.record into a folder that cannot be written prints one warning (the printed report is the only
  copy) instead of a traceback. Catches an OSError that ends evaluate after the scoring work."""
  from dcgan_jax import evaluate
  evaluate.record(str(tmp_path / "gone"), report(4, 3.0))  # no such folder: a warning, not a crash
  assert "evaluations.jsonl: not written (No such file or directory); the report above is the only copy" \
      in capsys.readouterr().err


def cli(*args):
  return subprocess.run([sys.executable, "-m", "dcgan_jax.study", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_command_line_folders_json_and_errors(tmp_path):
  """The study command line: each bad input (no runs, a missing or non-run folder, an unknown metric,
  --best_by never logged, no evaluations) is one line, exit 2; a folder of runs stands for them; a torn
  metrics line is skipped with a warning; JSON output has every run's values. Catches tracebacks for bad
  input and a torn line that ends the study."""
  runs = tmp_path / "runs"
  make_run(runs / "s0", trained(8.0, 4.0))
  make_run(runs / "s1", trained(9.0, 6.0), seed=1)
  (tmp_path / "empty").mkdir()
  for args, message in [((), "no runs given; pass training runs' workdirs"),
                        ((str(tmp_path / "nowhere"),), "no such directory"),
                        ((str(tmp_path / "empty"),), "not a training run's workdir (no config.json)"),
                        (("--metrics=fid,fud", str(runs)), "--metrics: no run logged fud; available: "
                                                           "d_loss, fid, g_loss, kid"),
                        (("--at=best", "--best_by=coverage", str(runs)), "--at=best: no run logged coverage"),
                        (("--source=evaluations", str(runs)), "--source=evaluations: no run has an "
                                                              "evaluations.jsonl; score them first")]:
    r = cli(*args)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and message in r.stderr, (args, r.stderr)
  with open(runs / "s1" / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "d_lo')  # a line cut short by a killed run
  r = cli(str(runs))  # a folder of workdirs stands for them
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines()[2] == "| 2 | 0-1 | 4 | 5 ± 1.4 | 0.05 ± 0.014 |"
  assert "metrics.jsonl:5: not a JSON line; skipped" in r.stderr
  r = cli("--format=json", "--at=best", "--metrics=fid", str(runs / "s0"), str(runs / "s1"))
  assert r.returncode == 0, r.stderr
  (row,) = [json.loads(line) for line in r.stdout.splitlines()]
  assert row["metrics"]["fid"]["values"] == [4.0, 6.0] and row["steps"] == [4, 4]
  (runs / "s0" / "config.json").write_text("{")
  r = cli(str(runs))
  assert r.returncode == 2 and "config.json: not a config.json written by dcgan_jax.main" in r.stderr
