"""Tests for data_pipelines.synthetic."""

import csv
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from aspp_resunet import labels
from data_pipelines import brats
from data_pipelines import synthetic

SHAPE = (64, 64, 48)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def cohort(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('cohort'))
  summaries = synthetic.generate_cohort(directory, 3, seed=7, shape=SHAPE, workers=1)
  return directory, summaries


def test_layout_dtypes_affine_and_labels(cohort):
  directory, summaries = cohort
  scheme = labels.get_scheme('brats2020')
  cases = brats.discover_cases(directory, scheme)
  assert [c.case_id for c in cases] == ['SynthBraTS_0001', 'SynthBraTS_0002', 'SynthBraTS_0003']
  for case in cases:
    assert sorted(os.listdir(case.directory)) == sorted(
        f'{case.case_id}_{suffix}.nii.gz' for suffix in ('t1', 't1ce', 't2', 'flair', 'seg'))
    for key, path in case.files.items():
      image = nib.load(path)
      assert image.shape == SHAPE
      assert image.get_data_dtype() == (np.uint8 if key == 'seg' else np.int16)
      np.testing.assert_allclose(image.affine, synthetic.brats_affine(SHAPE))
      assert image.header.get_zooms() == (1.0, 1.0, 1.0)
    loaded = brats.load_case(case, scheme)  # passes validation
    assert set(np.unique(loaded.classes)) <= {0, 1, 2, 3}
    assert labels.region_mask(loaded.classes, 'wt').sum() > 0
  assert os.path.exists(os.path.join(directory, synthetic.COHORT_CSV))
  with open(os.path.join(directory, synthetic.COHORT_CSV)) as stream:
    rows = list(csv.DictReader(stream))
  assert [r['case_id'] for r in rows] == [s.case_id for s in summaries]


def test_real_brats_affine():
  np.testing.assert_array_equal(
      synthetic.brats_affine(), [[-1, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]])


def test_deterministic_per_seed_and_independent_of_cohort_size():
  first = synthetic.generate_case(synthetic._case_rng(3, 1), SHAPE)
  again = synthetic.generate_case(synthetic._case_rng(3, 1), SHAPE)
  other = synthetic.generate_case(synthetic._case_rng(4, 1), SHAPE)
  for a, b in zip(first[0] + [first[1]], again[0] + [again[1]]):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(first[0][0], other[0][0])


def test_written_cohort_is_reproducible(tmp_path):
  synthetic.generate_cohort(str(tmp_path / 'a'), 2, seed=1, shape=SHAPE, workers=2)
  synthetic.generate_cohort(str(tmp_path / 'b'), 1, seed=1, shape=SHAPE, workers=1)
  for suffix in ('t1', 'flair', 'seg'):
    name = f'SynthBraTS_0001/SynthBraTS_0001_{suffix}.nii.gz'
    a = np.asanyarray(nib.load(str(tmp_path / 'a' / name)).dataobj)
    b = np.asanyarray(nib.load(str(tmp_path / 'b' / name)).dataobj)
    np.testing.assert_array_equal(a, b)


def test_tumour_contrast_follows_real_mri_and_is_not_threshold_separable():
  rng = synthetic._case_rng(0, 0)
  while True:
    modalities, segmentation, low_grade = synthetic.generate_case(rng, (120, 120, 78))
    if not low_grade:
      break
  classes = labels.labels_to_classes(segmentation, labels.get_scheme('brats2020'))
  t1, t1ce, t2, flair = [m.astype(np.float32) for m in modalities]
  normal = (t1 > 0) & (classes == 0)
  enhancing = classes == labels.ENHANCING_TUMOR
  edema = classes == labels.EDEMA
  necrosis = classes == labels.NECROTIC_CORE
  assert np.median(t1ce[enhancing]) > 1.2 * np.median(t1ce[normal])
  assert np.median(flair[edema]) > 1.4 * np.median(flair[normal])
  assert np.median(t2[edema]) > 1.2 * np.median(t2[normal])
  assert np.median(t1ce[necrosis]) < np.median(t1ce[enhancing])
  # No single FLAIR threshold separates edema from normal brain: the best still errs on >1%.
  values = np.concatenate([flair[edema], flair[normal]])
  truth = np.concatenate([np.ones(edema.sum(), bool), np.zeros(normal.sum(), bool)])
  errors = [((values > t) != truth).sum() for t in np.quantile(values, np.linspace(0, 1, 201))]
  assert min(errors) > 0.01 * edema.sum()


def test_cli_writes_cohort(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.synthetic', f'--output_dir={tmp_path}',
       '--num_cases=2', '--seed=5', '--shape=40,40,32', '--workers=1'],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert 'wrote 2 cases' in result.stdout
  assert len(brats.discover_cases(str(tmp_path), labels.get_scheme('brats2020'))) == 2


def test_cli_rejects_bad_shape(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'data_pipelines.synthetic', f'--output_dir={tmp_path}',
       '--shape=40,40'], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode != 0
  assert '--shape must be three integers' in result.stderr
  assert 'Traceback' not in result.stderr
