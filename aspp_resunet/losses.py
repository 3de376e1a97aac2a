"""Segmentation losses on logits and integer class maps: cross-entropy, soft Dice, both."""

import functools

import jax
import jax.numpy as jnp

LOSSES = ('ce', 'dice', 'ce_dice')
_DICE_SMOOTH = 1.0


def cross_entropy(logits, labels, mask):
  """Mean categorical cross-entropy over the voxels of the examples with mask 1 (paper eq. 6)."""
  return _weighted_loss(logits, labels, jax.lax.stop_gradient(mask), 1.0, 0.0)


def soft_dice(logits, labels, mask):
  """1 - mean over classes of the soft Dice, sums over the masked batch and all voxels."""
  return _weighted_loss(logits, labels, jax.lax.stop_gradient(mask), 0.0, 1.0)


def compute_loss(name, logits, labels, mask):
  """The loss called `name` ('ce', 'dice' or 'ce_dice'); no gradient flows to `mask`."""
  weights = {'ce': (1.0, 0.0), 'dice': (0.0, 1.0), 'ce_dice': (1.0, 1.0)}
  if name not in weights:
    raise ValueError(f'train.loss must be one of {LOSSES}, got {name!r}')
  return _weighted_loss(logits, labels, jax.lax.stop_gradient(mask), *weights[name])


def _class_maps(logits, labels):
  """Per class (lists over the last axis of logits), in float32: the logits, the softmax
  probabilities and the one-hot labels (bool); and the log-sum-exp per voxel."""
  logits = [logits[..., c].astype(jnp.float32) for c in range(logits.shape[-1])]
  top = functools.reduce(jnp.maximum, logits)
  exps = [jnp.exp(z - top) for z in logits]
  total = sum(exps)
  probs = [e / total for e in exps]
  one_hot = [labels == c for c in range(len(logits))]
  return logits, probs, one_hot, top + jnp.log(total)


def _example_weights(mask, ndim):
  """The mask as a (batch, 1, 1, 1) weight, and the number of examples it counts (>= 1)."""
  return mask.reshape((-1,) + (1,) * (ndim - 1)), jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _weighted_loss(logits, labels, mask, ce_weight, dice_weight):
  """ce_weight x cross-entropy + dice_weight x soft-Dice loss, differentiated in one pass.

  The gradient with respect to the logits is written out (softmax p, one-hot y, example weight
  w): cross-entropy w (p - y) / (voxels x examples); soft Dice, with D_c = total_c + smooth
  and N_c = 2 intersection_c + smooth, dL/dp_c = -(w / classes) (2 y_c / D_c - N_c / D_c^2),
  through the softmax: p_c (dL/dp_c - sum_k p_k dL/dp_k). Classes are taken one map at a
  time and the gradient is one elementwise pass over them, where autodiff ran the softmax
  gradient as a YNNPACK reduction over the minor axis of 4 classes and the picked
  log-probability as a scatter (XLA:CPU). Value and gradient on the demo's logits (48^3 x 4,
  bfloat16): 'ce_dice' 8.7 -> 2.2 ms, 'ce' 2.3 -> 2.0 ms; demo step 0.171 -> 0.161 s
  (bfloat16), 0.205 -> 0.197 s (float32) (A/B). No gradient for the mask (callers stop it) or
  the labels.
  """
  return _weighted_loss_forward(logits, labels, mask, ce_weight, dice_weight)[0]


def _weighted_loss_forward(logits, labels, mask, ce_weight, dice_weight):
  logits_by_class, probs, one_hot, log_sum_exp = _class_maps(logits, labels)
  weight, examples = _example_weights(mask, labels.ndim)
  loss = 0.0
  if ce_weight:
    picked = sum(jnp.where(y, z, 0.0) for y, z in zip(one_hot, logits_by_class))
    per_example = jnp.mean(log_sum_exp - picked, axis=tuple(range(1, labels.ndim)))
    loss += ce_weight * jnp.sum(per_example * mask) / examples
  intersection = total = None
  if dice_weight:
    intersection = jnp.stack([jnp.sum(jnp.where(y, p, 0.0) * weight)
                              for y, p in zip(one_hot, probs)])
    total = jnp.stack([jnp.sum((p + y) * weight) for y, p in zip(one_hot, probs)])
    dice = (2.0 * intersection + _DICE_SMOOTH) / (total + _DICE_SMOOTH)
    loss += dice_weight * (1.0 - jnp.mean(dice))
  return loss, (logits, labels, mask, intersection, total)


def _weighted_loss_backward(ce_weight, dice_weight, residuals, cotangent):
  logits, labels, mask, intersection, total = residuals
  _, probs, one_hot, _ = _class_maps(logits, labels)
  weight, examples = _example_weights(mask, labels.ndim)
  classes = len(probs)
  gradients = [jnp.zeros_like(p) for p in probs]
  if ce_weight:
    scale = cotangent * ce_weight * weight / (labels[0].size * examples)
    gradients = [g + scale * (p - y) for g, p, y in zip(gradients, probs, one_hot)]
  if dice_weight:
    denominator = total + _DICE_SMOOTH
    label_term = -(cotangent * dice_weight / classes) * 2.0 / denominator
    prob_term = (cotangent * dice_weight / classes) * (
        2.0 * intersection + _DICE_SMOOTH) / denominator**2
    by_prob = [weight * (jnp.where(one_hot[c], label_term[c], 0.0) + prob_term[c])
               for c in range(classes)]
    mean = sum(p * d for p, d in zip(probs, by_prob))
    gradients = [g + p * (d - mean) for g, p, d in zip(gradients, probs, by_prob)]
  return (jnp.stack(gradients, axis=-1).astype(logits.dtype), None,
          jnp.zeros_like(mask))


_weighted_loss.defvjp(_weighted_loss_forward, _weighted_loss_backward)
