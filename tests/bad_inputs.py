"""The bad-input corpus: case folders each broken in one way, with the message each must give."""

from collections.abc import Callable
import dataclasses
import gzip
import os

import nibabel as nib
import numpy as np

from tests import helpers


@dataclasses.dataclass(frozen=True)
class BadCase:
  """One kind of broken case folder.

  `message` is the whole line the loader must print, with `{case}` for the case id; when
  `prefix` it is the start of the line (the rest quotes a library's wording).
  """
  name: str
  write: Callable[[str, str], str]  # (root, case_id) -> the case folder, written
  message: str
  prefix: bool = False
  segmentation_only: bool = False  # a problem of the segmentation: predict does not read it
  scheme: str = 'brats2020'

  def expected(self, case_id):
    return self.message.format(case=case_id)

  def matches(self, line, case_id):
    expected = self.expected(case_id)
    return line.startswith(expected) if self.prefix else line == expected


def _with(overrides=None, **kwargs):
  return lambda root, case_id: helpers.write_case(root, case_id, overrides=overrides, **kwargs)


def _then(write, damage):
  """A good case written by `write`, then `damage(folder, case_id)` applied to it."""
  def build(root, case_id):
    folder = write(root, case_id)
    damage(folder, case_id)
    return folder
  return build


def _replace_file(key, data):
  def damage(folder, _):
    with open(helpers.file_of(folder, key), 'wb') as stream:
      stream.write(data)
  return damage


def _truncate(key):
  def damage(folder, _):
    path = helpers.file_of(folder, key)
    data = open(path, 'rb').read()
    with open(path, 'wb') as stream:
      stream.write(data[:len(data) // 2])
  return damage


def _second_file(key):
  def damage(folder, _):
    path = helpers.file_of(folder, key)
    os.link(path, path.replace('.nii.gz', '.nii'))
  return damage


def _shift_affine(key):
  def damage(folder, _):
    path = helpers.file_of(folder, key)
    image = nib.load(path)
    affine = image.affine.copy()
    affine[0, 3] += 0.01
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
  return damage


def huge_header_bytes():
  """A gzip NIfTI whose header claims a 4000^3 float32 volume (256 GB) with 1 KB of data."""
  header = nib.Nifti1Header()
  header.set_data_dtype(np.float32)
  header.set_data_shape((4000, 4000, 4000))
  return gzip.compress(header.binaryblock + b'\0' * 4 + b'\0' * 1024)


def _non_finite():
  volume = np.ones(helpers.SMALL_SHAPE, np.float32)
  volume[0, 0, :3] = np.nan
  volume[1, 1, 1] = np.inf
  return volume


def _seg_with(value, dtype=None):
  _, segmentation = helpers.case_volumes()
  segmentation = segmentation.astype(dtype or segmentation.dtype)
  segmentation[0, 0, 0] = value
  return segmentation


def _make_unreadable(folder, _):
  os.chmod(helpers.file_of(folder, 't1'), 0)


CASES = (
    BadCase('missing_modality', _with({'t2': None}),
            'case {case}: missing t2 (no file ending in _t2.nii.gz or .nii)'),
    BadCase('missing_segmentation', _with(with_seg=False),
            'case {case}: missing seg (no file ending in _seg.nii.gz or .nii)',
            segmentation_only=True),
    BadCase('two_files_one_modality', _then(_with(), _second_file('t1')),
            'case {case}: several files match t1: {case}_t1.nii, ', prefix=True),
    BadCase('empty_file', _then(_with(), _replace_file('flair', b'')),
            'case {case}: {case}_flair.nii.gz: empty file'),
    BadCase('truncated_gzip', _then(_with(), _truncate('t1ce')),
            'case {case}: {case}_t1ce.nii.gz: truncated gzip file (unexpected end of data)'),
    BadCase('not_a_nifti',
            _then(_with(), _replace_file('t1', gzip.compress(b'this is not an image' * 100))),
            'case {case}: {case}_t1.nii.gz: not a readable NIfTI file (', prefix=True),
    BadCase('volume_4d', _with({'t2': np.zeros(helpers.SMALL_SHAPE + (2,), np.int16)}),
            'case {case}: {case}_t2.nii.gz: expected a 3D volume, header says 4D (24, 20, 16, 2)'),
    BadCase('volume_2d', _with({'t2': np.zeros((24, 20), np.int16)}),
            'case {case}: {case}_t2.nii.gz: expected a 3D volume, header says 2D (24, 20)'),
    BadCase('shape_mismatch', _with({'flair': np.ones((24, 20, 15), np.int16)}),
            'case {case}: {case}_flair.nii.gz: shape (24, 20, 15) differs from t1 (24, 20, 16)'),
    BadCase('affine_mismatch', _then(_with(), _shift_affine('t1ce')),
            'case {case}: {case}_t1ce.nii.gz: affine differs from t1 by more than 0.001'),
    BadCase('nan_and_inf_voxels', _with({'t2': _non_finite()}),
            'case {case}: {case}_t2.nii.gz: 4 non-finite voxels (NaN or Inf)'),
    BadCase('constant_volume', _with({'flair': np.zeros(helpers.SMALL_SHAPE, np.int16)}),
            'case {case}: {case}_flair.nii.gz: constant volume (every voxel is 0): no image '
            'content'),
    BadCase('label_outside_scheme', _with({'seg': _seg_with(3)}),
            'case {case}: {case}_seg.nii.gz: labels [3] outside the brats2020 set {{0,1,2,4}}',
            segmentation_only=True),
    BadCase('float_segmentation_non_integer', _with({'seg': _seg_with(1.5, np.float32)}),
            'case {case}: {case}_seg.nii.gz: segmentation has non-integer label values',
            segmentation_only=True),
    BadCase('huge_header', _then(_with(), _replace_file('t1', huge_header_bytes())),
            'case {case}: {case}_t1.nii.gz: header claims (4000, 4000, 4000) = 64000000000 '
            'voxels, more than the limit', prefix=True),
    BadCase('unreadable_file', _then(_with(), _make_unreadable),
            'case {case}: {case}_t1.nii.gz: not readable (permission denied)'),
)

def _brats2023_with_a_4(root, case_id):
  _, segmentation = helpers.case_volumes(scheme_name='brats2023')
  segmentation = segmentation.copy()
  segmentation[0, 0, 0] = 4
  return helpers.write_case(root, case_id, scheme_name='brats2023',
                            overrides={'seg': segmentation})


# A 4 in a brats2023 case (its enhancing tumour is 3): kept apart, it needs the brats2023 scheme.
LABEL_4_IN_BRATS2023 = BadCase(
    'label_4_in_brats2023', _brats2023_with_a_4,
    'case {case}: {case}-seg.nii.gz: labels [4] outside the brats2023 set {{0,1,2,3}}',
    segmentation_only=True, scheme='brats2023')

# A case whose folder and file names are not UTF-8: refused (case ids become file names and CSV,
# JSON and TFRecord fields), with the undecodable byte escaped so that the line stays printable.
NON_UTF8_NAME = b'Case\xff'
NON_UTF8_MESSAGE = 'case Case\\udcff: folder name is not valid UTF-8 (rename the case folder)'


def write_non_utf8_case(root):
  """Writes an otherwise valid case folder named b'Case\\xff' (its files likewise)."""
  folder = helpers.write_case(root, 'CaseNonUtf8')
  bad = os.path.join(os.fsencode(root), NON_UTF8_NAME)
  os.rename(os.fsencode(folder), bad)
  for name in os.listdir(bad):
    os.rename(os.path.join(bad, name),
              os.path.join(bad, name.replace(b'CaseNonUtf8', NON_UTF8_NAME)))
  return bad


# The same, as a corpus entry (its folder name is fixed, whatever case id it is given).
NON_UTF8 = BadCase('non_utf8_name', lambda root, _: write_non_utf8_case(root), NON_UTF8_MESSAGE)


def bad_case_id(bad_case):
  """The case id `write_corpus` gives `bad_case`'s folder."""
  return f'Bad_{bad_case.name}'


def write_corpus(root, good_cases=0, bad_cases=CASES):
  """Writes `good_cases` valid cases (Good_0, ...) and one case per entry of `bad_cases`.

  Returns:
    The ids of the good cases.
  """
  good = [f'Good_{index}' for index in range(good_cases)]
  for index, good_id in enumerate(good):
    helpers.write_case(root, good_id, seed=index)
  for bad_case in bad_cases:
    bad_case.write(root, bad_case_id(bad_case))
  return good
