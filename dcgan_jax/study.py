"""Command line: many training runs in one table, for reproducibility studies (seeds x configs).

    python -m dcgan_jax.study runs/*                     # one row per config: mean ± std over its seeds
    python -m dcgan_jax.study runs/                      # the same: a folder of workdirs stands for them
    python -m dcgan_jax.study --at=best runs/*           # each run at its best in-training FID
    python -m dcgan_jax.study --per_run runs/*           # one row per run
    python -m dcgan_jax.study --format=json runs/*       # one JSON line per row, every run's values
    python -m dcgan_jax.study --source=evaluations runs/ # the scores of `python -m dcgan_jax.evaluate`
    python -m dcgan_jax.study --report=out runs/lr       # also out/index.html: plots, grids, verdicts

Runs are grouped by their configuration (config.json), leaving out the seed and the settings that do
not change what is trained (where and how often a run logs, samples, evaluates and checkpoints:
study_table.IGNORED_FIELDS), plus what the run recorded about where it ran: backend, device kind,
number of devices and the code's git commit (runs of other code are not pooled; `--ignore=run.git_commit` pools them, e.g.
across commits that only changed documentation). The table's columns are the settings that differ
between groups, `runs`, `seeds`, `step` (where the values were taken) and one column per metric: mean ±
sample standard deviation (ddof 1) over the group's runs, or the value alone for a single run. Below
the table: each configuration's 95% interval of the mean, every pair's difference with a permutation
test (Holm-adjusted), and the expected best of k seeds (study_stats.py says how each is computed).

Metrics are any keys of metrics.jsonl: training ones (d_loss, g_loss, D(x) as d_real, ...) and the
in-training evaluation's (fid, kid, coverage, class_kl, and *_raw for the raw generator next to the EMA
one). `--at=final` takes each metric's last logged value; `--at=best` the evaluation line with the
lowest --best_by (a run's best checkpoint, `<workdir>/best`). In-training scores use --eval_samples
samples (FID is biased upwards at small counts), so they compare runs with the same --eval_samples (a
grouping setting).

`--source=evaluations` tabulates instead what `python -m dcgan_jax.evaluate --workdir=W` recorded in
W/evaluations.jsonl (10,000 samples by default): fid, kid, precision, recall, coverage, class_kl,
classifier_score, and the real-data floor's as reference_fid, .... `--at=final` takes the evaluation of
a run's newest step (of several, the last written), `--at=best` the one with the lowest --best_by; that
evaluation's sample count, generator (EMA or raw), BatchNorm mode and evaluator join the grouping
settings (as eval.<name>), so scores made differently are not pooled.

Reads only config.json, metrics.jsonl and evaluations.jsonl: no JAX, no TensorFlow.
"""

import json
import sys

from absl import flags

from dcgan_jax import cli
from dcgan_jax.studies import study_table
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.cli import exit_with_error
from dcgan_jax.config import ConfigError


def define_flags():
  """The command line's flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_enum("source", "metrics", ["metrics", "evaluations"], "metrics: what training logged "
                    "(metrics.jsonl); evaluations: the reports of python -m dcgan_jax.evaluate "
                    "(evaluations.jsonl).")
  flags.DEFINE_string("metrics", None, "Comma-separated keys (default: fid, kid, coverage, fid_raw, "
                      "kid_raw where logged, else d_loss, g_loss; with --source=evaluations fid, kid, "
                      "precision, recall, coverage).")
  flags.DEFINE_string("at", "final", "final: each metric's last value (with --source=evaluations: the "
                      "newest step's evaluation); best: the evaluation with the lowest --best_by; step=N: "
                      "as final, over the steps up to N.")
  flags.DEFINE_string("best_by", "fid", "The metric --at=best minimises.")
  flags.DEFINE_bool("per_run", False, "One row per run instead of one per configuration.")
  flags.DEFINE_enum("format", "markdown", ["markdown", "json"], "markdown: a table; json: one line per row.")
  flags.DEFINE_list("ignore", [], "More settings to leave out of the grouping (e.g. compute_dtype, "
                    "run.devices), so runs differing in them are pooled.")
  flags.DEFINE_string("report", None, "Also write DIR/index.html (images beside it): the table with "
                      "intervals, the pairwise verdicts, curves with bands over seeds, sample grids.")


def main(argv):
  paths = argv[1:]
  if not paths:
    exit_with_error("no runs given; pass training runs' workdirs (or a folder of them), "
                    "e.g. python -m dcgan_jax.study runs/*")
  try:
    if flags.FLAGS.report:
      workdir_lib.check_writable(flags.FLAGS.report, "--report")
    runs = [study_table.load_run(w) for w in study_table.find_workdirs(paths)]
    source = flags.FLAGS.source
    if source == "evaluations" and not any(run.evaluations for run in runs):
      raise ConfigError(f"--source=evaluations: no run has an {workdir_lib.EVALUATIONS}; score them first with "
                        "python -m dcgan_jax.evaluate --workdir=W")
    metrics = study_table.choose_metrics(runs, flags.FLAGS.metrics, source)
    if not metrics:
      raise ConfigError("the runs logged no metrics yet (empty metrics.jsonl); study them after training")
    if flags.FLAGS.at == "best" and not any(r.get(flags.FLAGS.best_by) is not None
                                            for run in runs for r in run.lines(source)):
      raise ConfigError(f"--at=best: no run logged {flags.FLAGS.best_by}; train with --eval_every=N, or "
                        "use --at=final")
    rows = study_table.table_rows(runs, metrics, flags.FLAGS.at, flags.FLAGS.best_by, flags.FLAGS.per_run,
                                  study_table.IGNORED_FIELDS + tuple(flags.FLAGS.ignore), source)
  except ConfigError as e:
    exit_with_error(str(e))
  if flags.FLAGS.format == "json":
    for row in rows:
      print(json.dumps(row))
    if not flags.FLAGS.per_run:
      print(json.dumps(dict(comparisons=study_table.comparisons(rows, metrics))))
  else:
    print(study_table.format_markdown(rows, metrics, flags.FLAGS.per_run))
    if not flags.FLAGS.per_run:
      from dcgan_jax.studies import study_report  # pylint: disable=g-import-not-at-top
      print("\n" + study_report.format_statistics(rows, metrics, study_table.comparisons(rows, metrics)))
  if flags.FLAGS.report:
    from dcgan_jax.studies import study_report  # pylint: disable=g-import-not-at-top  (matplotlib)
    page = study_report.write(flags.FLAGS.report, rows, metrics, {run.workdir: run for run in runs},
                              study_table.comparisons(rows, metrics),
                              study_table.format_markdown(rows, metrics))
    print(f"report: {page}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  cli.run(main, positional=True, uses_jax=False)
