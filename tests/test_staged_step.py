"""The staged training step (one program per segment) equals the fused one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aspp_resunet import models
from aspp_resunet import staged_step
from aspp_resunet import train_lib
from tests import helpers


def _both_steps(config, batch_size=1, steps=2):
  """Runs `steps` fused and staged steps from the same state; returns (fused, staged) pairs."""
  model = models.create_model(config.model)
  mesh = train_lib.make_mesh()
  sharder = train_lib._Sharder(mesh)  # pylint: disable=protected-access
  results = []
  for mode in ('fused', 'staged'):
    config.train.step_mode = mode
    state = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'), 10)
    state = jax.device_put(state, sharder.replicated)
    step_fn = train_lib.make_train_fn(config, model, sharder.replicated)
    outs = []
    for step in range(steps):
      batch = jax.device_put(helpers.random_batch(config, batch_size, seed=step), sharder.data)
      state, out = step_fn(state, batch)
      outs.append(jax.device_get(out))
    results.append((jax.device_get(state), outs))
  return results


def _assert_close_trees(a, b, rtol, atol):
  leaves_a, tree_a = jax.tree_util.tree_flatten(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize('overrides', [
    {},
    {'use_aspp': False, 'loss': 'ce_dice'},
    {'upsampling': 'transpose', 'norm': 'group', 'loss': 'dice'},
    {'depth': 3, 'image_size': (32, 32, 32), 'remat': True},
], ids=['aspp', 'baseline_ce_dice', 'transpose_group_dice', 'depth3_remat'])
def test_staged_step_equals_fused_step(overrides):
  (fused_state, fused_out), (staged_state, staged_out) = _both_steps(
      helpers.step_config(**overrides))
  for fused, staged in zip(fused_out, staged_out):
    np.testing.assert_allclose(staged['loss'], fused['loss'], rtol=1e-5)
    np.testing.assert_array_equal(staged['counts'], fused['counts'])
  assert int(staged_state.step) == int(fused_state.step) == 2
  # Two Adam steps of lr 1e-3 move parameters by up to 2e-3; Adam's g / sqrt(v) magnifies float
  # rounding where a gradient is near 0, so allow 5% of that move (2.9% seen in one kernel
  # element with the BatchNorm sums taken over blocks of slices; a wrong gradient moves a
  # parameter by the whole 2e-3 the other way; the gradients themselves are compared tightly
  # below).
  _assert_close_trees(staged_state.params, fused_state.params, rtol=1e-4, atol=1e-4)
  _assert_close_trees(staged_state.batch_stats, fused_state.batch_stats, rtol=1e-4, atol=1e-6)
  _assert_close_trees(staged_state.opt_state, fused_state.opt_state, rtol=1e-3, atol=1e-7)


def _gradients(dtype, mode):
  config = helpers.step_config(dtype=dtype, loss='ce_dice')
  model = models.create_model(config.model)
  state = train_lib.create_train_state(config, model, jax.random.key(1, impl='rbg'))
  batch = helpers.random_batch(config, 1)
  if mode == 'staged':
    captured = {}
    step = staged_step.StagedTrainStep(model, 'ce_dice', train_lib._Sharder(  # pylint: disable=protected-access
        train_lib.make_mesh()).replicated)
    step._update = lambda state, grads, _: captured.setdefault('grads', grads) and state  # pylint: disable=protected-access
    step(state, batch)
    return captured['grads']

  def loss_fn(params):
    logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats},
                            batch['image'], train=True, mutable=['batch_stats'])
    return train_lib.losses.compute_loss('ce_dice', logits, batch['label'], batch['mask'])

  return jax.jit(jax.grad(loss_fn))(state.params)


def _median_relative_error(grads, reference):
  errors = jax.tree_util.tree_map(
      lambda g, r: float(jnp.linalg.norm(g - r) / jnp.linalg.norm(r)), grads, reference)
  return float(np.median(jax.tree_util.tree_leaves(errors)))


def test_staged_step_gradients_equal_fused_gradients():
  """The gradient itself (not only after Adam's normalisation) matches in float32; in bfloat16
  both paths are as far from the float32 gradient (bf16 rounding differs with the program)."""
  fused = _gradients('float32', 'fused')
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(fused))
  _assert_close_trees(_gradients('float32', 'staged'), fused, rtol=1e-4, atol=1e-5 * scale)
  fused_bf16_error = _median_relative_error(_gradients('bfloat16', 'fused'), fused)
  staged_bf16_error = _median_relative_error(_gradients('bfloat16', 'staged'), fused)
  assert staged_bf16_error < 1.25 * fused_bf16_error, (staged_bf16_error, fused_bf16_error)


@pytest.mark.parametrize('overrides', [{}, {'use_aspp': False, 'upsampling': 'transpose'},
                                       {'norm': 'group', 'depth': 3}])
def test_segments_cover_every_parameter_once(overrides):
  config = helpers.step_config(**overrides)
  model = models.create_model(config.model)
  variables = models.abstract_variables(model, config.data.image_size)
  for collection in ('params', 'batch_stats'):
    tree = variables.get(collection, {})
    covered = {}
    for segment in model.segments():
      part = staged_step.select_paths(tree, segment.paths)
      # Disjoint: no leaf is claimed by two segments (gradients would be overwritten).
      assert not set(_leaf_paths(part)) & set(_leaf_paths(covered)), segment
      staged_step.merge_paths(covered, part)
    assert sorted(_leaf_paths(covered)) == sorted(_leaf_paths(tree))


def _leaf_paths(tree):
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_unknown_step_mode_is_refused(tmp_path):
  config = helpers.step_config()
  config.train.step_mode = 'pipelined'
  with pytest.raises(train_lib.TrainingError, match="train.step_mode must be one of"):
    train_lib.check_config(config)


def test_auto_step_mode_stages_only_when_the_fused_step_does_not_fit(monkeypatch):
  config = helpers.step_config()
  config.train.step_mode = 'auto'
  model = models.create_model(config.model)
  sharder = train_lib._Sharder(train_lib.make_mesh())  # pylint: disable=protected-access
  state = jax.device_put(
      train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg')),
      sharder.replicated)
  batch = sharder.abstract_batch(jax.device_count(), config.data.image_size)
  assert staged_step.available_memory_bytes() > 2**20
  monkeypatch.setattr(staged_step, 'available_memory_bytes', lambda: 2**40)
  fused = train_lib.make_train_fn(config, model, sharder.replicated, state, batch)
  assert not isinstance(fused, staged_step.StagedTrainStep)
  needed = staged_step.program_bytes(fused.lower(state, batch).compile())
  assert needed > state.params['head']['kernel'].nbytes
  # Just too little memory for the fused program: staged.
  monkeypatch.setattr(staged_step, 'available_memory_bytes',
                      lambda: int(needed * jax.local_device_count() /
                                  staged_step.FUSED_MEMORY_FRACTION) - 1)
  assert isinstance(train_lib.make_train_fn(config, model, sharder.replicated, state, batch),
                    staged_step.StagedTrainStep)


def test_staged_step_compiles_its_programs_once_whatever_the_initial_placement():
  # A state straight from initialisation (not yet on the mesh) used to have every program
  # compiled again at the second step, for the updated state's sharding.
  config = helpers.step_config()
  model = models.create_model(config.model)
  state = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'))
  step = staged_step.StagedTrainStep(model, 'ce', train_lib._Sharder(  # pylint: disable=protected-access
      train_lib.make_mesh()).replicated)
  compiles = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      compiles.append(event)

  batch = helpers.random_batch(config, 1)
  state, _ = step(state, batch)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for _ in range(2):
      state, out = step(state, batch)
      jax.block_until_ready(out)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not compiles
