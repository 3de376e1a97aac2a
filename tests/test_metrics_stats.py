"""Tests for HD95/sensitivity/specificity conventions and the paired statistics."""

import numpy as np
import pytest
import scipy.spatial

from aspp_resunet import metrics
from aspp_resunet import stats


def _cube(shape, start, size):
  mask = np.zeros(shape, bool)
  mask[tuple(slice(s, s + size) for s in start)] = True
  return mask


def _sphere(shape, centre, radius):
  grid = np.indices(shape)
  return sum((g - c)**2 for g, c in zip(grid, centre)) <= radius**2


def _brute_force_hd95(a, b, spacing, mode):
  surface = lambda m: m & ~metrics.scipy.ndimage.binary_erosion(  # noqa: E731
      m, structure=metrics._SIX_CONNECTED, border_value=0)
  pa = np.argwhere(surface(a)) * spacing
  pb = np.argwhere(surface(b)) * spacing
  distances = scipy.spatial.distance.cdist(pa, pb)
  forward, backward = distances.min(axis=1), distances.min(axis=0)
  if mode == 'pooled':
    return np.percentile(np.concatenate([forward, backward]), 95)
  return max(np.percentile(forward, 95), np.percentile(backward, 95))


def test_identical_masks():
  mask = _sphere((20, 20, 20), (10, 10, 10), 5)
  assert metrics.hd95(mask, mask, (1, 1, 1)) == 0.0


def test_shifted_cube_hd95_is_the_shift():
  a = _cube((30, 30, 30), (5, 5, 5), 10)
  b = _cube((30, 30, 30), (8, 5, 5), 10)
  # Surface points of the shifted faces are 3 voxels apart; most others are at 0.
  assert metrics.hd95(a, b, (1, 1, 1)) == pytest.approx(3.0)
  assert metrics.hd95(a, b, (2, 1, 1)) == pytest.approx(6.0)  # anisotropic spacing, mm


def test_concentric_spheres():
  a = _sphere((40, 40, 40), (20, 20, 20), 12)
  b = _sphere((40, 40, 40), (20, 20, 20), 8)
  # Every surface point of one sphere is about 4 voxels from the other.
  assert metrics.hd95(a, b, (1, 1, 1)) == pytest.approx(4.0, abs=0.6)


@pytest.mark.parametrize('mode', ['pooled', 'max_directed'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_agrees_with_brute_force(mode, seed):
  rng = np.random.default_rng(seed)
  a = rng.random((12, 10, 9)) < 0.3
  b = rng.random((12, 10, 9)) < 0.3
  spacing = (1.0, 1.5, 2.5)
  assert metrics.hd95(a, b, spacing, mode) == pytest.approx(
      _brute_force_hd95(a, b, np.array(spacing), mode))


def test_masks_touching_the_volume_border():
  a = _cube((10, 10, 10), (0, 0, 0), 6)
  b = _cube((10, 10, 10), (0, 0, 0), 5)
  assert metrics.hd95(a, b, (1, 1, 1)) == pytest.approx(
      _brute_force_hd95(a, b, np.ones(3), 'pooled'))


def test_empty_conventions():
  empty = np.zeros((8, 8, 8), bool)
  full = _cube((8, 8, 8), (2, 2, 2), 3)
  assert metrics.hd95(empty, empty, (1, 1, 1)) == 0.0
  assert metrics.hd95(full, empty, (1, 1, 1)) == metrics.HD95_ONE_EMPTY
  assert metrics.hd95(empty, full, (1, 1, 1)) == metrics.HD95_ONE_EMPTY
  classes = np.zeros((8, 8, 8), np.uint8)
  both_empty = metrics.case_metrics(classes, classes, (1, 1, 1))
  assert both_empty['dice_et'] == 1.0 and both_empty['hd95_et'] == 0.0
  assert both_empty['sensitivity_et'] == 1.0 and both_empty['specificity_et'] == 1.0
  predicted = classes.copy()
  predicted[full] = 3
  one_empty = metrics.case_metrics(predicted, classes, (1, 1, 1))
  assert one_empty['dice_et'] == 0.0 and one_empty['hd95_et'] == metrics.HD95_ONE_EMPTY
  assert one_empty['specificity_et'] == pytest.approx(1 - 27 / 512)
  missed = metrics.case_metrics(classes, predicted, (1, 1, 1))
  assert missed['dice_et'] == 0.0 and missed['sensitivity_et'] == 0.0


def test_case_metrics_counts():
  truth = np.zeros((10, 10, 10), np.uint8)
  truth[2:6, 2:6, 2:6] = 2  # 64 edema
  truth[3:5, 3:5, 3:5] = 3  # 8 enhancing
  predicted = np.zeros_like(truth)
  predicted[2:6, 2:6, 2:4] = 2  # 32 voxels of WT
  result = metrics.case_metrics(predicted, truth, (1, 1, 1))
  assert result['dice_wt'] == pytest.approx(2 * 32 / (32 + 64))
  assert result['sensitivity_wt'] == pytest.approx(0.5)
  assert result['specificity_wt'] == 1.0
  assert result['dice_tc'] == 0.0 and result['dice_et'] == 0.0
  assert set(result) == set(metrics.METRIC_COLUMNS)


def test_whole_brats_volume_region_is_fast():
  import time

  a = _sphere((240, 240, 155), (120, 120, 77), 30)
  b = _sphere((240, 240, 155), (123, 118, 77), 28)
  started = time.perf_counter()
  metrics.hd95(a, b, (1, 1, 1))
  # A generous bound that catches a whole-volume distance transform per call (~3 s here).
  assert time.perf_counter() - started < 2.0


def test_voxel_spacing_from_affine():
  affine = np.diag([-1.0, -1.0, 1.0, 1.0])
  assert metrics.voxel_spacing(affine) == (1.0, 1.0, 1.0)
  assert metrics.voxel_spacing(np.diag([0.5, 2.0, 3.0, 1.0])) == (0.5, 2.0, 3.0)


def test_summary():
  s = stats.summary([1.0, 2.0, 3.0, 4.0, np.nan])
  assert s == {'n': 4, 'mean': 2.5, 'std': pytest.approx(np.std([1, 2, 3, 4], ddof=1)),
               'median': 2.5, 'q1': 1.75, 'q3': 3.25}


def test_wilcoxon_matches_scipy_and_reports_method():
  rng = np.random.default_rng(0)
  a = rng.random(20)
  b = a + rng.normal(0.05, 0.05, 20)
  result = stats.wilcoxon(a, b)
  reference = stats.scipy.stats.wilcoxon(a, b, method='exact')
  assert result['p_value'] == pytest.approx(reference.pvalue)
  assert result['method'] == 'exact'
  assert result['n'] == 20 and result['n_zero_differences'] == 0


def test_wilcoxon_zero_differences_and_ties():
  a = np.array([1.0, 1.0, 0.5, 0.7, 0.9, 0.2])
  b = np.array([1.0, 1.0, 0.4, 0.6, 0.8, 0.1])  # two zeros, four tied differences
  result = stats.wilcoxon(a, b)
  assert result['n_zero_differences'] == 2
  assert result['method'] == 'approx'
  all_zero = stats.wilcoxon(a, a)
  assert all_zero['p_value'] == 1.0 and all_zero['statistic'] is None


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
  differences = np.random.default_rng(0).normal(0.1, 0.05, 30)
  first = stats.bootstrap_mean_ci(differences, seed=1)
  assert first == stats.bootstrap_mean_ci(differences, seed=1)
  assert first['low'] < differences.mean() < first['high']
  assert first['resamples'] == 10_000


def test_paired_comparison_refuses_different_cases():
  first = {'a': {'dice_wt': 1.0}, 'b': {'dice_wt': 0.5}}
  second = {'a': {'dice_wt': 1.0}, 'c': {'dice_wt': 0.5}}
  with pytest.raises(stats.CaseMismatchError, match=r"only in the first: \['b'\]"):
    stats.paired_comparison(first, second, ['dice_wt'])


def test_paired_comparison_differences():
  first = {f'c{i}': {'dice_wt': 0.8 + 0.01 * i} for i in range(8)}
  second = {f'c{i}': {'dice_wt': 0.7 + 0.012 * i} for i in range(8)}
  result = stats.paired_comparison(first, second, ['dice_wt'])['dice_wt']
  assert result['n'] == 8
  assert result['mean_difference'] == pytest.approx(np.mean([0.1 - 0.002 * i for i in range(8)]))
  assert result['wilcoxon']['p_value'] < 0.05
