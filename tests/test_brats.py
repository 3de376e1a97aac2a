"""Tests for data_pipelines.brats: discovery, validation messages, loading, atomic writes."""

import dataclasses
import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from aspp_resunet import labels
from data_pipelines import brats
from data_pipelines import synthetic
from tests import bad_inputs
from tests import helpers

BRATS2020 = labels.get_scheme('brats2020')
BRATS2023 = labels.get_scheme('brats2023')


def _load(folder, scheme=BRATS2020, **kwargs):
  (case,) = [c for c in brats.discover_cases(os.path.dirname(folder), scheme)
             if c.case_id == os.path.basename(folder)]
  return brats.load_case(case, scheme, **kwargs)


def _error(folder, scheme=BRATS2020, **kwargs):
  with pytest.raises(brats.CaseError) as info:
    _load(folder, scheme, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


# Discovery.

def test_discovers_nested_download_layout_and_ignores_csv(tmp_path):
  nested = tmp_path / 'BraTS2020_TrainingData' / 'MICCAI_BraTS2020_TrainingData'
  for case_id in ('BraTS20_Training_002', 'BraTS20_Training_001'):
    helpers.write_case(str(nested), case_id)
  (nested / 'name_mapping.csv').write_text('a,b\n')
  (nested / 'survival_info.csv').write_text('a,b\n')
  cases = brats.discover_cases(str(tmp_path), BRATS2020)
  assert [c.case_id for c in cases] == ['BraTS20_Training_001', 'BraTS20_Training_002']
  assert set(cases[0].files) == {'t1', 't1ce', 't2', 'flair', 'seg'}


def test_discovers_brats2023_scheme(tmp_path):
  helpers.write_case(str(tmp_path), 'BraTS-GLI-00000-000', scheme_name='brats2023')
  (case,) = brats.discover_cases(str(tmp_path), BRATS2023)
  assert case.files['t1ce'].endswith('-t1c.nii.gz')
  loaded = brats.load_case(case, BRATS2023)
  assert set(np.unique(loaded.classes)) == {0, 1, 2, 3}


def test_suffixes_are_case_insensitive_and_nii_is_accepted(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1', extension='.nii')
  for name in os.listdir(folder):
    os.rename(os.path.join(folder, name), os.path.join(folder, name.replace('_t1ce', '_T1CE')))
  (case,) = brats.discover_cases(str(tmp_path), BRATS2020)
  assert case.files['t1ce'].endswith('_T1CE.nii')
  assert brats.load_case(case, BRATS2020).shape == helpers.SMALL_SHAPE


def test_nonstandard_segmentation_name_is_found(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'BraTS20_Training_355')
  os.rename(helpers.file_of(folder, 'seg'), os.path.join(folder, 'W39_1998.09.19_Segm.nii.gz'))
  (case,) = brats.discover_cases(str(tmp_path), BRATS2020)
  assert case.seg_fallback
  assert brats.load_case(case, BRATS2020).classes is not None


def test_empty_data_dir_is_refused(tmp_path):
  with pytest.raises(brats.DataDirError, match='no case folders'):
    brats.discover_cases(str(tmp_path), BRATS2020)


def test_missing_data_dir_is_refused(tmp_path):
  with pytest.raises(brats.DataDirError, match='not a directory'):
    brats.discover_cases(str(tmp_path / 'nope'), BRATS2020)


def test_duplicate_case_ids_are_refused(tmp_path):
  helpers.write_case(str(tmp_path / 'a'), 'Case1')
  helpers.write_case(str(tmp_path / 'b'), 'Case1')
  with pytest.raises(brats.DataDirError, match='case Case1: duplicate case id'):
    brats.discover_cases(str(tmp_path), BRATS2020)


# Validation: one line naming case, file and problem.

def test_valid_case_loads(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  loaded = _load(folder)
  assert loaded.shape == helpers.SMALL_SHAPE
  assert all(m.dtype == np.float32 for m in loaded.modalities)
  assert loaded.classes.dtype == np.uint8
  assert set(np.unique(loaded.classes)) == {0, 1, 2, 3}
  np.testing.assert_allclose(loaded.affine, synthetic.brats_affine(helpers.SMALL_SHAPE))
  assert loaded.zooms == (1.0, 1.0, 1.0)


@pytest.mark.parametrize('bad_case', [*bad_inputs.CASES, bad_inputs.LABEL_4_IN_BRATS2023],
                         ids=lambda bad_case: bad_case.name)
def test_each_bad_case_gives_its_one_line_message(tmp_path, monkeypatch, bad_case):
  folder = bad_case.write(str(tmp_path), 'Case1')
  if bad_case.name == 'unreadable_file' and os.geteuid() == 0:
    # root reads any file whatever its mode: the permission check is simulated here (the CLI
    # tests run the unreadable case as an unprivileged user).
    path, original = helpers.file_of(folder, 't1'), os.access
    monkeypatch.setattr(os, 'access', lambda p, mode: p != path and original(p, mode))
  message = _error(folder, labels.get_scheme(bad_case.scheme))
  assert bad_case.matches(message, 'Case1'), message


def test_missing_segmentation_is_fine_when_not_required(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1', with_seg=False)
  assert _load(folder, require_seg=False).classes is None


def test_segmentation_problems_are_not_read_when_not_needed(tmp_path):
  for bad_case in bad_inputs.CASES:
    if bad_case.segmentation_only:
      folder = bad_case.write(str(tmp_path), bad_case.name)
      assert _load(folder, require_seg=False, read_seg=False).classes is None


@pytest.mark.parametrize('dtype', [np.int16, np.uint8, np.float32, np.float64])
def test_segmentation_dtypes(tmp_path, dtype):
  folder = helpers.write_case(str(tmp_path), 'Case1', seg_dtype=dtype)
  assert set(np.unique(_load(folder).classes)) == {0, 1, 2, 3}


def test_constant_segmentation_is_valid(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1',
                              overrides={'seg': np.zeros(helpers.SMALL_SHAPE, np.uint8)})
  assert not _load(folder).classes.any()


def test_huge_header_is_refused_without_allocating(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  with open(helpers.file_of(folder, 't1'), 'wb') as stream:
    stream.write(bad_inputs.huge_header_bytes())
  tracemalloc.start()
  message = _error(folder)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert message.startswith('case Case1: Case1_t1.nii.gz: header claims (4000, 4000, 4000) = '
                            '64000000000 voxels, more than the limit')
  assert peak < 50 * 2**20


def test_non_utf8_file_name_is_reported_printably(tmp_path):
  bad_inputs.write_non_utf8_case(str(tmp_path))
  (case,) = brats.discover_cases(str(tmp_path), BRATS2020)
  with pytest.raises(brats.CaseError) as info:
    brats.load_case(case, BRATS2020)
  message = str(info.value)
  message.encode('utf-8')  # printable
  assert message == bad_inputs.NON_UTF8_MESSAGE


# Writing.

def test_write_nifti_is_atomic_and_round_trips(tmp_path):
  path = str(tmp_path / 'out.nii.gz')
  volume = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  affine = synthetic.brats_affine((2, 3, 4))
  brats.write_nifti(path, volume, affine)
  image = nib.load(path)
  np.testing.assert_array_equal(np.asanyarray(image.dataobj), volume)
  np.testing.assert_allclose(image.affine, affine)
  assert os.listdir(tmp_path) == ['out.nii.gz']


def test_write_nifti_failure_keeps_previous_file(tmp_path, monkeypatch):
  path = str(tmp_path / 'out.nii.gz')
  brats.write_nifti(path, np.zeros((2, 2, 2), np.uint8), np.eye(4))

  def disk_full(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(os, 'fsync', disk_full)
  with pytest.raises(OSError, match=f'cannot write {path}: No space left on device'):
    brats.write_nifti(path, np.ones((2, 2, 2), np.uint8), np.eye(4))
  assert os.listdir(tmp_path) == ['out.nii.gz']
  assert np.asanyarray(nib.load(path).dataobj).max() == 0


@pytest.mark.parametrize('case_id', ['..', '.', '', '../outside', 'site/case', 'site\\case'])
def test_case_ids_that_could_leave_the_output_folder_are_refused(tmp_path, case_id):
  # Output files are named after case ids (predict writes OUT/<case>.nii.gz).
  folder = helpers.write_case(str(tmp_path), 'Case1')
  (case,) = brats.discover_cases(str(tmp_path), BRATS2020)
  case = dataclasses.replace(case, case_id=case_id)
  with pytest.raises(brats.CaseError, match='case id is not a plain folder name'):
    brats.load_case(case, BRATS2020)
  assert os.path.isdir(folder)
