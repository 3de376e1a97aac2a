"""Preprocessing (SPEC 1): intensity normalisation, resize to model size, and its inverse."""

import dataclasses

import numpy as np

from aspp_resunet import labels as labels_lib
from data_pipelines import brats

NORMALIZATIONS = ('minmax', 'zscore')


@dataclasses.dataclass(frozen=True)
class PreprocessOptions:
  """What preprocessing does; each field mirrors a config field of `config.data`."""

  image_size: tuple = (128, 128, 128)  # model input size
  normalization: str = 'minmax'  # 'minmax' (paper) | 'zscore' (inside the brain, as nnU-Net)
  crop_to_brain: bool = False  # crop to the bounding box of non-zero voxels before resizing

  def __post_init__(self):
    if self.normalization not in NORMALIZATIONS:
      raise ValueError(f'normalization must be one of {NORMALIZATIONS}, got '
                       f'{self.normalization!r}')
    size = tuple(int(s) for s in np.broadcast_to(self.image_size, (3,)))
    if min(size) < 1:
      raise ValueError(f'image_size must be positive, got {self.image_size}')
    object.__setattr__(self, 'image_size', size)


@dataclasses.dataclass
class PreparedCase:
  """One case at model resolution, with what is needed to map predictions back."""

  case_id: str
  image: np.ndarray  # (S, S, S, 4) float32, channels in labels.MODALITIES order
  classes: np.ndarray | None  # (S, S, S) uint8 model classes
  original_shape: tuple
  affine: np.ndarray  # 4x4
  crop_start: tuple  # crop box in original voxels (the whole volume when not cropping)
  crop_stop: tuple


def _source_coordinates(in_len, out_len):
  # Half-voxel-centred mapping: the resized grid spans the same physical extent as the input
  # (as jax.image.resize and skimage without anti-aliasing), so resize and inverse are symmetric.
  return (np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5


def _nearest_indices(in_len, out_len):
  return np.clip(np.floor(_source_coordinates(in_len, out_len) + 0.5), 0, in_len - 1).astype(
      np.int64)


def resize_linear(volume, out_shape):
  """Separable (tri)linear resize of a 3D float volume to `out_shape` (float32)."""
  result = np.asarray(volume, dtype=np.float32)
  if result.flags.f_contiguous and not result.flags.c_contiguous:
    # NIfTI voxels arrive in Fortran order; work on the C-ordered transpose (5x faster gathers).
    return np.ascontiguousarray(resize_linear(result.T, tuple(out_shape)[::-1]).T)
  # Shrinking axes first keeps the intermediate arrays small.
  order = sorted(range(3), key=lambda axis: out_shape[axis] / result.shape[axis])
  for axis in order:
    in_len, out_len = result.shape[axis], out_shape[axis]
    if in_len == out_len:
      continue
    source = np.clip(_source_coordinates(in_len, out_len), 0, in_len - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = out_len
    weight = (source - low).astype(np.float32).reshape(weight_shape)
    lower = np.take(result, low, axis=axis)
    upper = np.take(result, high, axis=axis)
    upper -= lower  # in place: lower + (upper - lower) * weight without temporaries
    upper *= weight
    upper += lower
    result = upper
  return result


def resize_nearest(volume, out_shape):
  """Nearest-neighbour resize of a 3D volume (labels) to `out_shape`, dtype kept."""
  index = [_nearest_indices(volume.shape[axis], out_shape[axis]) for axis in range(3)]
  return np.ascontiguousarray(volume[np.ix_(*index)])


def brain_box(modalities):
  """(start, stop) of the bounding box of voxels non-zero in any modality (whole volume if none)."""
  nonzero = np.zeros(modalities[0].shape, dtype=bool)
  for volume in modalities:
    nonzero |= volume != 0
  shape = nonzero.shape
  if not nonzero.any():
    return (0, 0, 0), shape
  start, stop = [], []
  for axis in range(3):
    other = tuple(a for a in range(3) if a != axis)
    present = np.flatnonzero(nonzero.any(axis=other))
    start.append(int(present[0]))
    stop.append(int(present[-1]) + 1)
  return tuple(start), tuple(stop)


def _intensity_transform(volume, mask, normalization):
  """(scale, offset) such that normalised = volume * scale + offset; computed on the original."""
  if normalization == 'minmax':
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
      return 0.0, 0.0  # constant volume -> all zeros, never NaN
    return 1.0 / (high - low), -low / (high - low)
  values = volume[mask] if mask is not None and mask.any() else volume
  mean, std = float(values.mean()), float(values.std())
  if std <= 0:
    return 0.0, 0.0
  return 1.0 / std, -mean / std


def preprocess_case(loaded, options):
  """Turns a brats.LoadedCase into a PreparedCase at `options.image_size`.

  Normalisation statistics come from each whole original volume (min-max: its own min and max,
  no clipping); since resizing is linear, scaling after resizing gives the same values as
  scaling first, at a fraction of the cost.
  """
  original_shape = tuple(loaded.shape)
  if options.crop_to_brain:
    start, stop = brain_box(loaded.modalities)
  else:
    start, stop = (0, 0, 0), original_shape
  crop = tuple(slice(a, b) for a, b in zip(start, stop))
  brain = None
  if options.normalization == 'zscore':
    brain = np.zeros(original_shape, dtype=bool)
    for volume in loaded.modalities:
      brain |= volume != 0
  channels = []
  for volume in loaded.modalities:
    scale, offset = _intensity_transform(volume, brain, options.normalization)
    resized = resize_linear(volume[crop], options.image_size)
    channels.append(resized * np.float32(scale) + np.float32(offset))
  image = np.stack(channels, axis=-1)
  if brain is not None:
    image *= resize_nearest(brain[crop], options.image_size)[..., None]
  classes = None
  if loaded.classes is not None:
    classes = resize_nearest(loaded.classes[crop], options.image_size)
  return PreparedCase(case_id=loaded.case_id, image=image.astype(np.float32, copy=False),
                      classes=classes, original_shape=original_shape,
                      affine=loaded.affine, crop_start=tuple(start), crop_stop=tuple(stop))


def classes_to_original(classes, original_shape, crop_start, crop_stop):
  """Maps a class map at model resolution back to the original geometry (nearest; zeros outside
  the crop box)."""
  box_shape = tuple(b - a for a, b in zip(crop_start, crop_stop))
  restored = np.zeros(tuple(original_shape), dtype=np.uint8)
  if min(box_shape) > 0:
    crop = tuple(slice(a, b) for a, b in zip(crop_start, crop_stop))
    restored[crop] = resize_nearest(np.asarray(classes, dtype=np.uint8), box_shape)
  return restored


def prediction_to_labels(classes, original_shape, crop_start, crop_stop, scheme):
  """A predicted class map at model resolution -> the scheme's file labels in original geometry."""
  return labels_lib.classes_to_labels(
      classes_to_original(classes, original_shape, crop_start, crop_stop), scheme)


def load_and_preprocess(case, scheme, options, require_seg=True):
  """Validates, loads and preprocesses one brats.Case (picklable for worker processes)."""
  return preprocess_case(brats.load_case(case, scheme, require_seg=require_seg), options)
