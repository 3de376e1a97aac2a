"""Tests for losses and the Dice conventions used in validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aspp_resunet import losses
from aspp_resunet import metrics


def _random(shape=(2, 4, 4, 4), classes=4, seed=0):
  rng = np.random.default_rng(seed)
  logits = jnp.asarray(rng.standard_normal(shape + (classes,)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, classes, shape), jnp.int32)
  return logits, labels


def test_cross_entropy_matches_definition():
  logits, labels = _random()
  probs = np.asarray(jax.nn.softmax(logits))
  onehot = np.eye(4)[np.asarray(labels)]
  expected = -(onehot * np.log(probs)).sum(-1).mean()
  assert float(losses.cross_entropy(logits, labels, jnp.ones(2))) == pytest.approx(expected, 1e-5)


def test_masked_examples_do_not_count():
  logits, labels = _random()
  masked = losses.cross_entropy(logits, labels, jnp.array([1.0, 0.0]))
  first = losses.cross_entropy(logits[:1], labels[:1], jnp.ones(1))
  assert float(masked) == pytest.approx(float(first), 1e-6)
  dice_masked = losses.soft_dice(logits, labels, jnp.array([1.0, 0.0]))
  assert float(dice_masked) == pytest.approx(float(losses.soft_dice(logits[:1], labels[:1],
                                                                    jnp.ones(1))), 1e-6)


def test_soft_dice_is_zero_for_a_perfect_confident_prediction():
  _, labels = _random()
  logits = 100.0 * jax.nn.one_hot(labels, 4)
  assert float(losses.soft_dice(logits, labels, jnp.ones(2))) == pytest.approx(0.0, abs=1e-5)
  assert float(losses.compute_loss('ce_dice', logits, labels, jnp.ones(2))) < 1e-4


def _autodiff_loss(name, logits, labels, mask):
  """The losses written plainly with jax.nn, differentiated by JAX (the reference)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_voxel = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  per_example = jnp.mean(per_voxel, axis=tuple(range(1, per_voxel.ndim)))
  ce = jnp.sum(per_example * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  probs = jnp.exp(log_probs)
  one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  weight = mask.reshape((-1,) + (1,) * (probs.ndim - 1))
  intersection = jnp.sum(probs * one_hot * weight, axis=(0, 1, 2, 3))
  total = jnp.sum((probs + one_hot) * weight, axis=(0, 1, 2, 3))
  dice = 1.0 - jnp.mean((2.0 * intersection + 1.0) / (total + 1.0))
  return {'ce': ce, 'dice': dice, 'ce_dice': ce + dice}[name]


@pytest.mark.parametrize('name', losses.LOSSES)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('mask', [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)])
def test_loss_value_and_written_out_gradient_match_autodiff(name, dtype, mask):
  logits, labels = _random(shape=(2, 3, 4, 5), seed=1)
  logits, mask = (3.0 * logits).astype(dtype), jnp.asarray(mask, jnp.float32)
  value, gradient = jax.value_and_grad(losses.compute_loss, argnums=1)(name, logits, labels,
                                                                       mask)
  expected, expected_gradient = jax.value_and_grad(_autodiff_loss, argnums=1)(
      name, logits, labels, mask)
  assert gradient.dtype == dtype
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # bfloat16: both gradients are float32 ones rounded once to 8 significant bits.
  tolerance = 1e-5 if dtype == jnp.float32 else 2**-7
  np.testing.assert_allclose(gradient.astype(jnp.float32), expected_gradient.astype(jnp.float32),
                             rtol=tolerance, atol=1e-7)
  # The mask is data: no gradient flows to it.
  mask_gradient = jax.grad(losses.compute_loss, argnums=3)(name, logits, labels, mask)
  np.testing.assert_array_equal(mask_gradient, np.zeros(2))


def test_unknown_loss():
  logits, labels = _random()
  with pytest.raises(ValueError, match='train.loss must be one of'):
    losses.compute_loss('focal', logits, labels, jnp.ones(2))


def test_dice_empty_conventions():
  dice = metrics.dice_from_counts([0, 0, 0, 3], [0, 5, 0, 4], [0, 0, 5, 4])
  np.testing.assert_allclose(dice, [1.0, 0.0, 0.0, 0.75])


def test_region_counts_numpy_and_jax_agree():
  rng = np.random.default_rng(0)
  predicted = rng.integers(0, 4, (2, 5, 5, 5))
  truth = rng.integers(0, 4, (2, 5, 5, 5))
  counts = metrics.region_counts(predicted, truth)
  np.testing.assert_array_equal(counts, metrics.region_counts(jnp.asarray(predicted),
                                                              jnp.asarray(truth)))
  whole_p, whole_t = predicted[0] > 0, truth[0] > 0
  assert counts[0, 0].tolist() == [(whole_p & whole_t).sum(), whole_p.sum(), whole_t.sum()]
  et_p, et_t = predicted[1] == 3, truth[1] == 3
  assert counts[1, 2].tolist() == [(et_p & et_t).sum(), et_p.sum(), et_t.sum()]
