"""Sample-quality metrics on feature vectors and class probabilities. numpy/scipy only, float64 inside.

All functions take *features* (n, d) of real and generated images from the same evaluator network
(evaluator.py), or its class probabilities (n, classes). None of them needs JAX or TensorFlow.

  fid                 Fréchet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017).
  kid                 Kernel Inception Distance: unbiased MMD^2 with the kernel (x.y / d + 1)^3, mean and
                      std over random subsets (Binkowski et al. 2018).
  precision_recall    k-NN manifold precision and recall (Kynkäänniemi et al. 2019).
  class_coverage      how many classes get at least 2% of the samples (mode coverage).
  class_kl            KL(generated class histogram || data class histogram).
  classifier_score    the Inception Score computed with the evaluator's classifier.
"""

from typing import Tuple

import numpy as np
import scipy.linalg


def _float64(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"expected a 2-D array (samples, features), got shape {x.shape}")
  return x


def gaussian_stats(features) -> Tuple[np.ndarray, np.ndarray]:
  """(mean (d,), covariance (d, d)) of features (n, d), unbiased covariance, float64."""
  x = _float64(features)
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) for two Gaussians.

  tr (S1 S2)^(1/2) is computed as sum(sqrt(eig(A S2 A))) with A = S1^(1/2) (symmetric): A S2 A is
  symmetric positive semi-definite and has the eigenvalues of S1 S2, so `eigh` applies, its tiny negative
  round-off eigenvalues are clipped to 0, and no complex square root of a non-symmetric matrix (the
  pytorch-fid route, with its eps retries) is needed.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  w, v = scipy.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  middle = root1 @ sigma2 @ root1
  eig = scipy.linalg.eigvalsh((middle + middle.T) / 2)
  tr_covmean = np.sum(np.sqrt(np.clip(eig, 0, None)))
  diff = mu1 - mu2
  return float(max(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean, 0.0))


def fid(features_a, features_b) -> float:
  """Fréchet distance between the Gaussian fits of two feature sets (n, d) and (m, d)."""
  a, b = _float64(features_a), _float64(features_b)
  if max(len(a), len(b)) <= a.shape[1]:
    return fid_from_samples(a, b)
  return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))


def fid_from_samples(features_a, features_b) -> float:
  """fid's value computed from the centred samples, for sets smaller than the feature dimension.

  With S = A^T A (A: the centred features / sqrt(n - 1)), the non-zero eigenvalues of S1 S2 are the
  squared singular values of A2 A1^T (m, n), so tr (S1 S2)^(1/2) is that matrix's nuclear norm and
  tr S = ||A||_F^2: no (d, d) matrix is formed (2048-d Inception features: seconds saved per call).
  """
  a, b = _float64(features_a), _float64(features_b)
  ca = (a - a.mean(0)) / np.sqrt(len(a) - 1)
  cb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
  tr_covmean = np.linalg.svd(cb @ ca.T, compute_uv=False).sum()
  diff = a.mean(0) - b.mean(0)
  return float(max(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2 * tr_covmean, 0.0))


def _polynomial_kernel(x, y):
  return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x, y) -> float:
  """Unbiased MMD^2 (diagonals of K_xx and K_yy excluded) with the cubic polynomial kernel."""
  x, y = _float64(x), _float64(y)
  m, n = len(x), len(y)
  kxx, kyy, kxy = _polynomial_kernel(x, x), _polynomial_kernel(y, y), _polynomial_kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2 * kxy.mean())


def kid(features_a, features_b, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> Tuple[float, float]:
  """KID: mean and standard deviation of mmd2_unbiased over `num_subsets` random subset pairs of
  min(subset_size, n, m) points each (drawn without replacement, seeded). Values can be slightly
  negative for near-identical distributions: the estimator is unbiased, not clipped."""
  a, b = _float64(features_a), _float64(features_b)
  size = min(subset_size, len(a), len(b))
  if size < 2:
    raise ValueError("KID needs at least 2 samples in each set")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(a[rng.choice(len(a), size, replace=False)],
                          b[rng.choice(len(b), size, replace=False)]) for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def _pairwise_distances(x, y) -> np.ndarray:
  """Euclidean distances (len(x), len(y)), float64."""
  sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T
  return np.sqrt(np.clip(sq, 0, None))


def knn_radii(features, k: int = 3, chunk: int = 2048) -> np.ndarray:
  """Distance from each point to its k-th nearest *other* point of the same set: (n,)."""
  x = _float64(features)
  if len(x) <= k:
    raise ValueError(f"k-NN radii need more than k={k} points, got {len(x)}")
  radii = np.empty(len(x))
  for start in range(0, len(x), chunk):
    d = _pairwise_distances(x[start:start + chunk], x)
    radii[start:start + chunk] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
  return radii


def _fraction_inside(queries, points, radii, chunk: int = 2048) -> float:
  """Fraction of queries within radii[i] of some points[i] (inside the union of k-NN balls)."""
  inside = np.zeros(len(queries), bool)
  for start in range(0, len(queries), chunk):
    d = _pairwise_distances(queries[start:start + chunk], points)
    inside[start:start + chunk] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real_features, fake_features, k: int = 3) -> Tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019), k = 3 as in the paper.

  precision: fraction of generated samples inside the real manifold (the union of balls around each
  real point reaching its k-th nearest real neighbour): how realistic the samples are.
  recall: fraction of real samples inside the generated manifold: how much of the data is covered.
  """
  real, fake = _float64(real_features), _float64(fake_features)
  precision = _fraction_inside(fake, real, knn_radii(real, k))
  recall = _fraction_inside(real, fake, knn_radii(fake, k))
  return precision, recall


def class_histogram(probs) -> np.ndarray:
  """Fraction of samples whose most probable class is c, for each c: probs (n, classes) -> (classes,)."""
  probs = _float64(probs)
  return np.bincount(probs.argmax(1), minlength=probs.shape[1]) / len(probs)


def class_coverage(probs, threshold: float = 0.02) -> int:
  """Number of classes that receive at least `threshold` of the samples (argmax class)."""
  return int(np.sum(class_histogram(probs) >= threshold))


def class_kl(probs, reference_histogram, eps: float = 1e-12) -> float:
  """KL(q || p) in nats: q = the samples' predicted class histogram, p = the data's. 0 when they match,
  log(classes) for samples all of one class against balanced data; finite even when q has empty
  classes (p, the data's, has none)."""
  q = class_histogram(probs)
  p = np.asarray(reference_histogram, np.float64)
  nz = q > 0
  return float(np.sum(q[nz] * (np.log(q[nz]) - np.log(np.maximum(p[nz], eps)))))


def classifier_score(probs, eps: float = 1e-12) -> float:
  """exp(E_x KL(p(y|x) || p(y))): the Inception Score with the evaluator's classifier. Between 1 and the
  number of classes; high when each sample is confidently one class and the classes are balanced."""
  probs = _float64(probs)
  marginal = probs.mean(0)
  kl = np.sum(probs * (np.log(probs + eps) - np.log(marginal + eps)[None, :]), axis=1)
  return float(np.exp(kl.mean()))
