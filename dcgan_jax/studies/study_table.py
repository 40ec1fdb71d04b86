"""The library behind `python -m dcgan_jax.study` (study.py, which documents the table): runs read back
from their workdirs, grouped by configuration, summarised per metric (mean, std, intervals, pairwise
tests through study_stats.py) and formatted as markdown. Reads only config.json, metrics.jsonl and
evaluations.jsonl: no JAX, no TensorFlow.

    runs = [load_run(w) for w in find_workdirs(["runs/"])]
    metrics = choose_metrics(runs, None)
    print(format_markdown(table_rows(runs, metrics), metrics))
"""

import dataclasses
import json
import math
import os
import sys
from typing import Optional

import numpy as np

from dcgan_jax.studies import study_stats
from dcgan_jax import workdir as workdir_lib
from dcgan_jax.config import STUDY_IGNORED, ConfigError

# The seed and the settings that change neither the trained networks nor their in-training scores
# (config.py: the seed, and every OUTPUT setting).
IGNORED_FIELDS = tuple(sorted(STUDY_IGNORED))
# What the run recorded about where it ran (config.json's "run"), grouped on as run.<name>.
RUN_FIELDS = ("backend", "device_kind", "devices", "git_commit")
DEFAULT_METRICS = ("fid", "kid", "coverage", "fid_raw", "kid_raw")
DEFAULT_EVALUATION_METRICS = ("fid", "kid", "precision", "recall", "coverage")
# What makes one evaluation's scores comparable with another's, grouped on as eval.<name>.
EVALUATION_FIELDS = ("num_samples", "ema", "sample_bn", "features", "evaluator")


@dataclasses.dataclass
class Run:
  workdir: str
  config: dict  # config.json's "config": every Config field, resolved
  info: dict  # config.json's "run": backend, devices, git_commit, ...
  records: list  # metrics.jsonl, in order: {"step": int, metric: float, ...}
  evaluations: list  # evaluations.jsonl as records: {"step", metric: float, ..., "eval": {settings}}

  @property
  def settings(self) -> dict:
    """The grouping key's fields: config (all of it) and run.<RUN_FIELDS>."""
    return {**self.config, **{f"run.{k}": self.info.get(k) for k in RUN_FIELDS}}

  def lines(self, source: str) -> list:
    """The records of one source: "metrics" (metrics.jsonl) or "evaluations" (evaluations.jsonl)."""
    return self.evaluations if source == "evaluations" else self.records


def find_workdirs(paths) -> list:
  """The runs named by `paths`: each a workdir (holding config.json), or a folder whose immediate
  subfolders are workdirs (sorted by name). ConfigError for anything else."""
  found = []
  for path in paths:
    if not os.path.isdir(path):
      raise ConfigError(f"{path}: no such directory; pass training runs' --workdir directories")
    if workdir_lib.has_config(path):
      found.append(path)
      continue
    children = sorted(os.path.join(path, n) for n in os.listdir(path)
                      if workdir_lib.has_config(os.path.join(path, n)))
    if not children:
      raise ConfigError(f"{path}: not a training run's workdir (no config.json), nor a folder of them; "
                        "pass directories that were given to --workdir")
    found += children
  return found


def _read_jsonl(path: str) -> list:
  """workdir.read_jsonl, warning on stderr about lines cut short by a killed run."""
  return workdir_lib.read_jsonl(path, warn=lambda m: print(f"warning: {m}", file=sys.stderr))


def evaluation_record(report: dict) -> dict:
  """One evaluate report -> a record like metrics.jsonl's: step, its scores (numbers at the top level),
  the real-data floor's as reference_<name>, and under "eval" the settings EVALUATION_FIELDS
  (features: evaluator or inception; evaluator: the evaluator network's cache path, or the Inception
  weights' SHA-256)."""
  is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
  record = {k: v for k, v in report.items() if is_number(v) and k not in ("step", "num_samples")}
  record.update({f"reference_{k}": v for k, v in report.get("reference", {}).items()
                 if is_number(v) and k not in ("num_samples", "count")})
  # The feature network: the evaluator's cache path, or the Inception weights' hash.
  settings = dict(report, features=report.get("features", "evaluator"),
                  evaluator=report.get("evaluator", {}).get("path") or report.get("weights", {}).get("sha256"))
  record.update(step=report.get("step"), eval={k: settings.get(k) for k in EVALUATION_FIELDS})
  return record


def load_run(workdir: str) -> Run:
  """config.json, metrics.jsonl and evaluations.jsonl of one workdir; an unreadable config.json is an
  error."""
  saved = workdir_lib.read_saved(workdir)
  evaluations = [evaluation_record(r)
                 for r in _read_jsonl(workdir_lib.path(workdir, workdir_lib.EVALUATIONS))]
  return Run(workdir, saved["config"], saved["run"],
             _read_jsonl(workdir_lib.path(workdir, workdir_lib.METRICS)), evaluations)


def parse_at(at: str):
  """--at -> ("final" or "best", the last step to look at or None). "step=N" is "final" up to step N.
  ConfigError for anything else."""
  if at in ("final", "best"):
    return at, None
  if at.startswith("step=") and at[5:].isdigit():
    return "final", int(at[5:])
  raise ConfigError(f"--at={at}: unknown; use final, best or step=N (e.g. step=5000)")


def _upto(records, until):
  return records if until is None else [r for r in records if r["step"] is not None and r["step"] <= until]


def values_at(run: Run, metrics, at: str = "final", best_by: str = "fid"):
  """(step, {metric: value or None}) of one run's metrics.jsonl.

  at="final": each metric's last logged value; step = the last logged step. at="step=N": the same,
  over the lines of steps <= N.
  at="best": every metric from the one line with the lowest `best_by` (None for metrics not in that
  line, e.g. training losses beside an evaluation); (None, all None) when the run never logged it.
  """
  at, until = parse_at(at)
  records = _upto(run.records, until)
  if at == "final":
    last = {}
    for record in records:
      last.update({k: v for k, v in record.items() if k != "step"})
    return (records[-1]["step"] if records else None), {m: last.get(m) for m in metrics}
  return _pick(records, metrics, at, best_by)[:2]


def _pick(records, metrics, at, best_by):
  """(step, values, "eval" settings) of the newest step's record (at="final"; of several, the last
  written; "step=N": of steps <= N) or the one with the lowest best_by (at="best"; the first of
  equal ones)."""
  at, until = parse_at(at)
  records = _upto(records, until)
  if at == "final":
    chosen = max(reversed(records), key=lambda r: -1 if r["step"] is None else r["step"], default=None)
  elif at == "best":
    scored = [r for r in records if r.get(best_by) is not None and math.isfinite(r[best_by])]
    chosen = min(scored, key=lambda r: r[best_by]) if scored else None
  else:
    raise ConfigError(f"--at={at}: unknown; use final, best or step=N")
  if chosen is None:
    return None, {m: None for m in metrics}, {}
  return chosen["step"], {m: chosen.get(m) for m in metrics}, chosen.get("eval", {})


def evaluations_at(run: Run, metrics, at: str = "final", best_by: str = "fid") -> list:
  """[(step, {metric: value or None}, eval settings)] of one run's evaluations.jsonl: one per kind of
  evaluation (the same EVALUATION_FIELDS, e.g. of the EMA and of the raw generator), in order of
  first appearance, each the kind's newest step (final) or lowest best_by (best); a run never
  evaluated gives one entry of Nones."""
  kinds = {}
  for record in run.evaluations:
    kinds.setdefault(json.dumps(record["eval"], sort_keys=True), []).append(record)
  return [_pick(records, metrics, at, best_by) for records in kinds.values()] or [
      _pick([], metrics, at, best_by)]


def observations(runs, metrics, at="final", best_by="fid", source="metrics") -> list:
  """(run, step, values, settings) per run (source="metrics") or per run and kind of evaluation
  (source="evaluations"); settings: the run's, and eval.<name> of its evaluation."""
  out = []
  for run in runs:
    if source == "evaluations":
      for step, values, kind in evaluations_at(run, metrics, at, best_by):
        out.append((run, step, values, {**run.settings, **{f"eval.{k}": v for k, v in kind.items()}}))
    else:
      out.append((run, *values_at(run, metrics, at, best_by), run.settings))
  return out


def group(observed, ignore=IGNORED_FIELDS) -> list:
  """[(settings shared by the group, [observations])] over observations(...), in order of first
  appearance, leaving the `ignore`d settings out."""
  groups = {}
  for obs in observed:
    settings = {k: v for k, v in obs[3].items() if k not in ignore}
    groups.setdefault(json.dumps(settings, sort_keys=True), (settings, []))[1].append(obs)
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


def table_rows(runs, metrics, at="final", best_by="fid", per_run=False, ignore=IGNORED_FIELDS,
               source="metrics") -> list:
  """The rows of the table, as dicts: "settings" (the differing ones), "label" (their name in
  comparisons), "runs" (workdirs), "seeds",
  "steps" (one per run), "incomplete" (workdirs whose metrics.jsonl ends short of num_steps), and per
  metric a summarize() dict under "metrics", with "values" (one per run)."""
  groups = group(observations(runs, metrics, at, best_by, source), ignore)
  columns = differing_fields(groups)
  if per_run:
    groups = [(settings, [obs]) for settings, members in groups for obs in members]
  rows = []
  for settings, members in groups:
    members_runs = [run for run, *_ in members]
    shown = {k: settings.get(k) for k in columns}
    row = dict(settings=shown, label=label(shown), runs=[r.workdir for r in members_runs],
               seeds=[r.config.get("seed") for r in members_runs], steps=[step for _, step, _, _ in members],
               incomplete=[r.workdir for r in members_runs
                           if not r.records or r.records[-1]["step"] < r.config.get("num_steps", 0)],
               metrics={})
    for m in metrics:
      values = [v[m] for _, _, v, _ in members]
      row["metrics"][m] = dict(summarize(values), values=values, ci=study_stats.mean_interval(values),
                               expected_best=study_stats.expected_best(values, study_stats.lower_is_better(m)))
    rows.append(row)
  return rows


def label(settings: dict) -> str:
  """A configuration's name in comparisons: its differing settings, "name=value, ..." ("all" if none)."""
  return ", ".join(f"{k}={_setting(k, v)}" for k, v in settings.items()) or "all"


def comparisons(rows, metrics) -> dict:
  """{metric: study_stats.compare_all over the rows' values}: every pair of configurations."""
  return {m: study_stats.compare_all({r["label"]: r["metrics"][m]["values"] for r in rows})
          for m in metrics}


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


def choose_metrics(runs, requested: Optional[str], source: str = "metrics") -> list:
  """--metrics as a list; by default those of DEFAULT_METRICS (DEFAULT_EVALUATION_METRICS) that some
  run logged (else the losses). ConfigError naming what is available for a metric no run logged."""
  records = [r for run in runs for r in run.lines(source)]
  available = sorted({k for r in records for k in r if k not in ("step", "eval")})
  if requested:
    metrics = [m.strip() for m in requested.split(",") if m.strip()]
    missing = [m for m in metrics if m not in available]
    if missing:
      raise ConfigError(f"--metrics: no run logged {', '.join(missing)}; available: "
                        f"{', '.join(available) or 'none'}")
    return metrics
  defaults = DEFAULT_EVALUATION_METRICS if source == "evaluations" else DEFAULT_METRICS
  return [m for m in defaults if m in available] or [m for m in ("d_loss", "g_loss") if m in available]
