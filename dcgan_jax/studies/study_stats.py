"""Statistics over seeds for `python -m dcgan_jax.study`: is configuration A better than B, given how much
the seed alone moves the result? (Lucic et al. 2018 answered it with distributions over seeds.) numpy
and scipy only; no JAX.

    ci = mean_interval(values)                     # 95% bootstrap interval of the mean, seeded
    pairs = compare_all({"A": a, "B": b, ...})     # differences of means, intervals, Holm-adjusted p
    best = expected_best(values, lower_is_better=True)   # E[best of k seeds], k = 1..n

Choices that move the numbers, stated in each result:
* Bootstrap: scipy.stats.bootstrap, percentile method, RESAMPLES resamples from a fixed seed (the same
  inputs give the same interval). With n seeds a resample takes only the n observed values, so with few
  seeds the interval is too narrow (it cannot know of values no seed reached): read it as "at least
  this uncertain". BCa would correct for skew, but is undefined for tiny or constant samples.
* Pairwise test: scipy.stats.permutation_test of the difference of means, two-sided, exact (all
  relabelings) while their number is at most RESAMPLES, else RESAMPLES random ones from the seed.
  With 3 seeds per configuration the smallest possible p is 2 / 20 = 0.1: no difference can be
  significant at 0.05 with 3 seeds each, however large; the output says how many seeds it had.
* Holm's step-down correction over all pairs of configurations (family-wise error rate).
* Expected best of k: the mean over all k-subsets of the seeds of the best value in the subset,
  computed exactly from the order statistics (what a paper reporting "best of k runs" would show).
"""

import itertools
import math
from typing import Dict, Optional, Sequence

import numpy as np
from scipy import stats

RESAMPLES = 10_000
LEVEL = 0.95
SEED = 0
# Metrics where a larger value is better; every other one (fid, kid, losses, class_kl...) is lower-better.
HIGHER_IS_BETTER = frozenset({"precision", "recall", "coverage", "classifier_score", "inception_score",
                              "d_real", "test_accuracy"})


def lower_is_better(metric: str) -> bool:
  base = metric[:-4] if metric.endswith("_raw") else metric
  return base not in HIGHER_IS_BETTER


def _clean(values) -> np.ndarray:
  return np.array([v for v in values if v is not None and np.isfinite(v)], np.float64)


def mean_interval(values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = SEED) -> Optional[dict]:
  """{"low", "high", "level", "resamples", "method"}: the percentile-bootstrap interval of the mean, or
  None with fewer than 2 values (no interval can be given from one seed). Constant values: a point."""
  x = _clean(values)
  if len(x) < 2:
    return None
  if np.all(x == x[0]):
    low = high = float(x[0])
  else:
    result = stats.bootstrap((x,), np.mean, n_resamples=resamples, confidence_level=level,
                             method="percentile", rng=np.random.default_rng(seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
  return dict(low=low, high=high, level=level, resamples=resamples, method="percentile bootstrap")


def _difference(a, b, axis=-1):
  return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def compare(a: Sequence[float], b: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
            seed: int = SEED) -> Optional[dict]:
  """Mean(a) - mean(b), its bootstrap interval (each sample resampled on its own), the two-sided
  permutation-test p-value and the smallest p these sample sizes allow (p_floor); None unless both
  have 2 or more values."""
  a, b = _clean(a), _clean(b)
  if len(a) < 2 or len(b) < 2:
    return None
  rng = np.random.default_rng(seed)
  if np.all(np.concatenate([a, b]) == a[0]):
    low = high = 0.0
    p = 1.0
  else:
    interval = stats.bootstrap((a, b), _difference, n_resamples=resamples, confidence_level=level,
                               method="percentile", vectorized=True, rng=rng)
    low, high = float(interval.confidence_interval.low), float(interval.confidence_interval.high)
    test = stats.permutation_test((a, b), _difference, permutation_type="independent", vectorized=True,
                                  n_resamples=resamples, alternative="two-sided", rng=rng)
    p = float(test.pvalue)
  relabelings = math.comb(len(a) + len(b), len(a))
  exact = relabelings <= resamples
  # The smallest p any data could give: the observed labeling (and, with equal sizes, its mirror).
  floor = (2 if len(a) == len(b) else 1) / relabelings if exact else 1 / (resamples + 1)
  return dict(difference=float(np.mean(a) - np.mean(b)), low=low, high=high, level=level, p=p,
              p_floor=floor, n=[len(a), len(b)], permutations="exact" if exact else f"{resamples} random")


def holm(p_values: Sequence[float]) -> list:
  """Holm's step-down adjusted p-values, in the input's order: the i-th smallest p times (m - i + 1),
  made non-decreasing in that order, at most 1."""
  m = len(p_values)
  order = np.argsort(p_values, kind="stable")
  adjusted, running = [0.0] * m, 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p_values[i]))
    adjusted[i] = running
  return adjusted


def compare_all(groups: Dict[str, Sequence[float]], alpha: float = 1 - LEVEL, **kwargs) -> list:
  """Every pair (A, B) of groups, in order: compare(A, B) plus "a", "b", "p_holm" (over the pairs that
  could be tested) and "verdict": "A < B" / "A > B" (Holm-adjusted p < alpha), "no difference shown",
  or "too few seeds" (a group with fewer than 2)."""
  pairs = []
  for a, b in itertools.combinations(groups, 2):
    result = compare(groups[a], groups[b], **kwargs) or {}
    pairs.append(dict(result, a=a, b=b))
  tested = [p for p in pairs if "p" in p]
  for pair, adjusted in zip(tested, holm([p["p"] for p in tested])):
    pair["p_holm"] = adjusted
  for pair in pairs:
    if "p" not in pair:
      pair["verdict"] = "too few seeds"
    elif pair["p_holm"] < alpha:
      pair["verdict"] = f"{pair['a']} {'<' if pair['difference'] < 0 else '>'} {pair['b']}"
    else:
      pair["verdict"] = "no difference shown"
  return pairs


def expected_best(values: Sequence[float], lower: bool = True) -> list:
  """[E[best of k seeds] for k = 1..n]: the mean, over all k-subsets of the n values, of the subset's
  best (lowest if `lower`): sum over order statistics x_(i) of C(n - i, k - 1) / C(n, k) x_(i)."""
  x = np.sort(_clean(values))
  if not lower:
    x = x[::-1]
  n = len(x)
  return [float(sum(math.comb(n - i, k - 1) * x[i - 1] for i in range(1, n + 1)) / math.comb(n, k))
          for k in range(1, n + 1)]
