"""Tests for data_pipelines.brats: discovery, validation messages, loading, atomic writes."""

import gzip
import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from aspp_resunet import labels
from data_pipelines import brats
from data_pipelines import synthetic
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


def test_missing_modality(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1', overrides={'t2': None})
  assert _error(folder) == 'case Case1: missing t2 (no file ending in _t2.nii.gz or .nii)'


def test_missing_segmentation_is_an_error_only_when_required(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1', with_seg=False)
  assert _error(folder) == 'case Case1: missing seg (no file ending in _seg.nii.gz or .nii)'
  assert _load(folder, require_seg=False).classes is None


def test_two_files_for_one_modality(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  path = helpers.file_of(folder, 't1')
  os.link(path, path.replace('.nii.gz', '.nii'))
  assert _error(folder).startswith('case Case1: several files match t1: Case1_t1.nii, ')


def test_empty_file(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  open(helpers.file_of(folder, 'flair'), 'wb').close()
  assert _error(folder) == 'case Case1: Case1_flair.nii.gz: empty file'


def test_not_a_nifti(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  with open(helpers.file_of(folder, 't1'), 'wb') as stream:
    stream.write(gzip.compress(b'this is not an image' * 100))
  assert _error(folder).startswith('case Case1: Case1_t1.nii.gz: not a readable NIfTI file (')


def test_truncated_gzip(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  path = helpers.file_of(folder, 't1ce')
  data = open(path, 'rb').read()
  with open(path, 'wb') as stream:
    stream.write(data[:len(data) // 2])
  assert _error(folder) == 'case Case1: Case1_t1ce.nii.gz: truncated gzip file (unexpected end ' \
      'of data)'


def test_4d_volume(tmp_path):
  folder = helpers.write_case(
      str(tmp_path), 'Case1', overrides={'t2': np.zeros(helpers.SMALL_SHAPE + (2,), np.int16)})
  assert _error(folder) == 'case Case1: Case1_t2.nii.gz: expected a 3D volume, header says 4D ' \
      '(24, 20, 16, 2)'


def test_2d_volume(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1',
                              overrides={'t2': np.zeros((24, 20), np.int16)})
  assert 'expected a 3D volume, header says 2D (24, 20)' in _error(folder)


def test_shape_mismatch(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1',
                              overrides={'flair': np.ones((24, 20, 15), np.int16)})
  assert _error(folder) == 'case Case1: Case1_flair.nii.gz: shape (24, 20, 15) differs from ' \
      't1 (24, 20, 16)'


def test_affine_mismatch(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  path = helpers.file_of(folder, 't1ce')
  image = nib.load(path)
  affine = image.affine.copy()
  affine[0, 3] += 0.01
  nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
  assert _error(folder) == 'case Case1: Case1_t1ce.nii.gz: affine differs from t1 by more ' \
      'than 0.001'


def test_nan_voxels(tmp_path):
  volume = np.ones(helpers.SMALL_SHAPE, np.float32)
  volume[0, 0, :3] = np.nan
  volume[1, 1, 1] = np.inf
  folder = helpers.write_case(str(tmp_path), 'Case1', overrides={'t2': volume})
  assert _error(folder) == 'case Case1: Case1_t2.nii.gz: 4 non-finite voxels (NaN or Inf)'


def test_label_outside_the_scheme(tmp_path):
  _, seg = helpers.case_volumes()
  seg = seg.copy()
  seg[0, 0, 0] = 3  # a 3 in a brats2020 case
  folder = helpers.write_case(str(tmp_path), 'Case1', overrides={'seg': seg})
  assert _error(folder) == 'case Case1: Case1_seg.nii.gz: labels [3] outside the brats2020 ' \
      'set {0,1,2,4}'


def test_label_4_in_a_brats2023_case(tmp_path):
  _, seg = helpers.case_volumes(scheme_name='brats2023')
  seg = seg.copy()
  seg[0, 0, 0] = 4
  folder = helpers.write_case(str(tmp_path), 'Case1', scheme_name='brats2023',
                              overrides={'seg': seg})
  assert _error(folder, BRATS2023) == 'case Case1: Case1-seg.nii.gz: labels [4] outside the ' \
      'brats2023 set {0,1,2,3}'


@pytest.mark.parametrize('dtype', [np.int16, np.uint8, np.float32, np.float64])
def test_segmentation_dtypes(tmp_path, dtype):
  folder = helpers.write_case(str(tmp_path), 'Case1', seg_dtype=dtype)
  assert set(np.unique(_load(folder).classes)) == {0, 1, 2, 3}


def test_float_segmentation_with_non_integer_values(tmp_path):
  _, seg = helpers.case_volumes()
  seg = seg.astype(np.float32)
  seg[0, 0, 0] = 1.5
  folder = helpers.write_case(str(tmp_path), 'Case1', overrides={'seg': seg})
  assert _error(folder) == 'case Case1: Case1_seg.nii.gz: segmentation has non-integer label ' \
      'values'


def test_huge_header_is_refused_without_allocating(tmp_path):
  folder = helpers.write_case(str(tmp_path), 'Case1')
  header = nib.Nifti1Header()
  header.set_data_dtype(np.float32)
  header.set_data_shape((4000, 4000, 4000))  # 256 GB as float32
  with gzip.open(helpers.file_of(folder, 't1'), 'wb') as stream:
    stream.write(header.binaryblock + b'\0' * 4 + b'\0' * 1024)
  tracemalloc.start()
  message = _error(folder)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert message.startswith('case Case1: Case1_t1.nii.gz: header claims (4000, 4000, 4000) = '
                            '64000000000 voxels, more than the limit')
  assert peak < 50 * 2**20


def test_unreadable_file(tmp_path):
  if os.geteuid() == 0:
    # root reads any file whatever its mode: simulate the permission check instead.
    folder = helpers.write_case(str(tmp_path), 'Case1')
    path = helpers.file_of(folder, 't1')
    original = os.access
    try:
      os.access = lambda p, mode: False if p == path else original(p, mode)
      assert _error(folder) == 'case Case1: Case1_t1.nii.gz: not readable (permission denied)'
    finally:
      os.access = original
  else:
    folder = helpers.write_case(str(tmp_path), 'Case1')
    os.chmod(helpers.file_of(folder, 't1'), 0)
    assert _error(folder) == 'case Case1: Case1_t1.nii.gz: not readable (permission denied)'


def test_non_utf8_file_name_is_reported_printably(tmp_path):
  root = os.fsencode(str(tmp_path))
  folder = helpers.write_case(str(tmp_path), 'Case1')
  bad = os.path.join(root, b'Case\xff')
  os.rename(os.fsencode(folder), bad)
  for name in os.listdir(bad):
    os.rename(os.path.join(bad, name), os.path.join(bad, name.replace(b'Case1', b'Case\xff')))
  os.remove(os.path.join(bad, b'Case\xff_t2.nii.gz'))
  (case,) = brats.discover_cases(str(tmp_path), BRATS2020)
  with pytest.raises(brats.CaseError) as info:
    brats.load_case(case, BRATS2020)
  message = str(info.value)
  message.encode('utf-8')  # printable
  assert message.startswith('case Case\\udcff: missing t2')


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
  with pytest.raises(OSError, match='No space left'):
    brats.write_nifti(path, np.ones((2, 2, 2), np.uint8), np.eye(4))
  assert os.listdir(tmp_path) == ['out.nii.gz']
  assert np.asanyarray(nib.load(path).dataobj).max() == 0
