"""dcgan_jax.study: runs grouped by configuration, statistics over seeds, the table (no JAX needed)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dcgan_jax.studies import study_table
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
  runs = [study_table.load_run(make_run(tmp_path / f"lr{lr}_s{seed}", trained(30.0, fid), learning_rate_g=lr,
                                  seed=seed, log_every=1 + seed))  # log_every does not split groups
          for (lr, seed), fid in fids.items()]
  rows = study_table.table_rows(runs, ["fid", "kid", "d_loss"])
  assert [row["settings"] for row in rows] == [{"learning_rate_g": 2e-4}, {"learning_rate_g": 1e-4}]
  assert [row["seeds"] for row in rows] == [[0, 1, 2], [0, 1]]
  first = rows[0]["metrics"]["fid"]
  assert first["values"] == [9.0, 10.0, 12.5] and first["n"] == 3
  assert first["mean"] == pytest.approx(np.mean([9.0, 10.0, 12.5]))
  assert first["std"] == pytest.approx(np.std([9.0, 10.0, 12.5], ddof=1))
  assert rows[1]["metrics"]["kid"]["mean"] == pytest.approx(0.21)
  assert rows[1]["metrics"]["d_loss"]["values"] == [1.0, 1.0] and rows[1]["steps"] == [4, 4]
  table = study_table.format_markdown(rows, ["fid", "kid", "d_loss"])
  assert table.splitlines()[0] == "| learning_rate_g | runs | seeds | step | fid | kid | d_loss |"
  assert "| 0.0002 | 3 | 0-2 | 4 | 10.5 ± 1.8 |" in table
  assert "| 0.0001 | 2 | 0-1 | 4 | 21 ± 1.4 |" in table
  # --per_run: one row per run, the same columns.
  per_run = study_table.table_rows(runs, ["fid"], per_run=True)
  assert [row["metrics"]["fid"]["mean"] for row in per_run] == [9.0, 10.0, 12.5, 20.0, 22.0]
  assert per_run[3]["settings"] == {"learning_rate_g": 1e-4}
  assert f"| {tmp_path / 'lr0.0001_s0'} | 0.0001 | 1 | 0 | 4 | 20 |" in study_table.format_markdown(
      per_run, ["fid"], per_run=True)


def test_best_takes_the_lowest_line_of_best_by(tmp_path):
  """--at=best takes the evaluation line with the lowest --best_by (its step and every metric of that line),
  --at=final each metric's last value; an unknown --at is one error. Catches best taken per metric (mixing
  lines) or as the highest value."""
  run = study_table.load_run(make_run(tmp_path / "r", trained(fid_2=5.0, fid_4=7.0)))
  assert study_table.values_at(run, ["fid", "kid", "d_loss"], "best") == (2, dict(fid=5.0, kid=0.05, d_loss=None))
  assert study_table.values_at(run, ["fid", "kid", "d_loss"], "final") == (4, dict(fid=7.0, kid=0.07, d_loss=1.0))
  assert study_table.values_at(run, ["fid"], "best", best_by="kid") == (2, dict(fid=5.0))
  with pytest.raises(ConfigError, match="--at=last: unknown"):
    study_table.values_at(run, ["fid"], "last")


def test_other_code_or_hardware_is_not_pooled_unless_ignored(tmp_path):
  """Runs of another git commit (a dirty tree included) or device count are separate rows unless --ignore
  names those fields. Catches pooling runs of different code or hardware into one mean."""
  runs = [study_table.load_run(make_run(tmp_path / "a", trained(1.0, 2.0))),
          study_table.load_run(make_run(tmp_path / "b", trained(1.0, 4.0), commit=COMMIT + "-dirty", seed=1)),
          study_table.load_run(make_run(tmp_path / "c", trained(1.0, 6.0), devices=4, seed=2))]
  rows = study_table.table_rows(runs, ["fid"])
  assert [row["settings"] for row in rows] == [
      {"run.devices": 1, "run.git_commit": COMMIT}, {"run.devices": 1, "run.git_commit": COMMIT + "-dirty"},
      {"run.devices": 4, "run.git_commit": COMMIT}]
  assert "| 1 | 0123456789ab-dirty | 1 | 1 | 4 | 4 |" in study_table.format_markdown(rows, ["fid"])
  pooled = study_table.table_rows(runs, ["fid"], ignore=study_table.IGNORED_FIELDS + ("run.git_commit", "run.devices"))
  assert len(pooled) == 1 and pooled[0]["metrics"]["fid"]["mean"] == pytest.approx(4.0)


def test_short_runs_are_marked_and_missing_values_counted(tmp_path):
  """A run short of its --num_steps is marked (runs column and a footnote) with its step range, and a metric
  one run never logged is summarised over the runs that have it, with its count. Catches an unfinished run
  pooled silently, and a missing value taken as 0."""
  runs = [study_table.load_run(make_run(tmp_path / "done", trained(1.0, 3.0))),
          study_table.load_run(make_run(tmp_path / "short", trained(1.0, 3.0)[:2], seed=1))]
  rows = study_table.table_rows(runs, ["fid", "d_loss"])
  assert rows[0]["incomplete"] == [str(tmp_path / "short")] and rows[0]["steps"] == [4, 2]
  table = study_table.format_markdown(rows, ["fid", "d_loss"])
  assert "| 2* | 0-1 | 2-4 | 2 ± 1.4 | 1.25 ± 0.35 |" in table
  assert table.endswith(f"\\* not trained to its --num_steps: {tmp_path / 'short'}")
  assert study_table.format_markdown(study_table.table_rows(runs, ["fid"], at="best"), ["fid"]).count("| 1 ± 0 |") == 1
  # A metric one run never logged: the others' statistics, with their count.
  runs.append(study_table.load_run(make_run(tmp_path / "no_eval", trained(1.0, 3.0)[::2], seed=2)))
  assert "| 2 | 0-2 | 4 | 3 (n=1) |" in study_table.format_markdown(study_table.table_rows(runs[::2], ["fid"]), ["fid"])


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
  runs = [study_table.load_run(w) for w in workdirs]
  assert runs[0].evaluations[0] == dict(
      step=4, fid=3.0, kid=0.03, kid_std=0.001, precision=0.5, recall=0.4, coverage=10, num_classes=10,
      class_kl=0.02, classifier_score=8.0, num_real=10000, reference_fid=0.05, reference_precision=0.87,
      eval=dict(num_samples=10000, ema=True, sample_bn="running", features="evaluator",
                evaluator="/cache/fashion_mnist-28x28x1-n64-seed0-v1"))
  assert study_table.choose_metrics(runs, None, "evaluations") == ["fid", "kid", "precision", "recall", "coverage"]
  rows = study_table.table_rows(runs, ["fid", "reference_fid"], source="evaluations")
  assert [row["settings"] for row in rows] == [{"eval.num_samples": 10000}, {"eval.num_samples": 2000}]
  assert rows[0]["steps"] == [4, 4] and rows[0]["metrics"]["fid"]["values"] == [3.0, 4.0]
  assert rows[0]["metrics"]["reference_fid"]["mean"] == 0.05
  best = study_table.table_rows(runs[:2], ["fid"], at="best", source="evaluations")
  assert best[0]["metrics"]["fid"]["values"] == [2.0, 4.0] and best[0]["steps"] == [2, 4]
  evaluate.record(workdirs[1], report(4, 4.5))  # the same step scored again: the newer line counts
  assert study_table.evaluations_at(study_table.load_run(workdirs[1]), ["fid"])[0][:2] == (4, dict(fid=4.5))
  # The raw generator scored too: its own rows, beside the EMA generator's.
  for w, fid in zip(workdirs, (6.0, 7.0, 8.0)):
    evaluate.record(w, report(4, fid, ema=False))
  rows = study_table.table_rows([study_table.load_run(w) for w in workdirs], ["fid"], source="evaluations")
  assert [(row["settings"], row["metrics"]["fid"]["values"]) for row in rows] == [
      ({"eval.ema": True, "eval.num_samples": 10000}, [3.0, 4.5]),
      ({"eval.ema": False, "eval.num_samples": 10000}, [6.0, 7.0, 8.0]),
      ({"eval.ema": True, "eval.num_samples": 2000}, [5.0])]
  # The training log is still what says whether a run finished.
  assert rows[0]["incomplete"] == [] and study_table.table_rows(runs, ["fid"])[0]["steps"] == [4, 4, 4]


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
  row, last = [json.loads(line) for line in r.stdout.splitlines()]
  assert row["metrics"]["fid"]["values"] == [4.0, 6.0] and row["steps"] == [4, 4]
  assert last == {"comparisons": {"fid": []}}  # one configuration: no pairs
  (runs / "s0" / "config.json").write_text("{")
  r = cli(str(runs))
  assert r.returncode == 2 and "config.json: not a config.json written by dcgan_jax.main" in r.stderr


# ---------------------------------------------------------------------------------------------------
# Statistics over seeds (study_stats.py), each against a computation written out here
# ---------------------------------------------------------------------------------------------------
from dcgan_jax.studies import study_report  # noqa: E402
from dcgan_jax.studies import study_stats  # noqa: E402


def test_permutation_p_is_the_exact_share_of_relabelings_and_holm_steps_down():
  """compare()'s p for 3 vs 4 seeds equals the share of all C(7, 3) relabelings whose |difference of
  means| is at least the observed one (enumerated here); Holm's adjusted p-values equal the step-down
  definition worked out by hand, in the input's order. Catches a one-sided test, a p from random
  permutations where all can be enumerated, Bonferroni instead of Holm, and adjusted p-values
  returned in sorted order."""
  import itertools
  a, b = [9.0, 10.0, 12.5], [11.0, 13.0, 14.5, 12.0]
  pooled, observed = np.array(a + b), abs(np.mean(a) - np.mean(b))
  extreme = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean()) >= observed - 1e-12
             for i in itertools.combinations(range(7), 3)]
  result = study_stats.compare(a, b)
  assert result["permutations"] == "exact" and result["p"] == pytest.approx(np.mean(extreme))
  assert result["difference"] == pytest.approx(np.mean(a) - np.mean(b))
  # Holm: sorted p 0.01 (x4), 0.02 (x3), 0.03 (x2), 0.04 (x1) -> 0.04, 0.06, 0.06, 0.06 (monotone)
  assert study_stats.holm([0.03, 0.01, 0.04, 0.02]) == pytest.approx([0.06, 0.04, 0.06, 0.06])
  assert study_stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_bootstrap_interval_matches_a_plain_numpy_bootstrap_and_expected_best_its_subsets():
  """mean_interval() against a percentile bootstrap written with numpy (other random draws: within 2%
  of the spread), the same for the difference of two means, and expected_best() against the mean of
  the best over every k-subset (itertools), lower- and higher-is-better. Catches an interval of
  another level, a standard error instead of a bootstrap, a paired bootstrap of unpaired samples,
  and the worst of k instead of the best."""
  import itertools
  rng = np.random.default_rng(1)
  x, y = rng.normal(10.0, 2.0, 8), rng.normal(12.0, 1.0, 6)
  draws = rng.choice(x, size=(20_000, len(x))).mean(axis=1)
  ci = study_stats.mean_interval(x)
  spread = x.max() - x.min()
  assert ci["low"] == pytest.approx(np.percentile(draws, 2.5), abs=0.02 * spread)
  assert ci["high"] == pytest.approx(np.percentile(draws, 97.5), abs=0.02 * spread)
  differences = draws - rng.choice(y, size=(20_000, len(y))).mean(axis=1)
  pair = study_stats.compare(x, y)
  assert pair["low"] == pytest.approx(np.percentile(differences, 2.5), abs=0.02 * spread)
  assert pair["high"] == pytest.approx(np.percentile(differences, 97.5), abs=0.02 * spread)
  assert study_stats.mean_interval([3.0]) is None and study_stats.compare([1.0, 2.0], [3.0]) is None
  values = [7.0, 3.0, 5.0, 9.0, 4.0]
  for lower in (True, False):
    best = min if lower else max
    want = [np.mean([best(c) for c in itertools.combinations(values, k)]) for k in range(1, 6)]
    assert study_stats.expected_best(values, lower) == pytest.approx(want)


def test_a_real_difference_is_found_and_seed_noise_is_not(tmp_path):
  """Synthetic studies of 8 seeds per configuration: learning rates whose FIDs differ by 4 standard
  deviations of the seeds' spread are told apart (Holm-adjusted p < 0.05, "A > B"); two whose seeds
  gave the same values in another order, up to 1/10 of that spread, are not; a configuration with one
  seed is "too few seeds". The table's statistics section says so. Catches a test that calls seed noise
  a difference, or misses a large one."""
  rng = np.random.default_rng(0)
  base = rng.normal(12.0, 2.0, 8)
  fids = {1e-4: base + 8.0, 2e-4: base, 3e-4: rng.permutation(base) + rng.normal(0.0, 0.2, 8)}
  runs = [study_table.load_run(make_run(tmp_path / f"lr{lr}_s{s}", trained(30.0, float(fid)), learning_rate_g=lr,
                                  seed=s))
          for lr, values in fids.items() for s, fid in enumerate(values)]
  runs.append(study_table.load_run(make_run(tmp_path / "lr5e-4_s0", trained(30.0, 11.0), learning_rate_g=5e-4)))
  rows = study_table.table_rows(runs, ["fid"])
  verdicts = {(p["a"], p["b"]): p["verdict"] for p in study_table.comparisons(rows, ["fid"])["fid"]}
  assert verdicts[("learning_rate_g=0.0001", "learning_rate_g=0.0002")] == \
      "learning_rate_g=0.0001 > learning_rate_g=0.0002"
  assert verdicts[("learning_rate_g=0.0002", "learning_rate_g=0.0003")] == "no difference shown"
  assert verdicts[("learning_rate_g=0.0002", "learning_rate_g=0.0005")] == "too few seeds"
  text = study_report.format_statistics(rows, ["fid"], study_table.comparisons(rows, ["fid"]))
  assert "| learning_rate_g=0.0005 | — (1 seed) |" in text and "| fid | learning_rate_g=0.0001 |" in text
  single = study_table.table_rows(runs[-1:], ["fid"])
  assert study_report.format_statistics(single, ["fid"], {}).startswith("No intervals or comparisons")


def test_at_step_takes_each_run_up_to_that_step(tmp_path):
  """--at=step=N: each metric's last value logged at or before step N (the evaluation at 2 for N = 3),
  and an unknown --at is a ConfigError. Catches the final values whatever N is, and the first line
  after N."""
  run = study_table.load_run(make_run(tmp_path / "r", trained(8.0, 4.0)))
  assert study_table.values_at(run, ["fid", "d_loss"], "step=3") == (2, {"fid": 8.0, "d_loss": 1.5})
  assert study_table.values_at(run, ["fid"], "step=4") == (4, {"fid": 4.0})
  with pytest.raises(ConfigError, match="--at=later: unknown"):
    study_table.values_at(run, ["fid"], "later")
