"""Synthetic BraTS-format cohort: brain-like multimodal MRI with nested tumour sub-regions."""

import concurrent.futures
import csv
import dataclasses
import multiprocessing
import os
import shutil

from absl import app
from absl import flags
import numpy as np

from aspp_resunet import labels as labels_lib
from data_pipelines import brats
from data_pipelines import preprocess

BRATS_SHAPE = (240, 240, 155)
CASE_PREFIX = 'SynthBraTS'
COHORT_CSV = 'synthetic_cohort.csv'

# Tissue intensities relative to white matter, per modality (T1, T1ce, T2, FLAIR). Calibrated
# against 22 real BraTS 2018 cases with benchmarks/synthetic_vs_real.py: tumour medians relative
# to normal brain land inside the real ranges.
_GREY_MATTER = np.array([0.80, 0.84, 1.30, 1.18], np.float32)
_CSF = np.array([0.35, 0.40, 3.00, 0.35], np.float32)
_VESSEL = np.array([0.95, 1.90, 0.90, 1.00], np.float32)  # enhancing vessels: bright on T1ce
_WM_LESION = np.array([0.92, 0.95, 1.45, 1.65], np.float32)  # non-tumour FLAIR hyperintensity
_NECROSIS = np.array([0.70, 0.70, 2.60, 2.05], np.float32)
_EDEMA = np.array([0.92, 0.86, 1.85, 2.00], np.float32)
_ENHANCING = np.array([0.86, 1.45, 1.80, 2.05], np.float32)
_NON_ENHANCING_CORE = np.array([0.78, 0.80, 2.05, 1.90], np.float32)  # low-grade core (label 1)
# White-matter intensity of each modality in scanner units: drawn per case, like real scanners.
_WHITE_MATTER_RANGE = ((250.0, 900.0), (300.0, 1100.0), (200.0, 700.0), (200.0, 700.0))
_LOW_GRADE_FRACTION = 0.15  # cases with no enhancing tumour (as BraTS LGG cases)

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class CaseSummary:
  """What the generator drew for one case (written to the cohort CSV)."""

  case_id: str
  low_grade: bool
  whole_tumor_voxels: int
  tumor_core_voxels: int
  enhancing_tumor_voxels: int
  brain_voxels: int


def _soft_step(x):
  # A linear ramp with the logistic's slope at 0: partial-volume edges at a tenth of tanh's cost.
  x *= 0.25
  x += 0.5
  return np.clip(x, 0.0, 1.0, out=x)


class _Fields:
  """Smooth random fields on a box, from Gaussian noise on a coarse grid, linearly upsampled."""

  def __init__(self, rng, shape, voxel_scale):
    self._rng = rng
    self._shape = shape
    self._voxel_scale = voxel_scale  # voxels of this volume per voxel of a 240x240x155 one

  def __call__(self, cell_size):
    """A unit-variance field whose features are about `cell_size` (BraTS) voxels wide."""
    coarse = tuple(
        max(2, int(np.ceil(extent / (cell_size * scale))) + 1)
        for extent, scale in zip(self._shape, self._voxel_scale))
    field = preprocess.resize_linear(
        self._rng.standard_normal(coarse, dtype=np.float32), self._shape)
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return field


def generate_case(rng, shape=BRATS_SHAPE):
  """Draws one synthetic case.

  Args:
    rng: a numpy Generator (the only source of randomness).
    shape: volume shape; anatomy scales with it (BraTS is 240x240x155).

  Returns:
    (modalities, labels, low_grade): four int16 volumes in labels.MODALITIES order, the uint8
    segmentation in brats2020 labels {0,1,2,4}, and whether the case has no enhancing tumour.
  """
  shape = tuple(int(s) for s in shape)
  # Geometry in Python floats: numpy float64 scalars would promote the float32 volumes.
  scale = [s / b for s, b in zip(shape, BRATS_SHAPE)]
  centre = np.array([120 + rng.uniform(-4, 4), 124 + rng.uniform(-6, 6),
                     74 + rng.uniform(-4, 4)]) * scale
  semi_axes = np.array([66 * rng.uniform(0.93, 1.07), 84 * rng.uniform(0.93, 1.07),
                        60 * rng.uniform(0.93, 1.07)]) * scale
  # Everything is computed inside the head's bounding box and pasted into a zero volume.
  lower = np.maximum(np.floor(centre - 1.12 * semi_axes), 0).astype(int)
  upper = np.minimum(np.ceil(centre + 1.12 * semi_axes) + 1, shape).astype(int)
  box_shape = tuple(upper - lower)
  fields = _Fields(rng, box_shape, scale)
  grid = np.ogrid[tuple(slice(int(a), int(b)) for a, b in zip(lower, upper))]
  offsets = [g.astype(np.float32) - np.float32(c) for g, c in zip(grid, centre)]

  def ellipsoid_distance(offset_centre, axes):
    """Normalised distance to an ellipsoid centred at `offset_centre` (relative to centre)."""
    squared = sum(((o - np.float32(c)) / np.float32(a))**2
                  for o, c, a in zip(offsets, offset_centre, axes))
    return np.sqrt(squared)

  radius = ellipsoid_distance((0.0, 0.0, 0.0), semi_axes)
  radius *= 1.0 + 0.035 * fields(28)
  edge_width = 0.012
  brain = radius < 1.0
  brain_fraction = _soft_step((1.0 - radius) / edge_width)

  # Cortex: a folded grey-matter shell; sulcal and surface CSF; two ventricles; deep grey matter.
  grey = _soft_step((radius - (0.83 + 0.05 * fields(10))) / edge_width)
  sulci = _soft_step((fields(6) - 1.1) / 0.15) * (radius > 0.86)
  csf = np.maximum(_soft_step((radius - 0.975) / 0.008), sulci * grey)
  for side in (-1.0, 1.0):
    ventricle_centre = np.array([side * rng.uniform(7, 11), rng.uniform(-8, -2),
                                 rng.uniform(5, 12)]) * scale
    ventricle_axes = np.array([rng.uniform(4, 7), rng.uniform(18, 26), rng.uniform(7, 11)]) * scale
    distance = ellipsoid_distance(ventricle_centre, ventricle_axes)
    csf = np.maximum(csf, _soft_step((1.0 - distance) / 0.08))
    deep_centre = np.array([side * 15, 6, -2]) * scale
    deep_axes = np.array([9, 12, 9]) * scale
    distance = ellipsoid_distance(deep_centre, deep_axes)
    grey = np.maximum(grey, 0.8 * _soft_step((1.0 - distance) / 0.1))
  # The interhemispheric fissure, away from the deep structures.
  fissure = _soft_step((1.2 * scale[0] - np.abs(offsets[0])) / (0.4 * scale[0])) * (radius > 0.5)
  csf = np.maximum(csf, fissure)
  grey *= 1.0 - csf
  white = np.clip(1.0 - grey - csf, 0.0, 1.0)
  vessels = _soft_step((fields(5) - 2.4) / 0.12) * brain
  lesions = _soft_step((fields(8) - 2.2) / 0.15) * white

  # Tumour: an irregular core (necrosis inside an enhancing rim) inside a larger edema.
  while True:
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction)
    tumour_centre = direction * rng.uniform(0.15, 0.6) * semi_axes
    if abs(tumour_centre[0]) > 0.12 * semi_axes[0]:  # one hemisphere, as gliomas mostly are
      break
  core_radius = float(np.exp(rng.uniform(np.log(12), np.log(30))))
  edema_factor = rng.uniform(1.2, 1.8)
  low_grade = bool(rng.uniform() < _LOW_GRADE_FRACTION)
  distance = ellipsoid_distance(tumour_centre, scale)
  # Irregular outlines: additive, clipped noise keeps each region one compact blob.
  core_distance = distance / core_radius - 0.3 * np.clip(fields(9), -2.0, 2.0)
  edema_distance = distance / (core_radius * edema_factor) - 0.3 * np.clip(fields(14), -2.0, 2.0)
  tumour_width = 0.06
  whole = _soft_step((1.0 - np.minimum(core_distance, edema_distance)) / tumour_width) * brain
  whole *= 1.0 - 0.85 * csf  # edema does not fill the ventricles
  core = _soft_step((1.0 - core_distance) / tumour_width) * brain
  necrotic_extent = 0.0 if low_grade else rng.uniform(0.0, 0.8)
  necrosis = _soft_step(
      (necrotic_extent * (1.0 + 0.25 * fields(7)) - core_distance) / tumour_width) * core
  rim = np.clip(core - necrosis, 0.0, 1.0)
  # Patches of the rim that do not enhance (label 1, like non-enhancing tumour).
  non_enhancing = rim * _soft_step((fields(6) - 1.3) / 0.2)
  enhancing = np.zeros_like(rim) if low_grade else rim - non_enhancing
  necrosis = necrosis + (rim if low_grade else non_enhancing)
  edema = np.clip(whole - core, 0.0, 1.0)
  normal = np.clip(1.0 - whole, 0.0, 1.0)

  tumour_class = np.zeros(box_shape, np.uint8)
  tumour_class[(whole > 0.5) & brain] = labels_lib.EDEMA
  tumour_class[(core > 0.5) & brain] = labels_lib.NECROTIC_CORE
  tumour_class[(core > 0.5) & brain & (enhancing > necrosis)] = labels_lib.ENHANCING_TUMOR

  texture = fields(4)
  jitter = lambda: rng.uniform(0.88, 1.12, size=4).astype(np.float32)  # noqa: E731
  tissue = [(_GREY_MATTER * jitter(), grey), (_CSF * jitter(), csf), (_VESSEL, vessels),
            (_WM_LESION, lesions)]
  tumour = [((_NON_ENHANCING_CORE if low_grade else _NECROSIS) * jitter(), necrosis),
            (_EDEMA * jitter(), edema), (_ENHANCING * jitter(), enhancing)]
  noise_level = rng.uniform(0.03, 0.07)
  modalities = []
  for channel in range(4):
    intensity = white * (1.0 - vessels - lesions)
    for values, fraction in tissue[:2]:
      intensity += values[channel] * fraction * (1.0 - vessels - lesions)
    for values, fraction in tissue[2:]:
      intensity += values[channel] * fraction
    intensity *= normal
    for values, fraction in tumour:
      intensity += values[channel] * fraction * (1.0 + 0.08 * texture)
    bias = np.exp(0.12 * fields(70))
    intensity *= bias * brain_fraction
    intensity += noise_level * rng.standard_normal(box_shape, dtype=np.float32) * brain
    white_matter_value = rng.uniform(*_WHITE_MATTER_RANGE[channel])
    volume = np.zeros(shape, np.int16)
    volume[tuple(slice(a, b) for a, b in zip(lower, upper))] = np.where(
        brain, np.clip(np.rint(intensity * white_matter_value), 1, 32767), 0).astype(np.int16)
    modalities.append(volume)
  segmentation = np.zeros(shape, np.uint8)
  segmentation[tuple(slice(a, b) for a, b in zip(lower, upper))] = labels_lib.classes_to_labels(
      tumour_class, labels_lib.get_scheme('brats2020'))
  return modalities, segmentation, low_grade


def case_id_for(index):
  return f'{CASE_PREFIX}_{index + 1:04d}'


def _case_rng(seed, index):
  # One stream per (seed, case): a case does not depend on how many others are generated.
  return np.random.default_rng([seed, index])


def write_case(output_dir, seed, index, shape=BRATS_SHAPE):
  """Generates case `index` of cohort `seed` and writes its folder atomically.

  Returns:
    The CaseSummary of the case.
  """
  scheme = labels_lib.get_scheme('brats2020')
  case_id = case_id_for(index)
  modalities, segmentation, low_grade = generate_case(_case_rng(seed, index), shape)
  final_dir = os.path.join(output_dir, case_id)
  temp_dir = os.path.join(output_dir, f'.{case_id}.tmp-{os.getpid()}')
  shutil.rmtree(temp_dir, ignore_errors=True)
  os.makedirs(temp_dir)
  affine = brats_affine(shape)
  try:
    for key, volume in zip(labels_lib.MODALITIES + (labels_lib.SEGMENTATION,),
                           modalities + [segmentation]):
      name = f'{case_id}{scheme.separator}{scheme.suffixes[key]}.nii.gz'
      brats.write_nifti(os.path.join(temp_dir, name), volume, affine)
    shutil.rmtree(final_dir, ignore_errors=True)
    os.replace(temp_dir, final_dir)
  except BaseException:
    shutil.rmtree(temp_dir, ignore_errors=True)
    raise
  classes = labels_lib.labels_to_classes(segmentation, scheme)
  return CaseSummary(
      case_id=case_id, low_grade=low_grade,
      whole_tumor_voxels=int(labels_lib.region_mask(classes, 'wt').sum()),
      tumor_core_voxels=int(labels_lib.region_mask(classes, 'tc').sum()),
      enhancing_tumor_voxels=int(labels_lib.region_mask(classes, 'et').sum()),
      brain_voxels=int((modalities[0] > 0).sum()))


def brats_affine(shape=BRATS_SHAPE):
  """The affine of real BraTS volumes: 1 mm, diag(-1, -1, 1), origin (0, shape[1] - 1, 0)."""
  affine = np.diag([-1.0, -1.0, 1.0, 1.0])
  affine[1, 3] = shape[1] - 1
  return affine


def generate_cohort(output_dir, num_cases, seed, shape=BRATS_SHAPE, workers=None,
                    progress=None):
  """Writes `num_cases` case folders and a cohort CSV into `output_dir`.

  Args:
    output_dir: created if missing; existing case folders of the same ids are replaced.
    num_cases: how many cases.
    seed: cohort seed; (seed, case index) fixes every voxel.
    shape: volume shape.
    workers: processes (default: all cores).
    progress: optional callable(done, total).

  Returns:
    CaseSummary per case, in case order.
  """
  os.makedirs(output_dir, exist_ok=True)
  workers = workers or os.cpu_count() or 1
  summaries = [None] * num_cases
  if workers == 1 or num_cases == 1:
    for index in range(num_cases):
      summaries[index] = write_case(output_dir, seed, index, shape)
      if progress:
        progress(index + 1, num_cases)
  else:
    # Spawned workers: forking a process that has JAX or TensorFlow threads can deadlock.
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
      futures = {pool.submit(write_case, output_dir, seed, index, shape): index
                 for index in range(num_cases)}
      for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
        summaries[futures[future]] = future.result()
        if progress:
          progress(done, num_cases)
  csv_path = os.path.join(output_dir, COHORT_CSV)
  temp_path = csv_path + '.tmp'
  with open(temp_path, 'w', newline='') as stream:
    writer = csv.writer(stream)
    fields = [field.name for field in dataclasses.fields(CaseSummary)]
    writer.writerow(fields)
    for summary in summaries:
      writer.writerow([getattr(summary, field) for field in fields])
  os.replace(temp_path, csv_path)
  return summaries


def ensure_cohort(output_dir, num_cases, seed, shape=BRATS_SHAPE, progress=None):
  """Generates the cohort unless `output_dir` already holds exactly its cases.

  Returns:
    True if cases were generated, False if the existing cohort was kept.
  """
  expected = [case_id_for(i) for i in range(num_cases)]
  if os.path.isdir(output_dir):
    try:
      found = [c.case_id for c in brats.discover_cases(output_dir,
                                                       labels_lib.get_scheme('brats2020'))]
    except brats.DataDirError:
      found = []
    if found == expected:
      return False
    if found:
      raise brats.DataDirError(
          f'{output_dir} holds {len(found)} cases, not the {num_cases} synthetic cases asked for; '
          f'remove it or choose another folder')
  generate_cohort(output_dir, num_cases, seed, shape, progress=progress)
  return True


def define_flags():
  """Command-line flags (defined only when run as a program, so importing stays flag-free)."""
  flags.DEFINE_string('output_dir', None, 'Folder to write the case folders into.')
  flags.DEFINE_integer('num_cases', 40, 'Number of cases.')
  flags.DEFINE_integer('seed', 0, 'Cohort seed.')
  flags.DEFINE_list('shape', ['240', '240', '155'], 'Volume shape (BraTS: 240,240,155).')
  flags.DEFINE_integer('workers', 0, 'Worker processes (0: all cores).')


def main(argv):
  del argv
  if not FLAGS.output_dir:
    raise app.UsageError('--output_dir is required')
  try:
    shape = tuple(int(s) for s in FLAGS.shape)
  except ValueError:
    raise app.UsageError(f'--shape must be three integers, got {",".join(FLAGS.shape)}') from None
  if len(shape) != 3 or min(shape) < 16:
    raise app.UsageError(f'--shape must be three integers >= 16, got {",".join(FLAGS.shape)}')
  if FLAGS.num_cases < 1:
    raise app.UsageError('--num_cases must be at least 1')

  def progress(done, total):
    print(f'\rsynthetic cohort: {done}/{total} cases', end='\n' if done == total else '',
          flush=True)

  summaries = generate_cohort(FLAGS.output_dir, FLAGS.num_cases, FLAGS.seed, shape,
                              FLAGS.workers or None, progress)
  low_grade = sum(s.low_grade for s in summaries)
  print(f'wrote {len(summaries)} cases ({low_grade} without enhancing tumour) to '
        f'{FLAGS.output_dir}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
