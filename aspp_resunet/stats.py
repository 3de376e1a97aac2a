"""Summary statistics and the paired model comparison (Wilcoxon signed-rank, bootstrap CI)."""

import numpy as np
import scipy.stats

BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95
# scipy computes the exact null distribution up to this many non-zero differences.
_EXACT_MAX_N = 50


class CaseMismatchError(ValueError):
  """The two runs were evaluated on different cases."""


def summary(values):
  """n, mean, std (sample, ddof=1), median, q1, q3 of finite values."""
  values = np.asarray(values, np.float64)
  values = values[np.isfinite(values)]
  if values.size == 0:
    return {'n': 0, 'mean': None, 'std': None, 'median': None, 'q1': None, 'q3': None}
  return {'n': int(values.size), 'mean': float(values.mean()),
          'std': float(values.std(ddof=1)) if values.size > 1 else 0.0,
          'median': float(np.median(values)), 'q1': float(np.percentile(values, 25)),
          'q3': float(np.percentile(values, 75))}


def wilcoxon(first, second):
  """Two-sided Wilcoxon signed-rank test of paired samples.

  Zero differences are dropped (Wilcoxon's original method, `zero_method='wilcox'`); the
  exact null distribution is used when at most 50 non-zero differences remain and none are
  tied, the normal approximation (with continuity correction) otherwise.

  Returns:
    {'statistic', 'p_value', 'method', 'n', 'n_zero_differences', 'zero_method'}.
  """
  differences = np.asarray(first, np.float64) - np.asarray(second, np.float64)
  nonzero = differences[differences != 0]
  result = {'n': int(differences.size), 'n_zero_differences': int(differences.size -
                                                                   nonzero.size),
            'zero_method': 'wilcox (zero differences dropped)'}
  if nonzero.size == 0:
    return {**result, 'statistic': None, 'p_value': 1.0,
            'method': 'none (all differences are zero)'}
  ties = np.unique(np.abs(nonzero)).size < nonzero.size
  method = 'exact' if nonzero.size <= _EXACT_MAX_N and not ties else 'approx'
  test = scipy.stats.wilcoxon(nonzero, zero_method='wilcox', correction=method == 'approx',
                              alternative='two-sided', method=method)
  return {**result, 'statistic': float(test.statistic), 'p_value': float(test.pvalue),
          'method': method}


def bootstrap_mean_ci(differences, seed=0, resamples=BOOTSTRAP_RESAMPLES):
  """Percentile bootstrap CI of the mean of paired differences (seeded)."""
  differences = np.asarray(differences, np.float64)
  if differences.size < 2 or np.all(differences == differences[0]):
    value = float(differences.mean()) if differences.size else None
    return {'low': value, 'high': value, 'resamples': 0, 'confidence': CONFIDENCE,
            'method': 'degenerate (fewer than 2 cases or constant differences)'}
  result = scipy.stats.bootstrap(
      (differences,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
      method='percentile', rng=np.random.default_rng(seed), vectorized=True)
  return {'low': float(result.confidence_interval.low),
          'high': float(result.confidence_interval.high), 'resamples': resamples,
          'confidence': CONFIDENCE, 'method': 'percentile'}


def paired_comparison(first, second, columns, seed=0):
  """Compares two models case by case.

  Args:
    first, second: {case_id: {column: value}} for each model.
    columns: metric columns to compare (e.g. metrics.METRIC_COLUMNS).
    seed: bootstrap seed.

  Returns:
    {column: {'mean_difference', 'ci', 'wilcoxon', 'first': summary, 'second': summary}},
    differences are first - second.

  Raises:
    CaseMismatchError: the case ids differ.
  """
  if sorted(first) != sorted(second):
    only_first = sorted(set(first) - set(second))
    only_second = sorted(set(second) - set(first))
    raise CaseMismatchError(
        f'the two runs were evaluated on different cases (only in the first: {only_first[:5]}, '
        f'only in the second: {only_second[:5]}); compare runs on the same split')
  case_ids = sorted(first)
  comparison = {}
  for column in columns:
    a = np.array([first[c][column] for c in case_ids], np.float64)
    b = np.array([second[c][column] for c in case_ids], np.float64)
    comparison[column] = {
        'n': len(case_ids), 'mean_difference': float(np.mean(a - b)),
        'ci': bootstrap_mean_ci(a - b, seed=seed), 'wilcoxon': wilcoxon(a, b),
        'first': summary(a), 'second': summary(b)}
  return comparison
