"""Segmentation metrics with the BraTS 2020 legacy conventions for empty regions (SPEC 4)."""

import jax.numpy as jnp
import numpy as np

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
