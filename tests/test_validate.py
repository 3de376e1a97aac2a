"""Tests for the validate command line."""

import os
import subprocess
import sys

import numpy as np

from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'data_pipelines.validate', *args], cwd=REPO,
                        capture_output=True, text=True, check=False)


def test_all_valid_exits_zero_with_count(tmp_path):
  for case_id in ('A', 'B'):
    helpers.write_case(str(tmp_path), case_id)
  result = _run(f'--data_dir={tmp_path}')
  assert result.returncode == 0
  assert result.stdout.strip() == '2 of 2 cases valid'


def test_bad_cases_one_line_each_exit_one(tmp_path):
  helpers.write_case(str(tmp_path), 'Good')
  helpers.write_case(str(tmp_path), 'NoFlair', overrides={'flair': None})
  helpers.write_case(str(tmp_path), 'Nan',
                     overrides={'t1': np.full(helpers.SMALL_SHAPE, np.nan, np.float32)})
  result = _run(f'--data_dir={tmp_path}')
  assert result.returncode == 1
  assert result.stdout.splitlines() == [
      'case Nan: Nan_t1.nii.gz: 7680 non-finite voxels (NaN or Inf)',
      'case NoFlair: missing flair (no file ending in _flair.nii.gz or .nii)',
      '1 of 3 cases valid, 2 invalid',
  ]
  assert 'Traceback' not in result.stderr


def test_skip_invalid_exits_zero_when_some_cases_are_valid(tmp_path):
  helpers.write_case(str(tmp_path), 'Good')
  helpers.write_case(str(tmp_path), 'NoFlair', overrides={'flair': None})
  result = _run(f'--data_dir={tmp_path}', '--skip_invalid')
  assert result.returncode == 0
  assert result.stdout.splitlines()[-1] == '1 of 2 cases valid, 1 invalid'
  only_bad = tmp_path / 'only_bad'
  helpers.write_case(str(only_bad), 'NoFlair', overrides={'flair': None})
  assert _run(f'--data_dir={only_bad}', '--skip_invalid').returncode == 1


def test_missing_segmentation_allowed_for_prediction_input(tmp_path):
  helpers.write_case(str(tmp_path), 'A', with_seg=False)
  assert _run(f'--data_dir={tmp_path}').returncode == 1
  assert _run(f'--data_dir={tmp_path}', '--norequire_seg').returncode == 0


def test_brats2023_scheme(tmp_path):
  helpers.write_case(str(tmp_path), 'BraTS-GLI-00001-000', scheme_name='brats2023')
  assert _run(f'--data_dir={tmp_path}', '--scheme=brats2023').returncode == 0
  result = _run(f'--data_dir={tmp_path}')
  assert result.returncode == 1
  assert 'no case folders with brats2020 files' in result.stderr
  assert 'uses the brats2023 naming (pass --scheme=brats2023)' in result.stderr


def test_empty_dir_is_an_error(tmp_path):
  result = _run(f'--data_dir={tmp_path}')
  assert result.returncode == 1
  assert result.stderr.strip().startswith('error: data dir')
  assert 'Traceback' not in result.stderr
