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
