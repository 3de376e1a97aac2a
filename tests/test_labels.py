"""Tests for aspp_resunet.labels."""

import numpy as np
import pytest

from aspp_resunet import labels


@pytest.mark.parametrize('scheme_name,enhancing', [('brats2020', 4), ('brats2023', 3)])
def test_label_class_round_trip(scheme_name, enhancing):
  scheme = labels.get_scheme(scheme_name)
  file_labels = np.array([0, 1, 2, enhancing], np.int16)
  classes = labels.labels_to_classes(file_labels, scheme)
  np.testing.assert_array_equal(classes, [0, 1, 2, 3])
  assert classes.dtype == np.uint8
  np.testing.assert_array_equal(labels.classes_to_labels(classes, scheme), file_labels)


@pytest.mark.parametrize('values', [[0, 3], [5], [-1], [0.5], [np.nan]])
def test_labels_outside_the_scheme_are_refused(values):
  with pytest.raises(ValueError, match='labels outside'):
    labels.labels_to_classes(np.array(values), labels.get_scheme('brats2020'))


def test_float_labels_with_integer_values_are_accepted():
  scheme = labels.get_scheme('brats2020')
  np.testing.assert_array_equal(
      labels.labels_to_classes(np.array([0.0, 4.0, 2.0]), scheme), [0, 3, 2])


def test_regions_follow_brats_convention():
  classes = np.array([0, 1, 2, 3])
  np.testing.assert_array_equal(labels.region_mask(classes, 'wt'), [0, 1, 1, 1])
  np.testing.assert_array_equal(labels.region_mask(classes, 'tc'), [0, 1, 0, 1])
  np.testing.assert_array_equal(labels.region_mask(classes, 'et'), [0, 0, 0, 1])


def test_modality_order_is_the_papers():
  assert labels.MODALITIES == ('t1', 't1ce', 't2', 'flair')


def test_unknown_scheme():
  with pytest.raises(ValueError, match='unknown naming scheme'):
    labels.get_scheme('brats2019')
