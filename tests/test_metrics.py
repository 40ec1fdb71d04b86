"""Sample-quality metrics against closed forms, brute force and constructed cases (numpy only)."""
import itertools

import numpy as np
import pytest
import scipy.linalg

from dcgan_jax.evaluation import metrics


def random_spd(rng, d):
  a = rng.standard_normal((d, d))
  return a @ a.T + 0.1 * np.eye(d)


def test_fid_of_a_set_with_itself_is_zero():
  """A feature set against itself has FID 0 (to 1e-8). Catches a matrix square root that loses precision
  (scipy's sqrtm of a near-singular product) and a mean term of the wrong sign or scale."""
  x = np.random.default_rng(0).standard_normal((500, 16))
  assert metrics.fid(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_closed_forms():
  """The Frechet distance against closed forms: diagonal covariances give sum (sqrt(a) - sqrt(b))^2 plus the
  mean term, and non-commuting covariances the textbook trace formula with scipy's general square root.
  Catches sqrt(S1) sqrt(S2) in place of sqrt(S1 S2), a missing factor 2, and a dropped mean term."""
  rng = np.random.default_rng(1)
  # Diagonal covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
  mu1, mu2 = rng.standard_normal(8), rng.standard_normal(8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
  # Non-commuting covariances: the textbook formula with scipy's general matrix square root.
  s1, s2 = random_spd(rng, 12), random_spd(rng, 12)
  textbook = np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert metrics.frechet_distance(np.zeros(12), s1, np.zeros(12), s2) == pytest.approx(textbook, rel=1e-8)


def test_fid_of_shifted_gaussians():
  """N(0, I) vs N(mu, I): FID = ||mu||^2, up to sampling error (std ~0.014 here: the mean term).
  Catches a mean term that is not squared or a covariance term that does not vanish for equal
  covariances."""
  rng = np.random.default_rng(2)
  mu = np.full(4, 0.5)  # ||mu||^2 = 1
  x, y = rng.standard_normal((40000, 4)), rng.standard_normal((40000, 4)) + mu
  assert metrics.fid(x, y) == pytest.approx(1.0, abs=0.05)


def test_fid_of_sets_smaller_than_the_dimension_equals_the_textbook_formula():
  """Sets of fewer samples than dimensions (rank-deficient covariances, the small-sample route through
  A2 A1^T's singular values) give the textbook value tr(S1 + S2 - 2 sqrtm(S1 S2)) + ||mu1 - mu2||^2,
  with S1, S2 computed by np.cov and the root by scipy, for sets of unequal sizes. Catches the route's
  1/(n - 1) scaling, a centring by the other set's mean, and singular values not summed."""
  rng = np.random.default_rng(3)
  a = rng.standard_normal((30, 40)) * rng.uniform(0.5, 2, 40)
  b = rng.standard_normal((25, 40)) + 0.3
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  diff = a.mean(0) - b.mean(0)
  textbook = diff @ diff + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert metrics.fid(a, b) == pytest.approx(textbook, rel=1e-6)
  assert metrics.fid_from_samples(a, b) == pytest.approx(
      metrics.frechet_distance(a.mean(0), s1, b.mean(0), s2), rel=1e-7)


def brute_force_mmd2(x, y):
  k = lambda a, b: (a @ b / len(a) + 1) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
  kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return kxx + kyy - 2 * kxy


def test_mmd2_matches_the_definition():
  """The unbiased MMD^2 with KID's cubic polynomial kernel equals the definition summed by brute force over
  all pairs. Catches a kernel with another degree or scale, and diagonal terms kept in the within-set means."""
  rng = np.random.default_rng(3)
  x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 0.3
  assert metrics.mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x, y), rel=1e-10)


def test_kid_is_unbiased():
  """Two samples of one distribution: the estimator averages to 0 (a biased V-statistic that keeps
  the kernel diagonals would average clearly above 0). Catches the biased estimator."""
  rng = np.random.default_rng(4)
  values, biased = [], []
  for _ in range(3000):
    x, y = rng.standard_normal((6, 2)), rng.standard_normal((6, 2))
    values.append(metrics.mmd2_unbiased(x, y))
    kxx, kyy, kxy = (metrics._polynomial_kernel(a, b) for a, b in ((x, x), (y, y), (x, y)))
    biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
  values = np.array(values)
  stderr = values.std() / np.sqrt(len(values))
  assert abs(values.mean()) < 4 * stderr
  assert np.mean(biased) > 10 * stderr


def test_kid_separates_distributions_and_reports_a_spread():
  """KID over subsets: two samples of one distribution score within 3 standard deviations of 0, a shifted
  one far above, and the reported spread is positive. Catches a KID that does not see a shift, and a spread
  that is always 0."""
  rng = np.random.default_rng(5)
  x, y, z = (rng.standard_normal((300, 8)) for _ in range(3))
  same, same_std = metrics.kid(x, y, num_subsets=20, subset_size=100)
  shifted, _ = metrics.kid(x, z + 1.0, num_subsets=20, subset_size=100)
  assert same_std > 0
  assert abs(same) < 3 * same_std and shifted > 10 * same_std


def test_knn_radii_exclude_the_point_itself():
  """k-NN radii on a line of four points, k = 1 and 2, by hand. Catches the point counted as its own nearest
  neighbour (every radius 0) and an off-by-one in k."""
  x = np.array([[0.0], [1.0], [3.0], [6.0]])
  np.testing.assert_allclose(metrics.knn_radii(x, k=1), [1, 1, 2, 3])
  np.testing.assert_allclose(metrics.knn_radii(x, k=2), [3, 2, 3, 5])


def test_precision_recall_on_constructed_manifolds():
  """Precision and recall (k-NN manifolds) on constructed sets: the data against itself is (1, 1); samples
  of one of its two modes are realistic but cover half; samples far away are (0, 0). Catches precision and
  recall swapped, and radii taken from the wrong set."""
  rng = np.random.default_rng(6)
  blob = lambda center, n: center + 0.1 * rng.standard_normal((n, 2))
  real = np.concatenate([blob([0, 0], 200), blob([10, 0], 200)])
  assert metrics.precision_recall(real, real) == (1.0, 1.0)
  # Samples of one of the two modes: all realistic, half the data covered.
  precision, recall = metrics.precision_recall(real, blob([0, 0], 200))
  assert precision > 0.95 and 0.4 < recall < 0.6
  # Samples far from the data: neither realistic nor covering.
  assert metrics.precision_recall(real, blob([5, 20], 200)) == (0.0, 0.0)


def one_hot(classes, num=10):
  return np.eye(num)[classes]


def test_class_coverage_kl_and_score():
  """Class coverage, class KL and the classifier score on one-hot predictions: balanced covers 10 classes
  with KL 0 and score 10; collapsed covers 1 with KL log 10 and score 1; classes under 2% of the samples are
  not covered. Catches a coverage that counts stray predictions, KL in the wrong direction, and a score that
  is not exp(mean KL)."""
  balanced = one_hot(np.arange(1000) % 10)
  collapsed = one_hot(np.full(1000, 3))
  uniform = np.full(10, 0.1)
  assert metrics.class_coverage(balanced) == 10
  assert metrics.class_coverage(collapsed) == 1  # a collapsed generator covers one class
  assert metrics.class_coverage(one_hot(np.r_[np.zeros(990, int), np.arange(1, 11) % 10])) == 1  # <2%
  assert metrics.class_kl(balanced, uniform) == pytest.approx(0.0, abs=1e-12)
  assert metrics.class_kl(collapsed, uniform) == pytest.approx(np.log(10))
  assert metrics.classifier_score(balanced) == pytest.approx(10.0)
  assert metrics.classifier_score(collapsed) == pytest.approx(1.0)
  assert metrics.classifier_score(np.full((50, 10), 0.1)) == pytest.approx(1.0)
