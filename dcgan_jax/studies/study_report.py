"""`python -m dcgan_jax.study --report=DIR RUNS...`: a study as one HTML page a researcher can read in a
browser or copy into a paper: DIR/index.html (CSS inline) with its PNG images beside it.

The page, in order: the table (mean ± std over seeds) with each configuration's 95% interval; the
pairwise differences and their verdicts (study_stats.py); per metric, the metric against training
steps per configuration (the mean over seeds, a 95% band where two or more seeds logged the step) and
the final values of every seed (a strip per configuration, the mean and its interval); per
configuration, the sample grid of its median and of its best seed (by the first metric); the flags that
differ between configurations, and where each run lives. matplotlib (Agg backend), numpy; no JAX.
"""

import html
import os
import shutil
from typing import Dict, List

import numpy as np

from dcgan_jax.studies import study_stats
from dcgan_jax import workdir as workdir_lib

# Okabe & Ito's colour-blind-safe palette (black last).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
CURVE_RESAMPLES = 1000  # per logged step: a band, not a test
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left}
th{background:#eee}img{max-width:100%;border:1px solid #ddd}figure{display:inline-block;margin:.5em}
code{background:#f4f4f4;padding:0 .2em}.note{color:#555;font-size:.9em}"""


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _axis_label(metric: str) -> str:
  better = "lower" if study_stats.lower_is_better(metric) else "higher"
  return f"{metric} ({better} is better)"


def _series(records, metric):
  """{step: value} of one run's logged values of `metric` (finite ones)."""
  return {r["step"]: r[metric] for r in records
          if isinstance(r.get(metric), (int, float)) and np.isfinite(r[metric]) and r.get("step") is not None}


def plot_curves(path: str, metric: str, groups: Dict[str, List[dict]]) -> None:
  """groups: {configuration: [each seed's {step: value}]} -> a PNG of mean lines with 95% bands."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
  for i, (name, series) in enumerate(groups.items()):
    steps = sorted({s for one in series for s in one})
    means, lows, highs = [], [], []
    for s in steps:
      values = [one[s] for one in series if s in one]
      ci = study_stats.mean_interval(values, resamples=CURVE_RESAMPLES)
      means.append(np.mean(values))
      lows.append(ci["low"] if ci else np.nan)
      highs.append(ci["high"] if ci else np.nan)
    colour = PALETTE[i % len(PALETTE)]
    ax.plot(steps, means, color=colour, label=f"{name} ({len(series)} seeds)", marker="o", markersize=3)
    ax.fill_between(steps, lows, highs, color=colour, alpha=0.2, linewidth=0)
  ax.set_xlabel("training step")
  ax.set_ylabel(_axis_label(metric))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_finals(path: str, metric: str, rows) -> None:
  """Every seed's value of `metric` per configuration (a strip), with the mean and its 95% interval."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5), dpi=100)
  for i, row in enumerate(rows):
    values = [v for v in row["metrics"][metric]["values"] if v is not None]
    jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
    colour = PALETTE[i % len(PALETTE)]
    ax.scatter(values, i + np.asarray(jitter), color=colour, s=24, zorder=3)
    summary = row["metrics"][metric]
    if summary["mean"] is not None:
      ax.plot([summary["mean"]] * 2, [i - 0.3, i + 0.3], color="black", linewidth=2)
    if summary["ci"]:
      ax.plot([summary["ci"]["low"], summary["ci"]["high"]], [i, i], color="black", linewidth=1)
  ax.set_yticks(range(len(rows)), [_short(r["label"]) for r in rows], fontsize=8)
  ax.set_xlabel(_axis_label(metric))
  ax.grid(alpha=0.3, axis="x")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def _short(text: str, width: int = 40) -> str:
  return text if len(text) <= width else text[:width - 1] + "…"


def newest_grid(workdir: str):
  """The newest samples/step_*.png of a run (the EMA generator's where both exist), or None."""
  folder = workdir_lib.path(workdir, workdir_lib.SAMPLES)
  names = workdir_lib.sample_grids(workdir)
  return os.path.join(folder, names[-1]) if names else None


def _number(x) -> str:
  return "—" if x is None else f"{x:.4g}"


def format_statistics(rows, metrics, comparisons: dict) -> str:
  """Markdown for below the study's table: each configuration's 95% interval of the mean, the pairwise
  differences with their verdicts (comparisons: study_table.comparisons), and the expected best of k seeds;
  or why they cannot be given (one seed each)."""
  if not any(r["metrics"][m]["n"] > 1 for r in rows for m in metrics):
    return "No intervals or comparisons: every configuration has one seed (train several: --seeds=0-2)."
  interval = lambda ci: "— (1 seed)" if ci is None else f"[{_number(ci['low'])}, {_number(ci['high'])}]"
  lines = [f"95% intervals of the mean over seeds (percentile bootstrap, {study_stats.RESAMPLES:,} "
           f"resamples, seed {study_stats.SEED}; few seeds make them too narrow):", "",
           "| configuration | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
  lines += [f"| {r['label']} | " + " | ".join(interval(r["metrics"][m]["ci"]) for m in metrics)
            + " |" for r in rows]
  if len(rows) > 1:
    lines += ["", "Differences of means, A − B (permutation test, two-sided; p adjusted by Holm over "
              "the pairs of each metric):", "",
              "| metric | A | B | A − B | 95% interval | p | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
    for m, pairs in comparisons.items():
      for p in pairs:
        numbers = ([_number(p["difference"]), f"[{_number(p['low'])}, {_number(p['high'])}]",
                    f"{p['p']:.3g}", f"{p['p_holm']:.3g}"] if "p" in p else ["—"] * 4)
        lines.append(f"| {m} | {p['a']} | {p['b']} | " + " | ".join(numbers) + f" | {p['verdict']} |")
    floors = {p["p_floor"] for found in comparisons.values() for p in found if "p_floor" in p}
    if floors:
      lines += ["", f"The smallest p these seed counts allow: {min(floors):.3g} (a verdict needs p (Holm) "
                f"< {1 - study_stats.LEVEL:.2g}; more seeds lower it)."]
  n = max(len(r["metrics"][metrics[0]]["expected_best"]) for r in rows)
  lines += ["", f"Expected best of k seeds ({metrics[0]}, "
            f"{'lowest' if study_stats.lower_is_better(metrics[0]) else 'highest'} is best; over every "
            "k-subset of the seeds):", "", "| configuration | " + " | ".join(f"k={k}" for k in range(1, n + 1))
            + " |", "|---|" + "---|" * n]
  for r in rows:
    best = r["metrics"][metrics[0]]["expected_best"]
    cells = [_number(b) for b in best] + [""] * (n - len(best))  # (fewer seeds than another row)
    lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)



def _table(header, body) -> str:
  cells = lambda row, tag: "".join(f"<{tag}>{html.escape(str(c))}</{tag}>" for c in row)
  return ("<table><tr>" + cells(header, "th") + "</tr>"
          + "".join("<tr>" + cells(row, "td") + "</tr>" for row in body) + "</table>")


def write(directory: str, rows, metrics, runs, comparisons: dict, markdown_table: str) -> str:
  """Writes DIR/index.html and its images; returns the page's path. rows: study_table.table_rows (each with
  "label" added); runs: {workdir: study_table.Run}; comparisons: study_table.comparisons."""
  os.makedirs(directory, exist_ok=True)
  number = _number
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Study: {len(runs)} runs</title>"
           f"<style>{CSS}</style></head><body><h1>Study of {len(runs)} runs, {len(rows)} configurations</h1>"]
  first = metrics[0]
  header = ["configuration", "seeds", "step"] + [f"{m} mean ± std" for m in metrics] + [
      f"{m} 95% interval" for m in metrics]
  body = []
  for row in rows:
    cells = [row["label"], len(row["runs"]), "/".join(str(s) for s in sorted(set(row["steps"]), key=str))]
    for m in metrics:
      s = row["metrics"][m]
      cells.append(number(s["mean"]) + ("" if s["std"] is None else f" ± {s['std']:.2g}"))
    for m in metrics:
      ci = row["metrics"][m]["ci"]
      cells.append("— (1 seed)" if ci is None else f"[{number(ci['low'])}, {number(ci['high'])}]")
    body.append(cells)
  parts += ["<h2>Results</h2>", _table(header, body),
            f"<p class='note'>Intervals: percentile bootstrap of the mean over seeds, "
            f"{study_stats.RESAMPLES:,} resamples, seed {study_stats.SEED}; with few seeds they are too "
            "narrow.</p>"]
  pairs = [[m, p["a"], p["b"], number(p.get("difference")),
            f"[{number(p['low'])}, {number(p['high'])}]" if "low" in p else "—",
            f"{p['p']:.3g}" if "p" in p else "—", f"{p['p_holm']:.3g}" if "p_holm" in p else "—", p["verdict"]]
           for m, found in comparisons.items() for p in found]
  if pairs:
    parts += ["<h2>Is one configuration better?</h2>",
              _table(["metric", "A", "B", "A − B", "95% interval", "p", "p (Holm)", "verdict"], pairs),
              "<p class='note'>Permutation test of the difference of means (two-sided; exact when all "
              "relabelings can be enumerated); p adjusted by Holm over the pairs of each metric; a verdict "
              f"at p (Holm) &lt; 0.05. The smallest p these seed counts allow: "
              f"{min(p.get('p_floor', 1.0) for found in comparisons.values() for p in found):.3g}.</p>"]
  parts.append("<h2>Metrics</h2>")
  for m in metrics:
    groups = {row["label"]: [_series(runs[w].records, m) for w in row["runs"]] for row in rows}
    if any(groups.values()) and any(any(one) for one in groups.values()):
      plot_curves(os.path.join(directory, f"curve_{m}.png"), m, groups)
      parts.append(f"<figure><img src='curve_{m}.png' alt='{html.escape(m)} against steps'>"
                   f"<figcaption>{html.escape(m)} against training steps: mean over seeds, 95% band"
                   "</figcaption></figure>")
    plot_finals(os.path.join(directory, f"final_{m}.png"), m, rows)
    parts.append(f"<figure><img src='final_{m}.png' alt='{html.escape(m)} per seed'><figcaption>"
                 f"{html.escape(m)} of every seed (dots), mean (bar) and 95% interval (line)</figcaption>"
                 "</figure>")
  parts.append(f"<h2>Samples (median and best seed by {html.escape(first)})</h2>")
  for i, row in enumerate(rows):
    scored = sorted((v, w) for v, w in zip(row["metrics"][first]["values"], row["runs"]) if v is not None)
    if not scored:
      continue
    median, best = scored[(len(scored) - 1) // 2], scored[0 if study_stats.lower_is_better(first) else -1]
    parts.append(f"<h3>{html.escape(row['label'])}</h3>")
    for kind, (value, workdir) in (("median", median), ("best", best)):
      grid = newest_grid(workdir)
      if grid:
        name = f"grid_{i}_{kind}.png"
        shutil.copyfile(grid, os.path.join(directory, name))
        parts.append(f"<figure><img src='{name}' alt='samples of {html.escape(workdir)}'><figcaption>"
                     f"{kind} seed: {html.escape(first)} {number(value)}, {html.escape(workdir)}"
                     "</figcaption></figure>")
  flags = [[row["label"], " ".join(f"--{k}={v}" for k, v in row["settings"].items() if not k.startswith(
      ("run.", "eval."))) or "(the same)", ", ".join(row["runs"])] for row in rows]
  parts += ["<h2>Configurations and runs</h2>", _table(["configuration", "flags that differ", "runs"], flags),
            "<details><summary>The table as Markdown</summary><pre>" + html.escape(markdown_table)
            + "</pre></details>",
            # How many images the browser decoded: a broken image shows here, not only as an icon.
            "<p class='note' id='loaded'></p><script>window.addEventListener('load',()=>{const i=[...document"
            ".images];document.getElementById('loaded').textContent=`images shown: ${i.filter(x=>x.complete"
            "&&x.naturalWidth>0).length} of ${i.length}`;});</script></body></html>"]
  page = os.path.join(directory, "index.html")
  workdir_lib.write_atomic(page, "\n".join(parts))
  return page
