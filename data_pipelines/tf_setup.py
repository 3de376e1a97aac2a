"""TensorFlow for data loading only: never sees or grabs accelerators, quiet logs."""

import os


def tensorflow():
  """Imports TensorFlow with GPUs/TPUs hidden from it (JAX owns the accelerators)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # already initialised (devices were hidden by an earlier call) or no such device type
  return tf
