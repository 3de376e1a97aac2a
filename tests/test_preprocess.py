"""Tests for data_pipelines.preprocess."""

import numpy as np
import pytest
import scipy.ndimage

from aspp_resunet import labels
from data_pipelines import brats
from data_pipelines import preprocess


def _loaded(modalities, classes=None, shape=None):
  shape = shape or modalities[0].shape
  return brats.LoadedCase(case_id='c', modalities=tuple(m.astype(np.float32) for m in modalities),
                          classes=classes, affine=np.eye(4), zooms=(1.0, 1.0, 1.0), header=None)


def test_minmax_scales_each_volume_to_unit_range():
  rng = np.random.default_rng(0)
  modalities = [rng.uniform(-50, 3000, (12, 10, 8)) for _ in range(4)]
  prepared = preprocess.preprocess_case(
      _loaded(modalities), preprocess.PreprocessOptions(image_size=(12, 10, 8)))
  assert prepared.image.shape == (12, 10, 8, 4)
  for channel in range(4):
    assert prepared.image[..., channel].min() == pytest.approx(0.0, abs=1e-6)
    assert prepared.image[..., channel].max() == pytest.approx(1.0, abs=1e-6)
    expected = (modalities[channel] - modalities[channel].min()) / np.ptp(modalities[channel])
    np.testing.assert_allclose(prepared.image[..., channel], expected, atol=1e-5)


def test_constant_volume_becomes_zeros_not_nan():
  modalities = [np.full((6, 6, 6), 7.0)] * 3 + [np.zeros((6, 6, 6))]
  prepared = preprocess.preprocess_case(
      _loaded(modalities), preprocess.PreprocessOptions(image_size=4))
  assert np.isfinite(prepared.image).all()
  assert not prepared.image.any()


def test_scaling_after_resize_equals_scaling_before():
  rng = np.random.default_rng(1)
  volume = rng.uniform(0, 500, (30, 26, 20)).astype(np.float32)
  prepared = preprocess.preprocess_case(
      _loaded([volume] * 4), preprocess.PreprocessOptions(image_size=(16, 16, 16)))
  scaled_first = preprocess.resize_linear((volume - volume.min()) / np.ptp(volume), (16, 16, 16))
  np.testing.assert_allclose(prepared.image[..., 0], scaled_first, atol=1e-5)


@pytest.mark.parametrize('in_shape,out_shape', [((240, 240, 155), (128, 128, 128)),
                                                ((10, 12, 14), (20, 6, 14)),
                                                ((7, 9, 11), (7, 9, 11))])
def test_resize_shapes(in_shape, out_shape):
  volume = np.random.default_rng(0).random(in_shape, dtype=np.float32)
  assert preprocess.resize_linear(volume, out_shape).shape == out_shape
  assert preprocess.resize_nearest(volume, out_shape).shape == out_shape


def test_resize_linear_matches_scipy_half_voxel_interpolation():
  volume = np.random.default_rng(0).random((20, 18, 14), dtype=np.float32)
  out_shape = (9, 27, 14)
  coordinates = np.meshgrid(*[(np.arange(o) + 0.5) * i / o - 0.5
                              for i, o in zip(volume.shape, out_shape)], indexing='ij')
  expected = scipy.ndimage.map_coordinates(volume, coordinates, order=1, mode='nearest')
  np.testing.assert_allclose(preprocess.resize_linear(volume, out_shape), expected, atol=1e-5)


def test_resize_linear_handles_fortran_order_like_nifti():
  volume = np.asfortranarray(np.random.default_rng(0).random((20, 18, 14), dtype=np.float32))
  np.testing.assert_allclose(preprocess.resize_linear(volume, (10, 9, 7)),
                             preprocess.resize_linear(np.ascontiguousarray(volume), (10, 9, 7)),
                             atol=1e-6)


def test_resize_nearest_keeps_label_values():
  classes = np.random.default_rng(0).integers(0, 4, (31, 29, 23)).astype(np.uint8)
  resized = preprocess.resize_nearest(classes, (16, 16, 16))
  assert resized.dtype == np.uint8
  assert set(np.unique(resized)) <= {0, 1, 2, 3}


def test_inverse_mapping_round_trip_restores_geometry_and_labels():
  shape = (240, 240, 155)
  classes = np.zeros(shape, np.uint8)
  classes[100:160, 80:150, 40:100] = labels.EDEMA
  classes[115:145, 95:135, 55:85] = labels.ENHANCING_TUMOR
  classes[125:135, 105:125, 65:75] = labels.NECROTIC_CORE
  small = preprocess.resize_nearest(classes, (128, 128, 128))
  restored = preprocess.prediction_to_labels(small, shape, (0, 0, 0), shape,
                                             labels.get_scheme('brats2020'))
  assert restored.shape == shape
  assert restored.dtype == np.uint8
  assert set(np.unique(restored)) == {0, 1, 2, 4}
  original_labels = labels.classes_to_labels(classes, labels.get_scheme('brats2020'))
  # Box edges move by at most one original voxel through the 128^3 grid.
  agreement = (restored == original_labels).mean()
  assert agreement > 0.995
  boundary = scipy.ndimage.morphological_gradient(classes, size=3) > 0
  assert (restored == original_labels)[~scipy.ndimage.binary_dilation(boundary)].all()


def test_crop_to_brain_and_inverse():
  shape = (40, 36, 30)
  modalities = [np.zeros(shape) for _ in range(4)]
  for m in modalities:
    m[5:30, 8:28, 4:26] = 100.0 + np.random.default_rng(0).random((25, 20, 22))
  classes = np.zeros(shape, np.uint8)
  classes[10:20, 10:20, 10:20] = 2
  prepared = preprocess.preprocess_case(
      _loaded(modalities, classes), preprocess.PreprocessOptions(image_size=(25, 20, 22),
                                                                 crop_to_brain=True))
  assert prepared.crop_start == (5, 8, 4)
  assert prepared.crop_stop == (30, 28, 26)
  # At the crop box's own size the crop is exact, and the inverse puts it back in place.
  restored = preprocess.classes_to_original(prepared.classes, shape, prepared.crop_start,
                                            prepared.crop_stop)
  np.testing.assert_array_equal(restored, classes)


def test_zscore_inside_brain():
  shape = (20, 20, 20)
  rng = np.random.default_rng(0)
  modalities = []
  for _ in range(4):
    volume = np.zeros(shape)
    volume[4:16, 4:16, 4:16] = rng.normal(500, 50, (12, 12, 12))
    modalities.append(volume)
  prepared = preprocess.preprocess_case(
      _loaded(modalities), preprocess.PreprocessOptions(image_size=shape,
                                                        normalization='zscore'))
  brain = prepared.image[4:16, 4:16, 4:16, 0]
  assert brain.mean() == pytest.approx(0.0, abs=1e-4)
  assert brain.std() == pytest.approx(1.0, abs=1e-3)
  assert not prepared.image[:4].any()


def test_options_are_checked():
  with pytest.raises(ValueError, match='normalization'):
    preprocess.PreprocessOptions(normalization='histogram')
  with pytest.raises(ValueError, match='image_size'):
    preprocess.PreprocessOptions(image_size=0)
