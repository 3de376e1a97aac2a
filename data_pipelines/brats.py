"""BraTS folder discovery, per-case validation and loading (header checked before voxel data)."""

import dataclasses
import gzip
import os
import re
import zlib

from isal import igzip
from isal import isal_zlib
import nibabel as nib
import numpy as np

from aspp_resunet import labels as labels_lib

NIFTI_EXTENSIONS = ('.nii.gz', '.nii')
# A header claiming more voxels than this is refused before any voxel is read (512^3 float32 is
# 0.5 GiB per volume; real BraTS volumes have 8.9M voxels).
MAX_VOXELS = 512**3
AFFINE_TOLERANCE = 1e-3
# The one BraTS 2020 case whose segmentation is not named <case>_seg (BraTS20_Training_355 ships
# `W39_1998.09.19_Segm.nii`): a lone unmatched NIfTI whose name contains this is taken as the seg.
_SEG_FALLBACK_PATTERN = re.compile(r'seg', re.IGNORECASE)


def printable(path):
  """A path or name as a printable one-line string (non-UTF-8 bytes escaped)."""
  text = os.fsdecode(path)
  return text.encode('utf-8', 'backslashreplace').decode('utf-8').replace('\n', '\\n')


class CaseError(ValueError):
  """A problem with one case, rendered as a single line naming the case, file and problem."""

  def __init__(self, case_id, filename, problem):
    self.case_id = case_id
    self.filename = filename
    self.problem = problem
    where = f'case {printable(case_id)}'
    if filename:
      where += f': {printable(os.path.basename(filename))}'
    super().__init__(f'{where}: {problem}')


class DataDirError(ValueError):
  """A problem with the data directory as a whole (missing, empty, duplicate case ids)."""


@dataclasses.dataclass(frozen=True)
class Case:
  """One case folder: its id and the files found for each modality/segmentation key."""

  case_id: str
  directory: str
  files: dict  # key in MODALITIES + ('seg',) -> path; absent keys were not found
  duplicates: dict = dataclasses.field(default_factory=dict)  # key -> all matching paths
  seg_fallback: bool = False  # seg found by the non-standard-name rule


@dataclasses.dataclass
class LoadedCase:
  """A validated case in memory, in its original geometry."""

  case_id: str
  modalities: tuple  # float32 arrays in MODALITIES order, original shape
  classes: np.ndarray | None  # uint8 model classes, or None without segmentation
  affine: np.ndarray  # 4x4 float64, shared by all files of the case
  zooms: tuple  # voxel spacing in mm
  header: nib.Nifti1Header  # header of the first modality, reused when writing predictions

  @property
  def shape(self):
    return self.modalities[0].shape


def _strip_nifti_extension(name):
  lower = name.lower()
  for extension in NIFTI_EXTENSIONS:
    if lower.endswith(extension):
      return name[:-len(extension)]
  return None


def _match_key(stem, scheme):
  lower = stem.lower()
  for key, suffix in scheme.suffixes.items():
    if lower.endswith((scheme.separator + suffix).lower()):
      return key
  return None


def _case_from_folder(directory, filenames, scheme):
  files, duplicates, unmatched = {}, {}, []
  for filename in sorted(filenames):
    stem = _strip_nifti_extension(filename)
    if stem is None:
      continue  # CSVs, READMEs and other files beside the volumes are ignored
    key = _match_key(stem, scheme)
    path = os.path.join(directory, filename)
    if key is None:
      unmatched.append(path)
    elif key in files:
      duplicates.setdefault(key, [files[key]]).append(path)
    else:
      files[key] = path
  seg_fallback = False
  if not any(key in files for key in labels_lib.MODALITIES):
    return None  # a case folder holds at least one modality of the scheme
  if labels_lib.SEGMENTATION not in files:
    candidates = [p for p in unmatched if _SEG_FALLBACK_PATTERN.search(os.path.basename(p))]
    if len(candidates) == 1:
      files[labels_lib.SEGMENTATION] = candidates[0]
      seg_fallback = True
  return Case(case_id=os.path.basename(directory), directory=directory, files=files,
              duplicates=duplicates, seg_fallback=seg_fallback)


def discover_cases(data_dir, scheme):
  """Finds the case folders below `data_dir`.

  A folder is a case when it holds at least one NIfTI file named by the scheme's suffixes
  (case-insensitive, `.nii` or `.nii.gz`); nested download folders are walked, other files
  ignored. The case id is the folder name.

  Args:
    data_dir: root of a BraTS-layout folder.
    scheme: a labels.NamingScheme.

  Returns:
    Cases sorted by case id.

  Raises:
    DataDirError: the folder is missing, holds no case, or two folders share a case id.
  """
  if not os.path.isdir(data_dir):
    raise DataDirError(f'data dir {printable(data_dir)}: not a directory')
  cases = {}
  for directory, subdirs, filenames in os.walk(data_dir):
    subdirs.sort()
    case = _case_from_folder(directory, filenames, scheme)
    if case is None:
      continue
    if case.case_id in cases:
      raise DataDirError(
          f'case {printable(case.case_id)}: duplicate case id in {printable(directory)} and '
          f'{printable(cases[case.case_id].directory)}')
    cases[case.case_id] = case
  if not cases:
    hint = ''
    for other in labels_lib.SCHEMES.values():
      if other.name != scheme.name and _has_case(data_dir, other):
        hint = f'; the folder uses the {other.name} naming (pass --scheme={other.name})'
        break
    raise DataDirError(
        f'data dir {printable(data_dir)}: no case folders with {scheme.name} files '
        f'(<case>{scheme.separator}{scheme.suffixes["t1"]}.nii.gz, ...){hint}')
  return [cases[case_id] for case_id in sorted(cases)]


def _has_case(data_dir, scheme):
  return any(_case_from_folder(directory, filenames, scheme) is not None
             for directory, _, filenames in os.walk(data_dir))


def _check_case_id(case):
  if case.case_id in ('', '.', '..') or '/' in case.case_id or '\\' in case.case_id:
    raise CaseError(case.case_id, None, 'case id is not a plain folder name')
  try:
    case.case_id.encode('utf-8')
  except UnicodeEncodeError:
    # Case ids name output files and fill CSV, JSON and TFRecord fields, all UTF-8.
    raise CaseError(case.case_id, None, 'folder name is not valid UTF-8 (rename the case '
                    'folder)') from None


def _check_files_present(case, scheme, require_seg):
  keys = list(labels_lib.MODALITIES) + ([labels_lib.SEGMENTATION] if require_seg else [])
  for key in keys:
    if key not in case.files:
      raise CaseError(case.case_id, None,
                      f'missing {key} (no file ending in {scheme.separator}'
                      f'{scheme.suffixes[key]}.nii.gz or .nii)')
    if key in case.duplicates:
      names = ', '.join(printable(os.path.basename(p)) for p in case.duplicates[key])
      raise CaseError(case.case_id, None, f'several files match {key}: {names}')


def _load_header(case_id, path):
  """Loads a NIfTI image proxy and checks its header; no voxel data is read."""
  if not os.access(path, os.R_OK):
    raise CaseError(case_id, path, 'not readable (permission denied)')
  if os.path.getsize(path) == 0:
    raise CaseError(case_id, path, 'empty file')
  try:
    image = nib.load(path)
  except (nib.filebasedimages.ImageFileError, OSError, EOFError, zlib.error, ValueError,
          gzip.BadGzipFile) as err:
    raise CaseError(case_id, path, f'not a readable NIfTI file ({_one_line(err)})') from None
  if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
    raise CaseError(case_id, path, f'not a NIfTI image ({type(image).__name__})')
  shape = tuple(int(d) for d in image.header.get_data_shape())
  if len(shape) != 3:
    raise CaseError(case_id, path, f'expected a 3D volume, header says {len(shape)}D {shape}')
  if min(shape) < 1:
    raise CaseError(case_id, path, f'empty dimension in shape {shape}')
  if int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
    raise CaseError(case_id, path,
                    f'header claims {shape} = {np.prod(shape, dtype=np.int64)} voxels, more than '
                    f'the limit {MAX_VOXELS}')
  affine = image.affine
  if affine is None or not np.all(np.isfinite(affine)):
    raise CaseError(case_id, path, 'affine is missing or not finite')
  return image


def _one_line(err):
  text = str(err) or type(err).__name__
  return ' '.join(text.split())


def _gunzip_bounded(case_id, path, limit):
  """Decompresses a (multi-member) gzip file, refusing to produce more than `limit` bytes."""
  with open(path, 'rb') as stream:
    remaining = stream.read()
  pieces, produced = [], 0
  while remaining:
    inflater = isal_zlib.decompressobj(wbits=31)
    piece = inflater.decompress(remaining, limit + 1 - produced)
    pieces.append(piece)
    produced += len(piece)
    if produced > limit:
      raise CaseError(case_id, path, 'gzip data is larger than its NIfTI header says')
    if not inflater.eof:
      raise CaseError(case_id, path, 'truncated gzip file (unexpected end of data)')
    remaining = inflater.unused_data
  return b''.join(pieces)


def _read_voxels(case_id, path, image):
  """Reads the voxel array of a header-checked image.

  `.nii.gz` files are inflated in one bounded pass with ISA-L (about 3x faster than the
  gzip module nibabel uses, and the decode dominates loading a case).
  """
  header = image.header
  # The proxy's offset is where the data really starts (a stored vox_offset of 0 means 352).
  expected = int(image.dataobj.offset) + int(
      np.prod(header.get_data_shape(), dtype=np.int64)) * header.get_data_dtype().itemsize
  try:
    if path.lower().endswith('.gz'):
      image = type(image).from_bytes(_gunzip_bounded(case_id, path, expected))
    volume = np.asanyarray(image.dataobj)
  except CaseError:
    raise
  except (OSError, EOFError, zlib.error, isal_zlib.error, ValueError, gzip.BadGzipFile,
          MemoryError) as err:
    raise CaseError(case_id, path, f'voxel data unreadable ({_one_line(err)})') from None
  if volume.shape != image.header.get_data_shape():
    raise CaseError(case_id, path, 'voxel data shorter than its header says')
  return volume


def _check_intensities(case_id, path, volume):
  if volume.dtype.kind == 'f':
    finite = np.isfinite(volume)
    if not finite.all():
      raise CaseError(case_id, path, f'{int(finite.size - finite.sum())} non-finite voxels '
                      '(NaN or Inf)')
  elif volume.dtype.kind not in 'iub':
    raise CaseError(case_id, path, f'unsupported voxel type {volume.dtype}')
  low, high = volume.min(), volume.max()
  if low == high:
    # A blank modality is a failed export or conversion, not a scan: normalisation would turn it
    # into zeros and the network would silently segment without that contrast.
    raise CaseError(case_id, path, f'constant volume (every voxel is {low.item():g}): no image '
                    'content')
  return volume.astype(np.float32, copy=False)


def _check_segmentation(case_id, path, volume, scheme):
  if volume.dtype.kind == 'f':
    if not np.isfinite(volume).all():
      raise CaseError(case_id, path, 'segmentation has non-finite voxels (NaN or Inf)')
    if (volume != np.round(volume)).any():
      raise CaseError(case_id, path, 'segmentation has non-integer label values')
  try:
    return labels_lib.labels_to_classes(volume, scheme)
  except ValueError:
    allowed = set(scheme.file_labels)
    outside = [v.item() for v in np.unique(volume) if v.item() not in allowed]
    raise CaseError(case_id, path,
                    f'labels {outside} outside the {scheme.name} set '
                    f'{{{",".join(map(str, scheme.file_labels))}}}') from None


def load_case(case, scheme, require_seg=True, read_seg=True):
  """Validates and loads one case (SPEC 1 "Validation").

  Headers of all files are checked (3D, same shape, same affine, size limit) before any voxel
  data is read.

  Args:
    case: a Case from discover_cases.
    scheme: the labels.NamingScheme of the folder.
    require_seg: a missing segmentation is an error (training, evaluation).
    read_seg: load the segmentation when present.

  Returns:
    A LoadedCase.

  Raises:
    CaseError: naming the case, the file and the problem.
  """
  _check_case_id(case)
  _check_files_present(case, scheme, require_seg)
  keys = list(labels_lib.MODALITIES)
  if read_seg and labels_lib.SEGMENTATION in case.files:
    keys.append(labels_lib.SEGMENTATION)
  images = {key: _load_header(case.case_id, case.files[key]) for key in keys}
  reference_key = labels_lib.MODALITIES[0]
  reference = images[reference_key]
  for key in keys[1:]:
    image = images[key]
    if image.shape != reference.shape:
      raise CaseError(case.case_id, case.files[key],
                      f'shape {image.shape} differs from {reference_key} {reference.shape}')
    if not np.allclose(image.affine, reference.affine, atol=AFFINE_TOLERANCE, rtol=0):
      raise CaseError(case.case_id, case.files[key],
                      f'affine differs from {reference_key} by more than {AFFINE_TOLERANCE}')
  modalities = tuple(
      _check_intensities(case.case_id, case.files[key],
                         _read_voxels(case.case_id, case.files[key], images[key]))
      for key in labels_lib.MODALITIES)
  classes = None
  if labels_lib.SEGMENTATION in images:
    path = case.files[labels_lib.SEGMENTATION]
    classes = _check_segmentation(
        case.case_id, path, _read_voxels(case.case_id, path, images['seg']), scheme)
  return LoadedCase(
      case_id=case.case_id, modalities=modalities, classes=classes,
      affine=np.asarray(reference.affine, dtype=np.float64),
      zooms=tuple(float(z) for z in reference.header.get_zooms()[:3]),
      header=reference.header.copy())


def write_nifti(path, volume, affine, header=None, compresslevel=1):
  """Writes a NIfTI-1 file atomically (temp name in the same folder, then rename).

  `.nii.gz` is compressed with ISA-L (several times faster than the gzip module at a similar
  ratio); a failure leaves any previous file at `path` untouched and no temp file behind.
  """
  image = nib.Nifti1Image(volume, affine, header=header)
  image.set_data_dtype(volume.dtype)
  image.header.set_xyzt_units('mm', 'sec')
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=1)
  payload = image.to_bytes()
  if path.lower().endswith('.gz'):
    payload = igzip.compress(payload, compresslevel=compresslevel)
  directory, name = os.path.split(os.path.abspath(path))
  temp_path = os.path.join(directory, f'.{name}.tmp-{os.getpid()}')
  try:
    with open(temp_path, 'wb') as stream:
      stream.write(payload)
      stream.flush()
      os.fsync(stream.fileno())
    os.replace(temp_path, path)
  except BaseException as err:
    if os.path.exists(temp_path):
      os.remove(temp_path)
    if isinstance(err, OSError) and err.errno is not None:
      # Which file could not be written (a full disk reports only the errno).
      raise OSError(err.errno, f'cannot write {printable(path)}: {err.strerror}') from None
    raise
