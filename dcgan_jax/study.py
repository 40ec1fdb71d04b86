"""Command line: many training runs in one table, for reproducibility studies (seeds x configs).

    python -m dcgan_jax.study runs/*                     # one row per config: mean ± std over its seeds
    python -m dcgan_jax.study runs/                      # the same: a folder of workdirs stands for them
    python -m dcgan_jax.study --at=best runs/*           # each run at its best in-training FID
    python -m dcgan_jax.study --per_run runs/*           # one row per run
    python -m dcgan_jax.study --format=json runs/*       # one JSON line per row, every run's values

Runs are grouped by their configuration (config.json), leaving out the seed and the settings that do
not change what is trained (where and how often a run logs, samples, evaluates and checkpoints:
IGNORED_FIELDS), plus what the run recorded about where it ran: backend, device kind, number of devices
and the code's git commit (runs of other code are not pooled; `--ignore=run.git_commit` pools them, e.g.
across commits that only changed documentation). The table's columns are
the settings that differ between groups, `runs`, `seeds`, `step` (where the values were taken) and one
column per metric: mean ± sample standard deviation (ddof 1) over the group's runs, or the value alone
for a single run. Metrics are any keys of metrics.jsonl: training ones (d_loss, g_loss, D(x) as d_real,
...) and the in-training evaluation's (fid, kid, coverage, class_kl, and *_raw for the raw generator
next to the EMA one). `--at=final` takes each metric's last logged value; `--at=best` the evaluation
line with the lowest --best_by (a run's best checkpoint, `<workdir>/best`).

In-training scores use --eval_samples samples (FID is biased upwards at small counts), so they compare
runs with the same --eval_samples (a grouping setting); `python -m dcgan_jax.evaluate` scores one run
with more. Reads only config.json and metrics.jsonl: no JAX, no TensorFlow.
"""

import dataclasses
import json
import math
import os
import sys
from typing import Optional

from absl import app
from absl import flags
import numpy as np

from dcgan_jax.config import ConfigError, exit_with_error

# Settings that do not change the trained networks or their in-training scores.
IGNORED_FIELDS = ("seed", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
                  "num_samples", "eval_every", "data_dir", "evaluator_dir")
# What the run recorded about where it ran (config.json's "run"), grouped on as run.<name>.
RUN_FIELDS = ("backend", "device_kind", "devices", "git_commit")
DEFAULT_METRICS = ("fid", "kid", "coverage", "fid_raw", "kid_raw")


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict  # config.json's "config": every Config field, resolved
  info: dict  # config.json's "run": backend, devices, git_commit, ...
  records: list  # metrics.jsonl, in order: {"step": int, metric: float, ...}

  @property
  def settings(self) -> dict:
    """The grouping key's fields: config (all of it) and run.<RUN_FIELDS>."""
    return {**self.config, **{f"run.{k}": self.info.get(k) for k in RUN_FIELDS}}


def find_workdirs(paths) -> list:
  """The runs named by `paths`: each a workdir (holding config.json), or a folder whose immediate
  subfolders are workdirs (sorted by name). ConfigError for anything else."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      raise ConfigError(f"{path}: no such directory; pass training runs' --workdir directories")
    if os.path.exists(os.path.join(path, "config.json")):
      found.append(path)
      continue
    children = sorted(os.path.join(path, n) for n in os.listdir(path)
                      if os.path.exists(os.path.join(path, n, "config.json")))
    if not children:
      raise ConfigError(f"{path}: not a training run's workdir (no config.json), nor a folder of them; "
                        "pass directories that were given to --workdir")
    found += children
  return found


def load_run(workdir: str) -> Run:
  """config.json and metrics.jsonl of one workdir. A line of metrics.jsonl that is not JSON (a run
  killed while writing it) is skipped with a warning on stderr; an unreadable config.json is an error."""
  path = os.path.join(workdir, "config.json")
  try:
    with open(path) as f:
      saved = json.load(f)
    config, info = saved["config"], saved.get("run", {})
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path}: not a config.json written by dcgan_jax.main ({type(e).__name__}); "
                      "leave that run out") from None
  records = []
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      for number, line in enumerate(f, 1):
        try:
          records.append(json.loads(line))
        except ValueError:
          if line.strip():
            print(f"warning: {metrics_path}:{number}: not a JSON line; skipped", file=sys.stderr)
  return Run(workdir, config, info, records)


def values_at(run: Run, metrics, at: str = "final", best_by: str = "fid"):
  """(step, {metric: value or None}) of one run.

  at="final": each metric's last logged value; step = the last logged step.
  at="best": every metric from the one line with the lowest `best_by` (None for metrics not in that
  line, e.g. training losses beside an evaluation); (None, all None) when the run never logged it.
  """
  if at == "final":
    last = {}
    for record in run.records:
      last.update({k: v for k, v in record.items() if k != "step"})
    step = run.records[-1]["step"] if run.records else None
    return step, {m: last.get(m) for m in metrics}
  if at != "best":
    raise ConfigError(f"--at={at}: unknown; use final or best")
  scored = [r for r in run.records if r.get(best_by) is not None and math.isfinite(r[best_by])]
  if not scored:
    return None, {m: None for m in metrics}
  best = min(scored, key=lambda r: r[best_by])  # the first of equal ones
  return best["step"], {m: best.get(m) for m in metrics}


def group_runs(runs, ignore=IGNORED_FIELDS) -> list:
  """[(settings shared by the group, [runs])], groups in order of their first run."""
  groups = {}
  for run in runs:
    settings = {k: v for k, v in run.settings.items() if k not in ignore}
    groups.setdefault(json.dumps(settings, sort_keys=True), (settings, []))[1].append(run)
  return list(groups.values())


def differing_fields(groups) -> list:
  """The settings whose values are not the same in every group (the table's leading columns)."""
  names = sorted({k for settings, _ in groups for k in settings})
  return [k for k in names if len({json.dumps(s.get(k)) for s, _ in groups}) > 1]


def summarize(values) -> dict:
  """{"n", "mean", "std", "min", "max"} of the values that are not None (std: ddof 1; None for n < 2)."""
  x = np.array([v for v in values if v is not None], np.float64)
  if len(x) == 0:
    return dict(n=0, mean=None, std=None, min=None, max=None)
  return dict(n=len(x), mean=float(np.mean(x)), std=float(np.std(x, ddof=1)) if len(x) > 1 else None,
              min=float(np.min(x)), max=float(np.max(x)))


def table_rows(runs, metrics, at="final", best_by="fid", per_run=False, ignore=IGNORED_FIELDS) -> list:
  """The rows of the table, as dicts: "settings" (the differing ones), "runs" (workdirs), "seeds",
  "steps" (one per run), "incomplete" (workdirs whose last step is short of num_steps), and per metric
  a summarize() dict under "metrics", with "values" (one per run)."""
  groups = group_runs(runs, ignore)
  columns = differing_fields(groups)
  if per_run:
    groups = [(settings, [run]) for settings, members in groups for run in members]
  rows = []
  for settings, members in groups:
    taken = [values_at(run, metrics, at, best_by) for run in members]
    row = dict(settings={k: settings.get(k) for k in columns}, runs=[r.workdir for r in members],
               seeds=[r.config.get("seed") for r in members], steps=[step for step, _ in taken],
               incomplete=[r.workdir for r in members
                           if not r.records or r.records[-1]["step"] < r.config.get("num_steps", 0)],
               metrics={})
    for m in metrics:
      values = [v[m] for _, v in taken]
      row["metrics"][m] = dict(summarize(values), values=values)
    rows.append(row)
  return rows


def _setting(name: str, value) -> str:
  """A settings cell: strings quoted (so "None" and None differ), commits shortened to 12 digits."""
  if name == "run.git_commit" and isinstance(value, str):
    return value[:12] + ("-dirty" if value.endswith("-dirty") else "")
  return json.dumps(value) if isinstance(value, str) else str(value)


def _number(x: Optional[float]) -> str:
  return "—" if x is None else f"{x:.4g}"


def _cell(summary: dict, runs: int) -> str:
  if summary["n"] == 0:
    return "—"
  text = _number(summary["mean"])
  if summary["std"] is not None:
    text += f" ± {summary['std']:.2g}"
  if summary["n"] < runs:
    text += f" (n={summary['n']})"
  return text


def _span(values) -> str:
  known = sorted({v for v in values if v is not None})
  if not known:
    return "—"
  return str(known[0]) if len(known) == 1 else f"{known[0]}-{known[-1]}"


def format_markdown(rows, metrics, per_run: bool = False) -> str:
  """A Markdown table (per_run: led by a `run` column, the workdir); a run that stopped short of its
  num_steps is marked * and listed below."""
  columns = list(rows[0]["settings"]) if rows else []
  lead = ["run"] if per_run else []
  lines = ["| " + " | ".join(lead + columns + ["runs", "seeds", "step"] + list(metrics)) + " |",
           "|" + "---|" * (len(lead) + len(columns) + 3 + len(metrics))]
  incomplete = []
  for row in rows:
    mark = "*" if row["incomplete"] else ""
    incomplete += row["incomplete"]
    cells = [", ".join(row["runs"])] if per_run else []
    cells += [_setting(k, row["settings"][k]) for k in columns]
    cells += [f"{len(row['runs'])}{mark}", _span(row["seeds"]), _span(row["steps"])]
    cells += [_cell(row["metrics"][m], len(row["runs"])) for m in metrics]
    lines.append("| " + " | ".join(cells) + " |")
  if incomplete:
    lines.append("")
    lines.append("\\* not trained to its --num_steps: " + ", ".join(incomplete))
  return "\n".join(lines)


def choose_metrics(runs, requested: Optional[str]) -> list:
  """--metrics as a list; by default those of DEFAULT_METRICS that some run logged (else the losses).
  ConfigError naming what is available for a metric no run logged."""
  available = sorted({k for run in runs for r in run.records for k in r if k != "step"})
  if requested:
    metrics = [m.strip() for m in requested.split(",") if m.strip()]
    missing = [m for m in metrics if m not in available]
    if missing:
      raise ConfigError(f"--metrics: no run logged {', '.join(missing)}; available: "
                        f"{', '.join(available) or 'none (empty metrics.jsonl)'}")
    return metrics
  return [m for m in DEFAULT_METRICS if m in available] or [m for m in ("d_loss", "g_loss")
                                                             if m in available]


def define_flags():
  """The command line's flags; defined only when run as a program (importing defines none)."""
  flags.DEFINE_string("metrics", None, "Comma-separated metrics.jsonl keys (default: fid, kid, coverage, "
                      "fid_raw, kid_raw where logged, else d_loss, g_loss).")
  flags.DEFINE_enum("at", "final", ["final", "best"], "final: each metric's last value; best: the "
                    "evaluation line with the lowest --best_by.")
  flags.DEFINE_string("best_by", "fid", "The metric --at=best minimises.")
  flags.DEFINE_bool("per_run", False, "One row per run instead of one per configuration.")
  flags.DEFINE_enum("format", "markdown", ["markdown", "json"], "markdown: a table; json: one line per row.")
  flags.DEFINE_list("ignore", [], "More settings to leave out of the grouping (e.g. compute_dtype, "
                    "run.devices), so runs differing in them are pooled.")


def main(argv):
  paths = argv[1:]
  if not paths:
    exit_with_error("no runs given; pass training runs' workdirs (or a folder of them), "
                    "e.g. python -m dcgan_jax.study runs/*")
  try:
    runs = [load_run(w) for w in find_workdirs(paths)]
    metrics = choose_metrics(runs, flags.FLAGS.metrics)
    if not metrics:
      raise ConfigError("the runs logged no metrics yet (empty metrics.jsonl); study them after training")
    if flags.FLAGS.at == "best" and not any(r.get(flags.FLAGS.best_by) is not None
                                            for run in runs for r in run.records):
      raise ConfigError(f"--at=best: no run logged {flags.FLAGS.best_by}; train with --eval_every=N, or "
                        "use --at=final")
    rows = table_rows(runs, metrics, flags.FLAGS.at, flags.FLAGS.best_by, flags.FLAGS.per_run,
                      IGNORED_FIELDS + tuple(flags.FLAGS.ignore))
  except ConfigError as e:
    exit_with_error(str(e))
  if flags.FLAGS.format == "json":
    for row in rows:
      print(json.dumps(row))
  else:
    print(format_markdown(rows, metrics, flags.FLAGS.per_run))


if __name__ == "__main__":
  define_flags()
  app.run(main)
