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
  run = study.load_run(make_run(tmp_path / "r", trained(fid_2=5.0, fid_4=7.0)))
  assert study.values_at(run, ["fid", "kid", "d_loss"], "best") == (2, dict(fid=5.0, kid=0.05, d_loss=None))
  assert study.values_at(run, ["fid", "kid", "d_loss"], "final") == (4, dict(fid=7.0, kid=0.07, d_loss=1.0))
  assert study.values_at(run, ["fid"], "best", best_by="kid") == (2, dict(fid=5.0))
  with pytest.raises(ConfigError, match="--at=last: unknown"):
    study.values_at(run, ["fid"], "last")


def test_other_code_or_hardware_is_not_pooled_unless_ignored(tmp_path):
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


def cli(*args):
  return subprocess.run([sys.executable, "-m", "dcgan_jax.study", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)


def test_command_line_folders_json_and_errors(tmp_path):
  runs = tmp_path / "runs"
  make_run(runs / "s0", trained(8.0, 4.0))
  make_run(runs / "s1", trained(9.0, 6.0), seed=1)
  (tmp_path / "empty").mkdir()
  for args, message in [((), "no runs given; pass training runs' workdirs"),
                        ((str(tmp_path / "nowhere"),), "no such directory"),
                        ((str(tmp_path / "empty"),), "not a training run's workdir (no config.json)"),
                        (("--metrics=fid,fud", str(runs)), "--metrics: no run logged fud; available: "
                                                           "d_loss, fid, g_loss, kid"),
                        (("--at=best", "--best_by=coverage", str(runs)), "--at=best: no run logged coverage")]:
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
