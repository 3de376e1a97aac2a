"""Segmentation losses on logits and integer class maps: cross-entropy, soft Dice, both."""

import jax
import jax.numpy as jnp

LOSSES = ('ce', 'dice', 'ce_dice')
_DICE_SMOOTH = 1.0


def cross_entropy(logits, labels, mask):
  """Mean categorical cross-entropy over the voxels of the examples with mask 1 (paper eq. 6)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_voxel = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  per_example = jnp.mean(per_voxel, axis=tuple(range(1, per_voxel.ndim)))
  return jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def soft_dice(logits, labels, mask):
  """1 - mean over classes of the soft Dice, sums over the masked batch and all voxels."""
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  weight = mask.reshape((-1,) + (1,) * (probs.ndim - 1))
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(probs * one_hot * weight, axis=axes)
  total = jnp.sum((probs + one_hot) * weight, axis=axes)
  dice = (2.0 * intersection + _DICE_SMOOTH) / (total + _DICE_SMOOTH)
  return 1.0 - jnp.mean(dice)


def compute_loss(name, logits, labels, mask):
  """The loss called `name` ('ce', 'dice' or 'ce_dice')."""
  if name == 'ce':
    return cross_entropy(logits, labels, mask)
  if name == 'dice':
    return soft_dice(logits, labels, mask)
  if name == 'ce_dice':
    return cross_entropy(logits, labels, mask) + soft_dice(logits, labels, mask)
  raise ValueError(f'train.loss must be one of {LOSSES}, got {name!r}')
