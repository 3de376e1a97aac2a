"""TensorFlow for data loading only: never sees or grabs accelerators, quiet logs."""

import os


def quiet_environment():
  """Silences TensorFlow's start-up lines; must run before anything imports TensorFlow (clu,
  TFDS, spawned workers inherit it). oneDNN only changes TF's own matmul/conv rounding, which
  the data pipeline does not use; turning it off is what removes its start-up message."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')


quiet_environment()


def tensorflow():
  """Imports TensorFlow with GPUs/TPUs hidden from it (JAX owns the accelerators)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # already initialised (devices were hidden by an earlier call) or no such device type
  return tf
