"""Tests for the model: shapes, parameter counts, exact conv shortcuts, norm behaviour, dtypes."""

import functools
import re
import subprocess
import sys
import warnings

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aspp_resunet import aspp
from aspp_resunet import layers
from aspp_resunet import models
from aspp_resunet import xla_options
from configs import default

REPO = __file__.rsplit('/tests/', 1)[0]
# RngBitGenerator keys: XLA:CPU compiles parameter initialisation ~8x faster than threefry.
KEY = jax.random.key(0, impl='rbg')


def _jit_init(model):
  return jax.jit(model.init, static_argnames='train')


def _jit_apply(model):
  return jax.jit(model.apply, static_argnames=('train', 'mutable'))


def _model(**overrides):
  config = default.get_config().model
  config.update(overrides)
  return models.create_model(config)


def _residual_block_params(c_in, c_out):
  """Two 3x3x3 convs (no bias) + two BN (scale, shift); 1x1x1 conv + BN when channels differ."""
  count = 27 * c_in * c_out + 2 * c_out + 27 * c_out * c_out + 2 * c_out
  if c_in != c_out:
    count += c_in * c_out + 2 * c_out
  return count


def expected_parameters(base=64, depth=4, bridge=1024, aspp_features=256, use_aspp=True,
                        in_channels=4, classes=4, pool_norm='none'):
  """SPEC 2 written as a formula."""
  widths = [base * 2**level for level in range(depth)]
  total, channels = 0, in_channels
  for width in widths:
    total += _residual_block_params(channels, width)
    channels = width
  total += _residual_block_params(channels, bridge)
  channels = bridge
  if use_aspp:
    a = aspp_features
    total += 27 * bridge * a + (2 * a if pool_norm == 'batch' else 0)  # pooling branch
    total += bridge * a + 2 * a  # 1x1x1
    total += 3 * (27 * bridge * a + 2 * a)  # three atrous branches
    total += 5 * a * a + 2 * a  # projection
    channels = a
  for width in reversed(widths):
    total += _residual_block_params(channels + width, width)
    channels = width
  return total + channels * classes + classes


def test_paper_parameter_counts_match_spec():
  assert expected_parameters() == 113_773_572
  assert expected_parameters(pool_norm='batch') == 113_774_084
  assert expected_parameters(use_aspp=False) == 95_879_684


@pytest.mark.parametrize('use_aspp', [True, False])
@pytest.mark.parametrize('base,pool_norm',
                         [(64, 'none'), (64, 'batch'), (16, 'none'), (8, 'batch')])
def test_parameter_count_equals_formula(use_aspp, base, pool_norm):
  bridge, aspp_features = base * 16, base * 4
  model = _model(base_width=base, bridge_width=bridge, aspp_features=aspp_features,
                 use_aspp=use_aspp, aspp_pool_norm=pool_norm)
  variables = models.abstract_variables(model, (128, 128, 128))
  assert models.count_parameters(variables['params']) == expected_parameters(
      base=base, bridge=bridge, aspp_features=aspp_features, use_aspp=use_aspp,
      pool_norm=pool_norm)


@pytest.mark.parametrize('size', [(32, 32, 32), (64, 32, 96), (128, 128, 128)])
@pytest.mark.parametrize('use_aspp', [True, False])
def test_output_shapes(size, use_aspp):
  model = _model(base_width=4, bridge_width=64, aspp_features=8, use_aspp=use_aspp)
  variables = models.abstract_variables(model, size)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                       jax.ShapeDtypeStruct((2, *size, 4), jnp.float32))
  assert out.shape == (2, *size, 4)
  assert out.dtype == jnp.float32


def test_input_not_divisible_is_refused():
  model = _model(base_width=4, bridge_width=64, aspp_features=8)
  with pytest.raises(ValueError, match='divisible by 32'):
    models.abstract_variables(model, (48, 48, 40))


def test_parameter_table_cli():
  result = subprocess.run([sys.executable, '-m', 'aspp_resunet.models',
                           '--config=configs/default.py'], cwd=REPO, capture_output=True,
                          text=True, check=True)
  assert 'total             113,773,572' in result.stdout
  assert 'total              95,879,684' in result.stdout
  assert result.stdout.index('encoder_0') < result.stdout.index('bridge') < \
      result.stdout.index('aspp') < result.stdout.index('head')


@pytest.mark.parametrize('size,kernel,dilation', [((8, 8, 8), 3, 6), ((8, 8, 8), 3, 12),
                                                  ((8, 8, 8), 3, 18), ((5, 7, 9), 3, 1),
                                                  ((5, 7, 9), 3, 4), ((4, 4, 4), 5, 1),
                                                  ((1, 1, 1), 3, 1), ((6, 3, 9), 1, 1),
                                                  ((2, 9, 3), 3, 2), ((7, 4, 5), 5, 3)])
@pytest.mark.parametrize('conv_impl', layers.CONV_IMPLS)
def test_conv3d_equals_reference_lax_convolution(size, kernel, dilation, conv_impl):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, *size, 5)), jnp.float32)
  conv = layers.Conv3D(7, kernel_size=kernel, dilation=dilation, use_bias=True,
                       conv_impl=conv_impl)
  variables = conv.init(KEY, x)
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), variables)
  half = dilation * (kernel // 2)
  reference = jax.lax.conv_general_dilated(
      x, variables['params']['kernel'], (1, 1, 1), [(half, half)] * 3,
      rhs_dilation=(dilation,) * 3, dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
      precision=jax.lax.Precision.HIGHEST) + variables['params']['bias']
  np.testing.assert_allclose(conv.apply(variables, x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('coarse_size', [(1, 1, 1), (2, 3, 4), (4, 4, 4)])
@pytest.mark.parametrize('kernel', [1, 3])
@pytest.mark.parametrize('conv_impl', layers.CONV_IMPLS)
def test_decoder_conv_equals_conv_of_upsampled_concatenation(coarse_size, kernel, conv_impl):
  """Conv3D(x, skip) == the convolution of concat([upsample_nearest(x), skip]): values and both
  input gradients, the kernel gradient included."""
  rng = np.random.default_rng(kernel)
  x = jnp.asarray(rng.standard_normal((2, *coarse_size, 6)), jnp.float32)
  skip = jnp.asarray(rng.standard_normal((2, *(2 * s for s in coarse_size), 3)), jnp.float32)
  conv = layers.Conv3D(5, kernel_size=kernel, use_bias=True, conv_impl=conv_impl)
  variables = conv.init(KEY, x, skip)
  variables = jax.tree_util.tree_map(
      lambda v: jnp.asarray(rng.standard_normal(v.shape), v.dtype), variables)
  assert variables['params']['kernel'].shape == (kernel,) * 3 + (9, 5)
  cotangent = jnp.asarray(rng.standard_normal(skip.shape[:4] + (5,)), jnp.float32)

  def ours(variables, x, skip):
    return jnp.sum(conv.apply(variables, x, skip) * cotangent)

  def reference(variables, x, skip):
    joined = jnp.concatenate([layers.upsample_nearest(x), skip], axis=-1)
    y = _reference_conv(joined, variables['params']['kernel'], 1) + variables['params']['bias']
    return jnp.sum(y * cotangent)

  np.testing.assert_allclose(
      conv.apply(variables, x, skip),
      _reference_conv(jnp.concatenate([layers.upsample_nearest(x), skip], axis=-1),
                      variables['params']['kernel'], 1) + variables['params']['bias'],
      rtol=1e-4, atol=1e-4)
  got = jax.grad(ours, argnums=(0, 1, 2))(variables, x, skip)
  expected = jax.grad(reference, argnums=(0, 1, 2))(variables, x, skip)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('block_bytes', [1, 40000, 10**9])  # blocks of 1 / a few / all slices
@pytest.mark.parametrize('kernel', [1, 3])
def test_decoder_conv_blocks_give_the_convolution_of_the_upsampled_concatenation(
    monkeypatch, block_bytes, kernel):
  # The decoder's sums in loops over depth blocks (`layers.decoder_conv`), with blocks of the
  # upsampled map's and of the skip's loops that differ in size.
  monkeypatch.setattr(layers, 'FLAT_BLOCK_BYTES', block_bytes)
  monkeypatch.setattr(layers, 'POINTWISE_BLOCK_BYTES', block_bytes)
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 2, 6)), jnp.float32)
  skip = jnp.asarray(rng.standard_normal((2, 6, 8, 4, 3)), jnp.float32)
  kernel_array = jnp.asarray(rng.standard_normal((kernel,) * 3 + (9, 5)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((2, 6, 8, 4, 5)), jnp.float32)

  def loss(conv_impl, inputs, kernel_array):
    x, skip = inputs
    if conv_impl == 'lax':
      y = _reference_conv(jnp.concatenate([layers.upsample_nearest(x), skip], axis=-1),
                          kernel_array, 1)
    else:
      y = layers.decoder_conv(x, skip, kernel_array, conv_impl)
    return jnp.sum(y * cotangent), y

  # Outputs, and the gradients of x, skip and the kernel.
  got, expected = (jax.value_and_grad(functools.partial(loss, impl), (0, 1), has_aux=True)(
      (x, skip), kernel_array) for impl in ('flat', 'lax'))
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('dtype,tolerance', [(jnp.float32, 1e-4), (jnp.bfloat16, 5e-2)])
def test_decoder_block_equals_block_on_upsampled_concatenation(dtype, tolerance):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((1, 3, 4, 2, 16)), jnp.float32)
  skip = jnp.asarray(rng.standard_normal((1, 6, 8, 4, 8)), jnp.float32)
  block = layers.ResidualBlock(8, dtype=dtype)
  variables = block.init(KEY, x, True, skip)
  joined = jnp.concatenate([layers.upsample_nearest(x), skip], axis=-1)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(
      block.init(KEY, joined, True))
  ours, ours_stats = block.apply(variables, x, True, skip, mutable=['batch_stats'])
  reference, reference_stats = block.apply(variables, joined, True, mutable=['batch_stats'])
  np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(reference, np.float32),
                             rtol=tolerance, atol=tolerance)
  for a, b in zip(jax.tree_util.tree_leaves(ours_stats),
                  jax.tree_util.tree_leaves(reference_stats)):
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_bias_gradient_is_the_cotangent_summed_in_float32(dtype):
  rng = np.random.default_rng(3)
  y = jnp.asarray(rng.standard_normal((2, 4, 6, 8, 3)), dtype)
  bias = jnp.asarray(rng.standard_normal(3), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
  output, vjp = jax.vjp(layers.add_bias, y, bias)
  np.testing.assert_array_equal(output, y + bias.astype(dtype))
  y_gradient, bias_gradient = vjp(cotangent)
  np.testing.assert_array_equal(y_gradient, cotangent)
  assert bias_gradient.dtype == jnp.float32
  # Not rounded to bfloat16 (an error of ~0.05 on these sums of 384 values).
  np.testing.assert_allclose(bias_gradient, np.asarray(cotangent, np.float64).sum((0, 1, 2, 3)),
                             rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_upsample_nearest_repeats_each_voxel_and_sums_its_window_gradient_once(dtype):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 2, 3, 1, 5)).astype(np.float32)
  expected = np.repeat(np.repeat(np.repeat(x, 2, axis=1), 2, axis=2), 2, axis=3)
  np.testing.assert_array_equal(layers.upsample_nearest(jnp.asarray(x, dtype)),
                                expected.astype(dtype))
  cotangent = jnp.asarray(rng.standard_normal(expected.shape), dtype)
  _, vjp = jax.vjp(layers.upsample_nearest, jnp.asarray(x, dtype))
  (gradient,) = vjp(cotangent)
  # Each voxel's 8 window cotangents summed in float32 (neighbours along depth, height, then
  # width), rounded once to the dtype.
  window_sums = np.asarray(cotangent, np.float32)
  for axis in (1, 2, 3):
    window_sums = (np.take(window_sums, range(0, window_sums.shape[axis], 2), axis) +
                   np.take(window_sums, range(1, window_sums.shape[axis], 2), axis))
  np.testing.assert_array_equal(np.asarray(gradient, np.float32),
                                np.asarray(jnp.asarray(window_sums).astype(dtype), np.float32))


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_equals_flax_max_pool_and_routes_gradient_to_first_maximum(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 6, 2, 3)), dtype)
  pool = functools.partial(flax_nn.max_pool, window_shape=(2, 2, 2), strides=(2, 2, 2))
  np.testing.assert_array_equal(layers.max_pool_2x(x), pool(x))
  cotangent = jnp.asarray(rng.standard_normal((2, 2, 3, 1, 3)), dtype)
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool_2x(x) * cotangent).astype(jnp.float32))
  reference = jax.grad(lambda x: jnp.sum(pool(x) * cotangent).astype(jnp.float32))
  np.testing.assert_array_equal(grad(x), reference(x))  # no ties: one maximum per window
  # Ties (ReLU zeros): the whole gradient goes to the first position of the window.
  zeros = jnp.zeros((1, 2, 2, 2, 1), dtype)
  tied = jax.grad(lambda x: jnp.sum(layers.max_pool_2x(x) * 3).astype(jnp.float32))(zeros)
  assert float(tied[0, 0, 0, 0, 0]) == 3 and float(jnp.sum(tied)) == 3


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_max_pool_gradient_goes_to_the_first_maximum_in_window_order_under_ties(dtype):
  # Values from {-1, -0, +0, 1}: most windows hold a tied maximum, at any positions, and -0
  # ties with +0 (equal as floats, different as bits).
  rng = np.random.default_rng(1)
  x = rng.choice(np.array([-1.0, -0.0, 0.0, 1.0], np.float32), (2, 4, 6, 2, 3),
                 p=[0.3, 0.3, 0.3, 0.1])
  cotangent = rng.standard_normal((2, 2, 3, 1, 3)).astype(np.float32)
  pool = functools.partial(flax_nn.max_pool, window_shape=(2, 2, 2), strides=(2, 2, 2))
  np.testing.assert_array_equal(layers.max_pool_2x(jnp.asarray(x, dtype)), pool(x).astype(dtype))
  grad = jax.grad(lambda x: jnp.sum(layers.max_pool_2x(x) * cotangent.astype(dtype)).astype(
      jnp.float32))(jnp.asarray(x, dtype))
  expected = np.zeros_like(x)
  for index in np.ndindex(cotangent.shape):
    n, i, j, k, c = index
    window = [x[n, 2 * i + a, 2 * j + b, 2 * k + d, c] for a, b, d in layers.PHASES]
    a, b, d = layers.PHASES[int(np.argmax(window))]  # argmax: the first maximum
    expected[n, 2 * i + a, 2 * j + b, 2 * k + d, c] = cotangent[index]
  np.testing.assert_array_equal(np.asarray(grad, np.float32),
                                expected.astype(dtype).astype(np.float32))


def _reference_conv(x, kernel, dilation, precision=jax.lax.Precision.HIGHEST, padding=None):
  """The native convolution; `padding` per axis, default 'SAME' for an odd cubic kernel."""
  if padding is None:
    padding = [(dilation * (kernel.shape[0] // 2),) * 2] * 3
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1, 1), padding, rhs_dilation=(dilation,) * 3,
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=precision)


def _assert_bfloat16_rounded_once(conv, reference, x, kernel, cotangent, err_msg=''):
  """conv's value and gradients (bfloat16) are the float32 reference's, rounded once."""
  got, vjp = jax.vjp(conv, x, kernel)
  wide = [a.astype(jnp.float32) for a in (x, kernel, cotangent)]
  expected, expected_vjp = jax.vjp(reference, *wide[:2])
  for name, value, wanted in zip(('value', 'input gradient', 'kernel gradient'),
                                 (got, *vjp(cotangent)), (expected, *expected_vjp(wide[2]))):
    assert value.dtype == jnp.bfloat16, name
    # One bfloat16 rounding of the float32 result (8 significant bits: 2^-8 relative).
    np.testing.assert_allclose(value.astype(jnp.float32), wanted, rtol=2**-7, atol=1e-5,
                               err_msg=f'{name} {err_msg}')


def _upsampled_phase_conv(x, kernel, phase_dtype):
  """The 'SAME' convolution of upsample_nearest(x) by a 3^3 kernel as `layers._upsampled_conv`
  makes it, 8 phase convolutions of x, in float32 with the phase kernels rounded to
  `phase_dtype` (their gradient is not: the rounding passes it as it is)."""
  def rounded(phase_kernel):
    return phase_kernel + jax.lax.stop_gradient(
        phase_kernel.astype(phase_dtype).astype(jnp.float32) - phase_kernel)

  phases = [_reference_conv(x, rounded(phase_kernel), 1,
                            padding=[(0, 1) if odd else (1, 0) for odd in phase])
            for phase, phase_kernel in zip(layers.PHASES, layers._phase_kernels(kernel))]  # pylint: disable=protected-access
  return layers._interleave_phases(jnp.stack(phases))  # pylint: disable=protected-access


@pytest.mark.parametrize('conv_impl', ['depth2d', 'im2col', 'hybrid', 'flat'])
@pytest.mark.parametrize('seed', range(6))
def test_gradients_equal_lax_on_random_shapes(seed, conv_impl):
  rng = np.random.default_rng(seed)
  size = tuple(int(s) for s in rng.integers(1, 10, 3))
  in_features, out_features = (int(c) for c in rng.integers(1, 9, 2))
  kernel_size, dilation = int(rng.choice([1, 3, 5])), int(rng.integers(1, 4))
  x = jnp.asarray(rng.standard_normal((2, *size, in_features)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size,) * 3 + (in_features, out_features)),
                       jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((2, *size, out_features)), jnp.float32)
  half = dilation * (kernel_size // 2)

  def loss(impl, x, kernel):
    y = layers.conv3d_same(x, kernel, dilation, [(half, half)] * 3, impl)
    return jnp.sum(y * cotangent)

  expected = jax.grad(functools.partial(loss, 'lax'), argnums=(0, 1))(x, kernel)
  got = jax.grad(functools.partial(loss, conv_impl), argnums=(0, 1))(x, kernel)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('conv_impl', ['depth2d', 'im2col', 'hybrid', 'flat'])
def test_bfloat16_matches_float32_reference(conv_impl):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 6, 5, 7, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 4)) * 0.2, jnp.bfloat16)
  got = layers.conv3d_same(x, kernel, 2, [(2, 2)] * 3, conv_impl)
  assert got.dtype == jnp.bfloat16
  expected = _reference_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), 2)
  # bfloat16 keeps 8 significant bits: products summed over 216 taps, relative error ~1e-2.
  np.testing.assert_allclose(got.astype(jnp.float32), expected, rtol=5e-2, atol=5e-2)


# 'flat' kernel gradients: one product per tap window (here 8 channels) or the windows joined.
# 'flat' with its width taps folded into the columns or not (`layers._folds_width_taps`).
@pytest.mark.parametrize('conv_impl,window_products,fold', [
    ('im2col', False, True), ('flat', True, True), ('flat', False, True), ('flat', False, False)])
@pytest.mark.parametrize('upsampled', [False, True])
def test_im2col_and_flat_in_bfloat16_are_the_float32_computation_rounded_once(
    monkeypatch, upsampled, conv_impl, window_products, fold):
  monkeypatch.setattr(layers, '_folds_width_taps', lambda channels, features: fold)
  if window_products:
    monkeypatch.setattr(layers, 'WINDOW_PRODUCT_MIN_FEATURES', 1)
  # Values and all gradients: summing the column gradients in bfloat16 instead (as the column
  # copies' transpose does in the input dtype) is off by up to 280% on small entries.
  rng = np.random.default_rng(0)
  # Two examples: the kernel gradients' columns hold both examples' rows, in the order of the
  # cotangent's.
  x = jnp.asarray(rng.standard_normal((2, 6, 4, 5, 16)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 16, 8)) * 0.2, jnp.bfloat16)
  out_size = tuple(s * (2 if upsampled else 1) for s in x.shape[1:4])
  cotangent = jnp.asarray(rng.standard_normal((2, *out_size, 8)), jnp.bfloat16)

  def conv(impl, x, kernel):
    if upsampled:
      if impl != 'lax':
        return layers._upsampled_conv(x, kernel, impl)  # pylint: disable=protected-access
      x = layers.upsample_nearest(x)
    return _reference_conv(x, kernel, 1) if impl == 'lax' else layers.conv3d_same(
        x, kernel, 1, [(1, 1)] * 3, impl)

  if upsampled and conv_impl == 'flat':
    # 'flat' multiplies bfloat16 phase kernels (`_upsampled_flat_block_output`): the float32
    # reference with the phase kernels rounded to bfloat16 (the kernel gradient is unchanged).
    reference = functools.partial(_upsampled_phase_conv, phase_dtype=jnp.bfloat16)
    wide = [a.astype(jnp.float32) for a in (x, kernel)]
    np.testing.assert_allclose(_upsampled_phase_conv(*wide, jnp.float32), conv('lax', *wide),
                               rtol=1e-5, atol=1e-5)
  else:
    reference = functools.partial(conv, 'lax')
  _assert_bfloat16_rounded_once(functools.partial(conv, conv_impl), reference, x, kernel,
                                cotangent)


@pytest.mark.parametrize('seed,fold', [(0, True), (1, True), (2, True), (3, True),
                                       (4, False), (5, False)])
def test_bfloat16_flat_is_the_float32_convolution_rounded_once_for_any_kernel_shape(
    monkeypatch, seed, fold):
  # bfloat16 'flat' folds the width taps into its columns (`layers._flat_block_output`) or
  # not (`layers._folds_width_taps`): kernels of any (depth, height, width) size, dilations
  # and uneven paddings.
  monkeypatch.setattr(layers, '_folds_width_taps', lambda channels, features: fold)
  rng = np.random.default_rng(seed)
  kernel_size = tuple(int(k) for k in rng.choice([1, 2, 3, 5], 3))
  dilation = int(rng.integers(1, 3))
  lows = [int(rng.integers(0, (k - 1) * dilation + 1)) for k in kernel_size]
  padding = [(lo, (k - 1) * dilation - lo) for lo, k in zip(lows, kernel_size)]  # same size
  size = tuple(int(s) for s in rng.integers(5, 9, 3))
  x = jnp.asarray(rng.standard_normal((2, *size, 6)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((*kernel_size, 6, 5)) * 0.2, jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal((2, *size, 5)), jnp.bfloat16)

  _assert_bfloat16_rounded_once(
      lambda x, kernel: layers.conv3d_same(x, kernel, dilation, padding, 'flat'),
      lambda x, kernel: _reference_conv(x, kernel, dilation, padding=padding),
      x, kernel, cotangent, f'kernel {kernel_size}, dilation {dilation}')


@pytest.mark.parametrize('shape,features,kernel_size', [
    ((2, 5, 6, 8, 4), 3, (3, 3, 3)), ((1, 4, 3, 2, 1), 2, (3, 3, 3)),
    ((1, 6, 5, 10, 3), 4, (3, 3, 3)), ((1, 4, 5, 6, 2), 3, (1, 5, 3))])
def test_paired_flat_is_the_float32_convolution_rounded_once(shape, features, kernel_size):
  # Up to PAIRED_MAX_CHANNELS input channels bfloat16 'flat' pairs width neighbours
  # (`layers._paired_flat_conv`): products of (depth, 2 pair taps, 2 x in) columns, with
  # the depth and height kernel and padding as given ('SAME' here).
  rng = np.random.default_rng(shape[-1])
  x = jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((*kernel_size, shape[-1], features)) * 0.2,
                       jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal((*shape[:4], features)), jnp.bfloat16)
  padding = [(k // 2, k // 2) for k in kernel_size]
  conv = lambda x, kernel: layers.conv3d_same(x, kernel, 1, padding, 'flat')
  products = _column_products(conv, x, kernel)
  depth, height = kernel_size[:2]
  assert [eqn.invars[1].aval.shape for eqn in products] == [
      (depth * 2 * 2 * shape[-1], height * 2 * features)]
  _assert_bfloat16_rounded_once(
      conv, lambda x, kernel: _reference_conv(x, kernel, 1, padding=padding),
      x, kernel, cotangent, f'shape {shape}, kernel {kernel_size}')


@pytest.mark.parametrize('dtype,channels,width,dilation,paired', [
    (jnp.bfloat16, 4, 8, 1, True), (jnp.float32, 4, 8, 1, False),
    (jnp.bfloat16, 5, 8, 1, False), (jnp.bfloat16, 4, 7, 1, False),
    (jnp.bfloat16, 4, 8, 2, False)])
def test_flat_pairs_width_neighbours_of_narrow_bfloat16_inputs_only(
    dtype, channels, width, dilation, paired):
  x = jnp.ones((1, 6, 6, width, channels), dtype)
  kernel = jnp.ones((3, 3, 3, channels, 4), dtype)
  padding = [(dilation, dilation)] * 3
  pairs = layers._pairs_width  # pylint: disable=protected-access
  assert pairs(x, kernel, dilation, padding) == paired
  products = _column_products(lambda x, k: layers.conv3d_same(
      x, k, dilation, padding, 'flat'), x, kernel)
  assert (products[0].invars[1].aval.shape[1] == 3 * 2 * 4) == paired


@pytest.mark.parametrize('dtype,channels,amx,folded', [
    (jnp.bfloat16, 8, False, True), (jnp.float32, 8, False, False),
    (jnp.bfloat16, 32, False, True),  # without AMX every width folds
    (jnp.bfloat16, 8, True, True),  # with AMX only narrow maps
    (jnp.bfloat16, layers.AMX_FOLD_MAX_CHANNELS + 1, True, False)])
def test_flat_folds_the_width_taps_into_bfloat16_products_only(
    monkeypatch, dtype, channels, amx, folded):
  monkeypatch.setattr(xla_options, 'cpu_has_amx', lambda: amx)
  x = jnp.ones((1, 6, 6, 6, channels), dtype)
  kernel = jnp.ones((3, 3, 3, channels, channels), dtype)
  products = _equations('dot_general', lambda x, k: layers.conv3d_same(
      x, k, 1, [(1, 1)] * 3, 'flat'), x, kernel)
  # Folded: (depth, width taps, in) x (height taps, out); else (depth, in) x (in-plane, out).
  contracted = 3 * (3 if folded else 1) * channels
  assert [eqn.invars[1].aval.shape for eqn in products] == [
      (contracted, 27 * channels * channels // contracted)]


@pytest.mark.parametrize('dtype,channels,features,amx,shapes', [
    (jnp.bfloat16, 16, 8, False, [(2 * 2 * 16, 2 * 2 * 8)] * 4),
    (jnp.float32, 16, 8, False, [(2 * 16, 16 * 8)] * 2),
    (jnp.bfloat16, 24, 8, True, [(2 * 2 * 24, 2 * 2 * 8)] * 4),  # 8 output channels: narrow
    (jnp.bfloat16, 24, 24, True, [(2 * 24, 16 * 24)] * 2)])
def test_upsampled_flat_folds_the_width_taps_into_bfloat16_products_only(
    monkeypatch, dtype, channels, features, amx, shapes):
  monkeypatch.setattr(xla_options, 'cpu_has_amx', lambda: amx)
  x = jnp.ones((1, 4, 4, 4, channels), dtype)
  kernel = jnp.ones((3, 3, 3, channels, features), dtype)
  products = _column_products(lambda x, k: layers._upsampled_conv(x, k, 'flat'), x, kernel)  # pylint: disable=protected-access
  # bfloat16: per depth and width parity (depth taps, width taps, in) x (height parity,
  # height taps, out); float32: per depth parity (depth taps, in) x (in-plane phases, taps, out).
  assert [eqn.invars[1].aval.shape for eqn in products] == shapes


def test_model_output_is_the_same_with_every_conv_impl():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 16, 4)), jnp.float32)
  outputs = []
  for conv_impl in [impl for impl in layers.CONV_IMPLS if impl != 'auto']:
    model = _model(base_width=4, bridge_width=32, aspp_features=8, depth=2,
                   aspp_rates=(1, 2, 3), conv_impl=conv_impl)
    variables = _jit_init(model)(KEY, x, train=False)
    outputs.append(_jit_apply(model)(variables, x, train=False))
  for output in outputs[1:]:
    np.testing.assert_allclose(output, outputs[0], rtol=1e-4, atol=1e-4)


def test_auto_conv_impl_is_depth2d_or_flat_on_cpu_and_lax_elsewhere(monkeypatch):
  assert layers.resolve_conv_impl('auto') == 'depth2d'  # the tests run on CPU
  depth2d_limit = layers.DEPTH2D_STACK_LIMIT_BYTES
  assert layers.resolve_conv_impl('auto', depth2d_limit) == 'depth2d'
  assert layers.resolve_conv_impl('auto', depth2d_limit + 1) == 'flat'
  assert layers.resolve_conv_impl('auto', 100 * depth2d_limit) == 'flat'
  assert layers.resolve_conv_impl('depth2d', 100 * depth2d_limit) == 'depth2d'
  # bfloat16: 'flat' at every size (its products take bfloat16 operands).
  assert layers.resolve_conv_impl('auto', 0, jnp.bfloat16) == 'flat'
  assert layers.resolve_conv_impl('auto', 0, jnp.float32) == 'depth2d'
  assert layers.resolve_conv_impl('depth2d', 0, jnp.bfloat16) == 'depth2d'
  # A kernel that outweighs its input map (the bridge): 'im2col' in float32.
  heavy = layers.IM2COL_MIN_KERNEL_PER_INPUT
  assert layers.resolve_conv_impl('auto', 0, jnp.float32, heavy + 1) == 'im2col'
  assert layers.resolve_conv_impl('auto', 100 * depth2d_limit, jnp.float32, heavy + 1) == 'im2col'
  assert layers.resolve_conv_impl('auto', 0, jnp.float32, heavy) == 'depth2d'
  assert layers.resolve_conv_impl('auto', 0, jnp.bfloat16, heavy + 1) == 'flat'
  assert layers.resolve_conv_impl('flat', 0, jnp.float32, heavy + 1) == 'flat'
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert layers.resolve_conv_impl('auto') == 'lax'
  assert layers.resolve_conv_impl('auto', 0, jnp.bfloat16) == 'lax'
  assert layers.resolve_conv_impl('auto', 0, jnp.bfloat16, heavy + 1) == 'lax'
  assert layers.resolve_conv_impl('depth2d') == 'depth2d'


def test_auto_runs_flat_for_a_bfloat16_model_on_cpu(monkeypatch):
  calls = []
  for name in ('_flat_conv', '_upsampled_flat_conv'):
    original = getattr(layers, name)
    monkeypatch.setattr(layers, name, functools.partial(
        lambda original, name, *args: calls.append(name) or original(*args), original, name))
  # More channels than PAIRED_MAX_CHANNELS: `_flat_conv` itself.
  x = jnp.ones((1, 4, 4, 4, 8), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 8, 2), jnp.bfloat16)
  assert _spatial_ranks_of_convolutions(
      lambda x, k: layers.conv3d_same(x, k, 1, [(1, 1)] * 3, 'auto'), x, kernel) == []
  assert _spatial_ranks_of_convolutions(
      lambda x, k: layers._upsampled_conv(x, k, 'auto'), x, kernel) == []  # pylint: disable=protected-access
  assert calls == ['_flat_conv', '_upsampled_flat_conv']
  # The same layers in float32: 'depth2d', one 2D convolution each.
  assert _spatial_ranks_of_convolutions(
      lambda x, k: layers.conv3d_same(x, k, 1, [(1, 1)] * 3, 'auto'),
      x.astype(jnp.float32), kernel.astype(jnp.float32)) == [2]


def _column_products(fn, *args):
  """The matrix products `fn` runs (not the einsum that builds a paired kernel)."""
  return [eqn for eqn in _equations('dot_general', fn, *args) if eqn.invars[1].aval.ndim == 2]


def _equations(primitive, fn, *args):
  """The equations of `primitive` that `fn` runs, inside calls (custom_vjp, scan...) too."""

  def find(jaxpr):
    found = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == primitive:
        found.append(eqn)
      for param in eqn.params.values():
        for inner in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(inner, jax.extend.core.ClosedJaxpr):
            found += find(inner.jaxpr)
          elif isinstance(inner, jax.extend.core.Jaxpr):
            found += find(inner)
    return found

  return find(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)  # a new function: no cache


def _spatial_ranks_of_convolutions(fn, *args):
  """Spatial ranks of the convolutions `fn` runs."""
  return sorted(eqn.invars[0].aval.ndim - 2
                for eqn in _equations('conv_general_dilated', fn, *args))


@pytest.fixture(params=['per window', 'joined'])
def kernel_gradient_form(request, monkeypatch):
  """'flat' bfloat16 kernel gradients with one product per tap window (WINDOW_PRODUCT_MIN_FEATURES
  lowered to 1: the tests' layers are narrow) or with the windows joined (the default there)."""
  if request.param == 'per window':
    monkeypatch.setattr(layers, 'WINDOW_PRODUCT_MIN_FEATURES', 1)
  return request.param


# The dtypes of the products (forward; input gradient: cotangent x kernel; kernel gradient:
# input x cotangent, in bfloat16 one per in-plane tap): bfloat16 exactly where both operands
# hold bfloat16 values, where converting the float32 columns back is exact (the cotangent has
# the input's dtype).
@pytest.mark.parametrize('x_dtype,kernel_dtype,forward,input_gradient,kernel_gradient', [
    (jnp.bfloat16, jnp.bfloat16, 'bfloat16', 'bfloat16', 'bfloat16'),
    (jnp.bfloat16, jnp.float32, 'float32', 'float32', 'bfloat16'),
    (jnp.float32, jnp.float32, 'float32', 'float32', 'float32')])
def test_flat_multiplies_in_bfloat16_only_what_holds_bfloat16_values(
    x_dtype, kernel_dtype, forward, input_gradient, kernel_gradient, kernel_gradient_form):
  per_window = kernel_gradient == 'bfloat16' and kernel_gradient_form == 'per window'
  product_dtypes = sorted([forward, input_gradient] + [kernel_gradient] * (9 if per_window else 1))
  x = jnp.ones((1, 4, 4, 4, 8), x_dtype)  # not paired (PAIRED_MAX_CHANNELS)
  kernel = jnp.ones((3, 3, 3, 8, 2), kernel_dtype)

  def loss(x, kernel):
    return jnp.sum(layers.conv3d_same(x, kernel, 1, [(1, 1)] * 3, 'flat').astype(jnp.float32))

  products = _equations('dot_general', jax.grad(loss, (0, 1)), x, kernel)
  operand_dtypes = [{str(v.aval.dtype) for v in eqn.invars} for eqn in products]
  assert all(len(dtypes) == 1 for dtypes in operand_dtypes)  # no mixed products
  assert sorted(dtypes.pop() for dtypes in operand_dtypes) == product_dtypes
  assert all(eqn.outvars[0].aval.dtype == jnp.float32 for eqn in products)  # f32 accumulation


def _compiled_dot_operand_dtypes(fn, *args):
  """(lhs, rhs) element types of every matrix product in `fn`'s optimised XLA program: what the
  backend multiplies, after any upcast it inserted."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  types = dict(re.findall(r'(%[\w.\-]+) = (\w+)\[', text))
  operands = re.findall(r'= \w+\[[^\]]*\]\S* dot\((%[\w.\-]+), (%[\w.\-]+)\)', text)
  assert operands, 'no matrix product found in the compiled program'
  return sorted((types[lhs], types[rhs]) for lhs, rhs in operands)


@pytest.mark.usefixtures('kernel_gradient_form')
def test_bfloat16_products_are_not_upcast_by_the_compiler():
  # XLA:CPU runs a bfloat16 product in float32 between conversions when its left operand is
  # transposed (the kernel gradients' columns: `_transposed` gives a row-major copy) or its
  # result is bfloat16 (1x1x1 convolutions: `_pointwise_product` asks for float32).
  x = jnp.ones((1, 6, 6, 6, 8), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 8, 8), jnp.bfloat16)

  def loss(conv):
    return lambda x, kernel: jnp.sum(conv(x, kernel).astype(jnp.float32))

  same_size = loss(lambda x, k: layers.conv3d_same(x, k, 1, [(1, 1)] * 3, 'flat'))
  # The input and the kernel gradient (the loss's value is not needed).
  # (How many products the kernel gradients' windows make depends on XLA merging small ones.)
  assert set(_compiled_dot_operand_dtypes(jax.grad(same_size, (0, 1)), x, kernel)) == {
      ('bf16', 'bf16')}
  upsampled = loss(lambda x, k: layers._upsampled_conv(x, k, 'flat'))  # pylint: disable=protected-access
  # The input gradient per in-plane parity (4 products of the phase kernels, rounded to
  # bfloat16) and the kernel gradient; then the forward's products.
  products = _compiled_dot_operand_dtypes(jax.grad(upsampled, (0, 1)), x, kernel)
  assert set(products) == {('bf16', 'bf16')} and len(products) >= 6
  assert set(_compiled_dot_operand_dtypes(upsampled, x, kernel)) == {('bf16', 'bf16')}
  # 1x1x1: wider than POINTWISE_SUM_MAX_INPUTS, so products.
  x, matrix = jnp.ones((1, 6, 6, 6, 16), jnp.bfloat16), jnp.ones((16, 16), jnp.bfloat16)
  pointwise = functools.partial(layers.pointwise_conv, conv_impl='auto')
  assert _compiled_dot_operand_dtypes(pointwise, x, matrix) == [('bf16', 'bf16')]
  assert _compiled_dot_operand_dtypes(jax.grad(loss(pointwise), (0, 1)), x, matrix) == [
      ('bf16', 'bf16')] * 2


@pytest.mark.usefixtures('kernel_gradient_form')
def test_bfloat16_columns_are_built_from_bits_never_widened():
  # XLA:CPU computes bfloat16 selects and pads through float32, and columns built in float32
  # take a conversion pass back before a bfloat16 product: bfloat16 columns move as bits.
  x = jnp.ones((1, 6, 6, 6, 8), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 8, 8), jnp.bfloat16)

  def widenings(fn, *args):
    return [eqn for eqn in _equations('convert_element_type', fn, *args)
            if (eqn.invars[0].aval.dtype, eqn.outvars[0].aval.dtype) == (jnp.bfloat16,
                                                                           jnp.float32)]

  def loss(x, kernel):
    return jnp.sum(layers.conv3d_same(x, kernel, 1, [(1, 1)] * 3, 'flat').astype(jnp.float32))

  assert len(widenings(jax.grad(loss, (0, 1)), x, kernel)) == 1  # the loss's own

  def upsampled_loss(x, kernel):
    return jnp.sum(layers._upsampled_conv(x, kernel, 'flat').astype(jnp.float32))  # pylint: disable=protected-access

  # The decoder's convolution, forward and backward: the loss's own and the kernel's (its phase
  # kernels are float32 sums of taps).
  widened = [eqn.invars[0].aval.shape
             for eqn in widenings(jax.value_and_grad(upsampled_loss, (0, 1)), x, kernel)]
  assert sorted(widened) == sorted([(1, 12, 12, 12, 8), kernel.shape])


def test_bfloat16_flat_loops_write_their_blocks_as_bits():
  # XLA:CPU writes a bfloat16 block into a loop's output through float32, and a float32 output
  # converted after the loop is one more pass over a float32 map: blocks are written as bits.
  x, kernel = jnp.ones((1, 6, 6, 6, 8), jnp.bfloat16), jnp.ones((3, 3, 3, 8, 8), jnp.bfloat16)

  def loss(x, kernel):
    y = layers.conv3d_same(x, kernel, 1, [(1, 1)] * 3, 'flat')
    return jnp.sum(layers._upsampled_conv(y, kernel, 'flat').astype(jnp.float32))  # pylint: disable=protected-access

  block_outputs = [var.aval.dtype
                   for eqn in _equations('scan', jax.grad(loss, (0, 1)), x, kernel)
                   for var in eqn.outvars[eqn.params['num_carry']:]]
  # The forward and the input gradient of both convolutions (kernel gradients carry a sum).
  assert block_outputs == [jnp.uint16] * 4


def test_bfloat16_block_loops_carry_no_float32_copy_of_their_maps(monkeypatch):
  # XLA:CPU converts a bfloat16 dynamic slice or gather to float32 and hoists the conversion
  # of the loop-invariant map out of the loop; `_sliced_as_bits` slices the bits instead.
  monkeypatch.setattr(layers, 'FLAT_BLOCK_BYTES', 1)  # one depth slice per block: loops
  monkeypatch.setattr(layers, 'POINTWISE_BLOCK_BYTES', 1)
  shape = (1, 6, 6, 6, 16)
  x, kernel = jnp.ones(shape, jnp.bfloat16), jnp.ones((3, 3, 3, 16, 16), jnp.bfloat16)

  def loss(x, kernel):
    y = layers.conv3d_same(x, kernel, 1, [(1, 1)] * 3, 'flat')
    y = layers.pointwise_conv(y, kernel[0, 0, 0], 'auto')
    return jnp.sum(layers._upsampled_conv(y, kernel, 'flat').astype(jnp.float32) ** 2)  # pylint: disable=protected-access

  text = jax.jit(jax.grad(loss, (0, 1))).lower(x, kernel).compile().as_text()
  loop_states = re.findall(r'= \(([^)]*)\) while\(', text)
  assert len(loop_states) >= 6  # forward and backward of each convolution
  full_map = 'f32[{}]'.format(','.join(map(str, shape)))
  assert not [state for state in loop_states if full_map in state]


def test_auto_chooses_per_layer_by_the_size_of_the_depth_stack(monkeypatch):
  x = jnp.ones((1, 8, 8, 8, 4), jnp.float32)  # stacked copy: 3 x 8 KiB
  kernel = jnp.ones((3, 3, 3, 4, 2), jnp.float32)

  def conv(x, kernel):
    return layers.conv3d_same(x, kernel, 1, [(1, 1)] * 3, 'auto')

  flat_calls = []
  flat_conv = layers._flat_conv  # pylint: disable=protected-access
  monkeypatch.setattr(layers, '_flat_conv', lambda *args: flat_calls.append(1) or flat_conv(*args))
  gradient = jax.grad(lambda x, k: jnp.sum(conv(x, k)), (0, 1))
  assert _spatial_ranks_of_convolutions(conv, x, kernel) == [2]  # one 2D convolution
  assert not flat_calls
  monkeypatch.setattr(layers, 'DEPTH2D_STACK_LIMIT_BYTES', 3 * x.nbytes - 1)
  # 'flat': matrix products only, forward and backward.
  assert _spatial_ranks_of_convolutions(conv, x, kernel) == []
  assert _spatial_ranks_of_convolutions(gradient, x, kernel) == []
  assert len(flat_calls) == 2
  # A kernel of more than IM2COL_MIN_KERNEL_PER_INPUT elements per input element: 'im2col'.
  im2col_calls = []
  im2col_conv = layers._im2col_conv  # pylint: disable=protected-access
  monkeypatch.setattr(layers, '_im2col_conv',
                      lambda *args: im2col_calls.append(1) or im2col_conv(*args))
  small_map = jnp.ones((1, 2, 2, 2, 4), jnp.float32)
  heavy_kernel = jnp.ones((3, 3, 3, 4, 8), jnp.float32)  # 27 x 8 elements per input voxel
  assert heavy_kernel.size / small_map.size > layers.IM2COL_MIN_KERNEL_PER_INPUT
  assert _spatial_ranks_of_convolutions(gradient, small_map, heavy_kernel) == []
  assert len(im2col_calls) == 1 and len(flat_calls) == 2


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
# One depth slice per block, the products outside training over blocks as for a large map
# (POINTWISE_MAP_MIN_BYTES); or all in one.
@pytest.mark.parametrize('block_bytes', [1, None])
# In bfloat16 few inputs are summed (POINTWISE_SUM_MAX_INPUTS), more multiplied; forward and
# input gradient take one path each.
@pytest.mark.parametrize('in_features,out_features', [(6, 7), (12, 5), (13, 11)])
def test_pointwise_conv_equals_the_matrix_product(monkeypatch, dtype, block_bytes, in_features,
                                                  out_features):
  if block_bytes:
    monkeypatch.setattr(layers, 'POINTWISE_BLOCK_BYTES', block_bytes)
    monkeypatch.setattr(layers, 'POINTWISE_MAP_MIN_BYTES', 0)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 5, 3, 4, in_features)), dtype)
  matrix = jnp.asarray(rng.standard_normal((in_features, out_features)), dtype)
  cotangent = jnp.asarray(rng.standard_normal((2, 5, 3, 4, out_features)), dtype)
  summed = dtype == jnp.bfloat16 and in_features <= layers.POINTWISE_SUM_MAX_INPUTS
  conv = functools.partial(layers.pointwise_conv, conv_impl='auto')
  # Blocks outside training only: differentiated, one product (the input is kept anyway).
  assert len(_equations('scan', conv, x, matrix)) == (1 if block_bytes and not summed else 0)
  assert not _equations('scan', lambda x, matrix: jax.vjp(conv, x, matrix)[0], x, matrix)

  def reference(x, matrix):
    return jnp.einsum('bxyzc,cf->bxyzf', x, matrix)

  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  for conv_impl in ('auto', 'lax'):
    y, vjp = jax.vjp(functools.partial(layers.pointwise_conv, conv_impl=conv_impl), x, matrix)
    y_reference, vjp_reference = jax.vjp(reference, x, matrix)
    assert y.dtype == dtype
    for got, want in zip((y, *vjp(cotangent)), (y_reference, *vjp_reference(cotangent))):
      assert got.dtype == want.dtype and got.shape == want.shape
      np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                 rtol=tolerance, atol=tolerance * 10)


def test_live_taps():
  assert layers.live_taps(3, 6, 8) == [-1, 0, 1]
  assert layers.live_taps(3, 12, 8) == [0]
  assert layers.live_taps(3, 18, 8) == [0]
  assert layers.live_taps(3, 1, 1) == [0]
  assert layers.live_taps(5, 2, 5) == [-2, -1, 0, 1, 2]
  assert layers.live_taps(5, 2, 4) == [-1, 0, 1]


def test_aspp_dilated_branch_equals_reference_lax_call():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 8, 6)), jnp.float32)
  module = aspp.ASPP3D(features=4, rates=(6, 12, 18))
  variables = module.init(KEY, x, train=False)
  for rate in (6, 12, 18):
    kernel = variables['params'][f'atrous{rate}_conv']['kernel']
    conv = layers.Conv3D(4, kernel_size=3, dilation=rate)
    got = conv.apply({'params': {'kernel': kernel}}, x)
    reference = jax.lax.conv_general_dilated(
        x, kernel, (1, 1, 1), [(rate, rate)] * 3, rhs_dilation=(rate,) * 3,
        dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_batch_stats_update_only_in_training():
  model = _model(base_width=4, bridge_width=32, aspp_features=8, depth=2, aspp_rates=(1, 2, 3))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 16, 16, 16, 4)), jnp.float32)
  variables = _jit_init(model)(KEY, x, train=False)
  _, updates = _jit_apply(model)(variables, x, train=True, mutable='batch_stats')
  changed = jax.tree_util.tree_map(lambda a, b: bool(jnp.any(a != b)),
                                   variables['batch_stats'], updates['batch_stats'])
  assert all(jax.tree_util.tree_leaves(changed))
  out, unchanged = _jit_apply(model)(variables, x, train=False, mutable='batch_stats')
  same = jax.tree_util.tree_map(lambda a, b: bool(jnp.all(a == b)),
                                variables['batch_stats'], unchanged['batch_stats'])
  assert all(jax.tree_util.tree_leaves(same))
  assert out.shape == (2, 16, 16, 16, 4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = _model(base_width=4, bridge_width=32, aspp_features=8, depth=2, aspp_rates=(1, 2, 3),
                 dtype='bfloat16')
  x = jnp.ones((1, 16, 16, 16, 4), jnp.float32)
  variables = _jit_init(model)(KEY, x, train=False)
  dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  logits = _jit_apply(model)(variables, x, train=False)
  assert logits.dtype == jnp.float32
  # The computation really ran in bfloat16: it differs from float32 compute.
  reference = _jit_apply(_model(base_width=4, bridge_width=32, aspp_features=8, depth=2,
                                aspp_rates=(1, 2, 3)))(variables, x, train=False)
  assert not np.allclose(logits, reference, atol=1e-6)
  np.testing.assert_allclose(logits, reference, atol=0.25)


@pytest.mark.parametrize('norm', ['group', 'instance'])
def test_group_and_instance_norm_have_no_batch_stats(norm):
  model = _model(base_width=8, bridge_width=32, aspp_features=8, depth=2, aspp_rates=(1, 2, 3),
                 norm=norm)
  variables = jax.eval_shape(functools.partial(model.init, train=False), KEY,
                             jnp.ones((1, 16, 16, 16, 4)))
  assert 'batch_stats' not in variables


def test_remat_keeps_parameter_tree_and_values():
  kwargs = dict(base_width=4, bridge_width=32, aspp_features=8, depth=2, aspp_rates=(1, 2, 3))
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 16, 16, 16, 4)), jnp.float32)
  plain, remat = _model(**kwargs), _model(remat=True, **kwargs)
  variables = _jit_init(plain)(KEY, x, train=False)
  remat_variables = jax.eval_shape(functools.partial(remat.init, train=False), KEY, x)
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(remat_variables)

  def loss(model, params):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
    return jnp.mean(logits**2)

  grads = jax.jit(jax.grad(functools.partial(loss, plain)))(variables['params'])
  remat_grads = jax.jit(jax.grad(functools.partial(loss, remat)))(variables['params'])
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(remat_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pool_batch_norm_warns_when_degenerate():
  module = aspp.ASPP3D(features=4, rates=(1,), pool_norm='batch')
  x = jnp.ones((1, 2, 2, 2, 3))
  variables = module.init(KEY, x, train=False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    module.apply(variables, x, train=True, mutable=['batch_stats'])
  assert any('normalises one value per channel' in str(w.message) for w in caught)


def test_transpose_upsampling_runs():
  model = _model(base_width=4, bridge_width=32, aspp_features=8, depth=2, aspp_rates=(1, 2, 3),
                 upsampling='transpose')
  variables = _jit_init(model)(KEY, jnp.ones((1, 16, 16, 16, 4)), train=False)
  assert 'upsample_0' in variables['params']
  assert _jit_apply(model)(variables, jnp.ones((1, 16, 16, 16, 4)), train=False).shape[-1] == 4


def test_unknown_options_are_refused():
  with pytest.raises(ValueError, match='model.dtype'):
    _model(dtype='float16')
  with pytest.raises(ValueError, match='norm must be one of'):
    layers.make_norm('layer', True, jnp.float32, 'n')
  with pytest.raises(ValueError, match='conv_impl must be one of'):
    _model(conv_impl='winograd')


@pytest.mark.parametrize('momentum', [0.99, 0.9])
def test_bn_momentum_sets_the_running_average_update(momentum):
  block = layers.ResidualBlock(features=3, bn_momentum=momentum)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 4, 3)), jnp.float32)
  variables = block.init(KEY, x, train=False)
  _, updates = jax.jit(functools.partial(block.apply, train=True, mutable='batch_stats'))(
      variables, x)
  # norm1 normalises conv1's output; its batch mean moved the running mean (from 0) by 1 - m.
  conv1 = jax.lax.conv_general_dilated(
      x, variables['params']['conv1']['kernel'], (1, 1, 1), 'SAME',
      dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=jax.lax.Precision.HIGHEST)
  expected = (1 - momentum) * conv1.mean(axis=(0, 1, 2, 3))
  np.testing.assert_allclose(updates['batch_stats']['norm1']['mean'], expected, rtol=1e-3,
                             atol=1e-5)


def _assert_same_values_and_gradients(loss, conv_impl, x, kernel):
  """`loss(impl, x, kernel)` -> (loss, output): `conv_impl`'s output and gradients (x, kernel)
  equal 'lax''s."""
  (_, got), got_grads = jax.value_and_grad(
      functools.partial(loss, conv_impl), (0, 1), has_aux=True)(x, kernel)
  (_, expected), expected_grads = jax.value_and_grad(
      functools.partial(loss, 'lax'), (0, 1), has_aux=True)(x, kernel)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
  for g, e in zip(got_grads, expected_grads):
    np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('conv_impl', ['im2col', 'hybrid', 'flat'])
@pytest.mark.parametrize('block_bytes', [1, 10**9])  # one depth slice per block / all at once
def test_im2col_blocks_give_the_same_convolution(monkeypatch, block_bytes, conv_impl):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 4, 3)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 1, 3, 3, 4)), jnp.float32)  # a trimmed kernel
  padding = [(2, 1), (0, 0), (2, 2)]  # asymmetric in depth: blocks at both ends differ
  cotangent = jnp.asarray(rng.standard_normal((2, 5, 5, 4, 4)), jnp.float32)
  monkeypatch.setattr(layers, 'IM2COL_BLOCK_BYTES', block_bytes)
  monkeypatch.setattr(layers, 'FLAT_BLOCK_BYTES', block_bytes)

  def loss(conv_impl, x, kernel):
    if conv_impl == 'lax':
      y = jax.lax.conv_general_dilated(
          x, kernel, (1, 1, 1), padding, rhs_dilation=(2, 2, 2),
          dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'), precision=jax.lax.Precision.HIGHEST)
    else:
      y = layers.conv3d_same(x, kernel, 2, padding, conv_impl)
    return jnp.sum(y * cotangent), y

  _assert_same_values_and_gradients(loss, conv_impl, x, kernel)


def test_flat_blocks_of_narrow_maps_take_a_third_of_the_block_bytes():
  # Output depth slices per block: 48^3 with 9 in-plane taps of 8 features is 0.72 MB of partial
  # products per slice: 8 slices within 8 MiB (24 within 24 MiB); 128 features (11.5 MB per
  # slice) keep 2 slices within 24 MiB.
  padding = layers.SAME_3_PADDING
  narrow = layers._FlatGeometry((1, 48, 48, 48, 8), (3, 3, 3, 8, 8), 1, padding)
  wide = layers._FlatGeometry((1, 48, 48, 48, 128), (3, 3, 3, 128, 128), 1, padding)
  assert (narrow.block, wide.block) == (8, 2)
  # The input gradient's geometry counts the flipped kernel's output features (x's channels).
  input_gradient = layers._FlatGeometry((1, 48, 48, 48, 128), (3, 3, 3, 128, 8), 1, padding)
  assert input_gradient.block == 8
  # Upsampled: the features of the map computed, not the kernel's (3, 3, 3) taps.
  assert layers._upsampled_output_geometry((1, 24, 24, 24, 16), 8).block == 12
  assert layers._upsampled_output_geometry((1, 24, 24, 24, 16), 64).block == 4
  assert layers._upsampled_geometry((1, 48, 48, 48, 16), 4, 16).block == 12


def test_upsampled_input_gradient_blocks_count_the_coarse_channels(monkeypatch):
  # 16 coarse channels to 64 features: the forward and the kernel gradient (8 KiB of partial
  # products per coarse row) are wide, the input gradient (256 B per row, a map of 16
  # channels) narrow: with 441 KiB of block bytes, 1 coarse slice per block for the first two
  # and 3 (of 12) for the input gradient, which with the 64 features' limit would take 6.
  monkeypatch.setattr(layers, 'FLAT_BLOCK_BYTES', 9 * 196 * 256)
  x = jnp.ones((1, 12, 12, 12, 16), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 16, 64), jnp.bfloat16)

  def loss(x, kernel):
    return jnp.sum(layers._upsampled_conv(x, kernel, 'flat').astype(jnp.float32))  # pylint: disable=protected-access

  loop_lengths = [eqn.params['length']
                  for eqn in _equations('scan', jax.grad(loss, (0, 1)), x, kernel)]
  assert sorted(loop_lengths) == [4, 12, 12]


def _flax_batch_norm(train, dtype, momentum=0.9):
  return flax_nn.BatchNorm(use_running_average=not train, momentum=momentum,
                           epsilon=layers.BATCH_NORM_EPSILON, dtype=dtype,
                           param_dtype=jnp.float32)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_equals_flax_batch_norm_values_gradients_and_running_stats(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 7, 3)) * 3 + 2, dtype)
  ours = layers.BatchNorm(use_running_average=False, momentum=0.9, dtype=dtype)
  theirs = _flax_batch_norm(True, dtype)
  variables = theirs.init(KEY, x)
  assert (jax.tree_util.tree_structure(ours.init(KEY, x)) ==
          jax.tree_util.tree_structure(variables))
  variables = {'params': {'scale': jnp.asarray(rng.standard_normal(3), jnp.float32),
                          'bias': jnp.asarray(rng.standard_normal(3), jnp.float32)},
               'batch_stats': {'mean': jnp.asarray(rng.standard_normal(3), jnp.float32),
                               'var': jnp.asarray(rng.random(3) + 0.5, jnp.float32)}}
  weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

  def loss(module, params, x):
    y, updates = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    assert y.dtype == dtype
    return jnp.sum(weights * y.astype(jnp.float32) ** 2), (y, updates)

  results = [jax.jit(jax.value_and_grad(functools.partial(loss, module), argnums=(0, 1),
                                        has_aux=True))(variables['params'], x)
             for module in (ours, theirs)]
  (_, (y, updates)), grads = results[0]
  (_, (flax_y, flax_updates)), flax_grads = results[1]
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.float32(y), np.float32(flax_y), rtol=tolerance, atol=tolerance)
  for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(flax_updates)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(flax_grads)):
    scale = float(np.abs(np.float32(b)).max())
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tolerance * scale)
  # Evaluation mode: the running statistics, as flax.
  eval_ours = layers.BatchNorm(use_running_average=True, dtype=dtype).apply(variables, x)
  eval_theirs = _flax_batch_norm(False, dtype).apply(variables, x)
  np.testing.assert_allclose(np.float32(eval_ours), np.float32(eval_theirs), rtol=tolerance,
                             atol=tolerance)


def test_batch_norm_gradient_through_its_statistics():
  # The batch mean and variance outputs have their own cotangents (zero in training, where they
  # only feed the running averages); the custom gradient must still be the formula's.
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 4, 5, 2)), jnp.float32)
  scale, bias = jnp.asarray([1.5, -0.5]), jnp.asarray([0.1, 0.2])

  def formula(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = (x * x).mean((0, 1, 2)) - mean**2
    return (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias, mean, var

  def total(fn, x, scale, bias):
    y, mean, var = fn(x, scale, bias)
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean**3) + jnp.sum(jnp.cos(var))

  ours = jax.grad(functools.partial(total, lambda *a: layers.batch_norm_train(
      *a, 1e-3, jnp.float32)), argnums=(0, 1, 2))(x, scale, bias)
  reference = jax.grad(functools.partial(total, formula), argnums=(0, 1, 2))(x, scale, bias)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_norm_gradient_does_not_store_the_centred_input():
  # Both normalisations' backward passes at once, as in a residual block's second half: flax's
  # autodiff keeps each input and its centred float32 copy; ours only the input.
  x = jax.ShapeDtypeStruct((1, 16, 16, 16, 8), jnp.float32)
  features = jax.ShapeDtypeStruct((8,), jnp.float32)

  def temporaries(module):
    def loss(params, a, b):
      y = [module.apply({'params': params, 'batch_stats': {'mean': jnp.zeros(8),
                                                          'var': jnp.ones(8)}},
                        v, mutable=['batch_stats'])[0] for v in (a, b)]
      return jnp.sum(flax_nn.relu(y[0] + y[1]) ** 2)

    params = {'scale': features, 'bias': features}
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(params, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  map_bytes = 16**3 * 8 * 4
  ours = temporaries(layers.BatchNorm(use_running_average=False))
  theirs = temporaries(_flax_batch_norm(True, jnp.float32))
  # A map less, but for the slices of the sums' loop (`_channel_sums`): 1.007 vs 2.004 maps.
  assert ours <= theirs - 0.95 * map_bytes, (ours / map_bytes, theirs / map_bytes)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_batch_norm_writes_no_float32_map_but_its_outputs(monkeypatch, dtype):
  # XLA:CPU sums a whole map with YNNPACK from a materialised input: a float32 copy of a
  # bfloat16 map, the centred map, the product of cotangent and centred map. The statistics and
  # the backward's sums are taken over blocks of depth slices instead (`_channel_sums`), here
  # one slice each (a map this small fits in one block of CHANNEL_SUM_BLOCK_BYTES).
  monkeypatch.setattr(layers, 'CHANNEL_SUM_BLOCK_BYTES', 0)
  shape = (1, 8, 8, 8, 16)
  x = jnp.ones(shape, dtype)
  module = layers.BatchNorm(use_running_average=False, dtype=dtype)
  variables = module.init(KEY, x)

  def loss(params, x):
    y, _ = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) ** 2)

  maps = _float32_maps_written(jax.jit(jax.grad(loss, (0, 1))).lower(variables['params'], x),
                               shape)
  assert len(maps) == (2 if dtype == jnp.float32 else 0), maps  # y and x's gradient


# One slice, two (float32 slices of a batch of 2 x 5 x 7 x 3, two maps) or all 6 per block.
@pytest.mark.parametrize('block_bytes', [0, 2 * (2 * 5 * 7 * 3 * 4 * 2), 2**30])
def test_channel_sums_over_blocks_of_depth_slices_are_the_sums(monkeypatch, block_bytes):
  monkeypatch.setattr(layers, 'CHANNEL_SUM_BLOCK_BYTES', block_bytes)
  rng = np.random.default_rng(0)
  x, g = (jnp.asarray(rng.standard_normal((2, 6, 5, 7, 3)), jnp.float32) for _ in range(2))
  sums = jax.jit(lambda g, x: layers._channel_sums(  # pylint: disable=protected-access
      lambda g, x: (g, g * x), g, x))(g, x)
  np.testing.assert_allclose(sums[0], np.sum(g, axis=(0, 1, 2, 3)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sums[1], np.sum(g * x, axis=(0, 1, 2, 3)), rtol=1e-5, atol=1e-5)


def _float32_maps_written(lowered, shape):
  """The instructions of the compiled program's ENTRY computation that write a float32 array of
  `shape` (parameters left out)."""
  text = lowered.compile().as_text()
  entry = text[text.index('\nENTRY'):]
  return [line for line in entry[:entry.index('\n}')].splitlines()
          if re.search(r'= f32\[{}\]'.format(','.join(map(str, shape))), line)
          and ' parameter(' not in line]


@pytest.mark.parametrize('kernel', [1, 3])
def test_bfloat16_decoder_conv_and_batch_norm_write_no_float32_map(monkeypatch, kernel):
  # Summed after the two convolutions (upsampled map's, skip's), the sum was kept in float32 by
  # XLA:CPU (excess precision) and read so by the BatchNorm: a float32 map of the output's size,
  # in the step and in its memory. The decoder convolutions sum in their loops instead.
  monkeypatch.setattr(layers, 'CHANNEL_SUM_BLOCK_BYTES', 0)  # BatchNorm sums slice by slice
  x = jnp.ones((1, 4, 4, 4, 16), jnp.bfloat16)
  skip = jnp.ones((1, 8, 8, 8, 8), jnp.bfloat16)
  conv = layers.Conv3D(16, kernel_size=kernel, dtype=jnp.bfloat16, conv_impl='flat')
  norm = layers.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  conv_variables = conv.init(KEY, x, skip)
  norm_variables = norm.init(KEY, jnp.ones((1, 8, 8, 8, 16), jnp.bfloat16))

  def loss(params, x, skip):
    y = conv.apply({'params': params}, x, skip)
    y, _ = norm.apply(norm_variables, y, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32) ** 2)

  maps = _float32_maps_written(jax.jit(jax.grad(loss, (0, 1, 2))).lower(
      conv_variables['params'], x, skip), (1, 8, 8, 8, 16))
  assert not maps, maps


def test_join_channels_equals_concatenate():
  rng = np.random.default_rng(7)
  parts = [jnp.asarray(rng.standard_normal((2, 5, width)), jnp.float32) for width in (3, 1, 4)]
  joined = layers._join_channels(parts)  # pylint: disable=protected-access
  np.testing.assert_array_equal(joined, jnp.concatenate(parts, axis=-1))
  # Its gradient hands each part its own columns.
  weights = jnp.asarray(rng.standard_normal(joined.shape), jnp.float32)
  gradients = jax.grad(lambda ps: jnp.sum(layers._join_channels(ps) * weights))(parts)  # pylint: disable=protected-access
  np.testing.assert_array_equal(jnp.concatenate(gradients, axis=-1), weights)


@pytest.mark.parametrize('conv_impl', ['im2col', 'flat'])
@pytest.mark.parametrize('block_bytes', [1, 10**9])  # one coarse depth slice per block / all
def test_upsampled_blocks_give_the_convolution_of_the_upsampled_map(monkeypatch, block_bytes,
                                                                    conv_impl):
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 3, 4, 2, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 5, 4)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((2, 6, 8, 4, 4)), jnp.float32)
  monkeypatch.setattr(layers, 'IM2COL_BLOCK_BYTES', block_bytes)
  monkeypatch.setattr(layers, 'FLAT_BLOCK_BYTES', block_bytes)

  def loss(conv_impl, x, kernel):
    if conv_impl == 'lax':
      y = _reference_conv(layers.upsample_nearest(x), kernel, 1)
    else:
      y = layers._upsampled_conv(x, kernel, conv_impl)  # pylint: disable=protected-access
    return jnp.sum(y * cotangent), y

  _assert_same_values_and_gradients(loss, conv_impl, x, kernel)
