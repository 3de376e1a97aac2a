"""Data pipelines: BraTS discovery, validation, preprocessing, synthetic cohort, TFDS, tf.data."""
