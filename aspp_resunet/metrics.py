"""Segmentation metrics with the BraTS 2020 legacy conventions for empty regions (SPEC 4)."""

import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from aspp_resunet import labels


def region_counts(predicted_classes, true_classes):
  """Per example and region: (|pred & true|, |pred|, |true|) as float32 (batch, regions, 3).

  Works on jax or numpy arrays (batch, X, Y, Z) of model classes.
  """
  xp = jnp if isinstance(predicted_classes, jnp.ndarray) else np
  axes = tuple(range(1, predicted_classes.ndim))
  rows = []
  for region in labels.REGION_NAMES:
    predicted = labels.region_mask(predicted_classes, region)
    truth = labels.region_mask(true_classes, region)
    rows.append(xp.stack([xp.sum(predicted & truth, axis=axes), xp.sum(predicted, axis=axes),
                          xp.sum(truth, axis=axes)], axis=-1).astype(xp.float32))
  return xp.stack(rows, axis=1)


def dice_from_counts(intersection, predicted, truth):
  """Dice = 2|X and Y| / (|X| + |Y|); both empty -> 1; exactly one empty -> 0."""
  intersection, predicted, truth = (np.asarray(a, np.float64) for a in
                                    (intersection, predicted, truth))
  total = predicted + truth
  with np.errstate(invalid='ignore', divide='ignore'):
    dice = np.where(total > 0, 2.0 * intersection / total, 1.0)
  return dice


HD95_MODES = ('pooled', 'max_directed')
# HD95 when exactly one of prediction and ground truth is empty: the diagonal of a
# 240 x 240 x 155 mm BraTS volume (BraTS 2020 legacy convention).
HD95_ONE_EMPTY = 373.12866
_SIX_CONNECTED = scipy.ndimage.generate_binary_structure(3, 1)


def _surface(mask):
  """Voxels of `mask` with a 6-connected neighbour outside it (volume borders count as outside)."""
  return mask & ~scipy.ndimage.binary_erosion(mask, structure=_SIX_CONNECTED, border_value=0)


def _surface_distances(source_surface, target_surface, spacing):
  """Distance (mm) from each source surface voxel to the nearest target surface voxel."""
  distance = scipy.ndimage.distance_transform_edt(~target_surface, sampling=spacing)
  return distance[source_surface]


def hd95(predicted, truth, spacing, mode='pooled'):
  """95th percentile Hausdorff distance in mm between two boolean masks (SPEC 4).

  `pooled` (medpy's hd95): the 95th percentile of the surface distances of both directions
  together; `max_directed`: the larger of the two directed 95th percentiles. Both empty -> 0;
  exactly one empty -> HD95_ONE_EMPTY.
  """
  if mode not in HD95_MODES:
    raise ValueError(f'hd95 mode must be one of {HD95_MODES}, got {mode!r}')
  predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
  has_predicted, has_truth = predicted.any(), truth.any()
  if not has_predicted and not has_truth:
    return 0.0
  if has_predicted != has_truth:
    return HD95_ONE_EMPTY
  # Both surfaces lie in the masks' joint bounding box, so distances computed inside it (with a
  # one-voxel zero margin, as the volume border) equal those over the whole volume.
  union = predicted | truth
  box = []
  for axis in range(3):
    present = np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != axis)))
    box.append(slice(int(present[0]), int(present[-1]) + 1))
  predicted = np.pad(predicted[tuple(box)], 1)
  truth = np.pad(truth[tuple(box)], 1)
  predicted_surface, truth_surface = _surface(predicted), _surface(truth)
  forward = _surface_distances(predicted_surface, truth_surface, spacing)
  backward = _surface_distances(truth_surface, predicted_surface, spacing)
  if mode == 'pooled':
    return float(np.percentile(np.concatenate([forward, backward]), 95))
  return float(max(np.percentile(forward, 95), np.percentile(backward, 95)))


def case_metrics(predicted_classes, true_classes, spacing, hd95_mode='pooled'):
  """Dice, HD95, sensitivity and specificity per region for one case.

  Returns:
    {'dice_wt': ..., 'hd95_wt': ..., 'sensitivity_wt': ..., 'specificity_wt': ..., ...}.
  """
  result = {}
  for region in labels.REGION_NAMES:
    predicted = labels.region_mask(predicted_classes, region)
    truth = labels.region_mask(true_classes, region)
    true_positive = int(np.count_nonzero(predicted & truth))
    predicted_count, truth_count = int(np.count_nonzero(predicted)), int(np.count_nonzero(truth))
    false_positive = predicted_count - true_positive
    false_negative = truth_count - true_positive
    true_negative = predicted.size - true_positive - false_positive - false_negative
    result[f'dice_{region}'] = float(dice_from_counts(true_positive, predicted_count,
                                                      truth_count))
    result[f'hd95_{region}'] = hd95(predicted, truth, spacing, hd95_mode)
    # Nothing to detect counts as full sensitivity (the BraTS "both empty -> 1" rule).
    result[f'sensitivity_{region}'] = (
        true_positive / truth_count if truth_count else 1.0)
    result[f'specificity_{region}'] = (
        true_negative / (true_negative + false_positive) if true_negative + false_positive
        else 1.0)
  return result


METRIC_NAMES = ('dice', 'hd95', 'sensitivity', 'specificity')
METRIC_COLUMNS = tuple(f'{metric}_{region}' for metric in METRIC_NAMES
                       for region in labels.REGION_NAMES)


def voxel_spacing(affine):
  """Voxel spacing (mm) along each array axis from a 4x4 affine."""
  return tuple(float(s) for s in np.sqrt((np.asarray(affine)[:3, :3]**2).sum(axis=0)))
