"""A tiny configuration for tests: seconds per epoch on one CPU core."""

from configs import default


def get_config():
  """Returns the test configuration (data paths are set by each test)."""
  config = default.get_config()
  config.data.synthetic_cases = 8  # 6 train / 1 validation / 1 test
  config.data.synthetic_shape = (48, 48, 32)  # small volumes, fast to generate
  config.data.image_size = (16, 16, 16)  # depth 2 needs multiples of 8
  config.data.image_dtype = 'float32'  # exact values for resume comparisons
  config.model.base_width = 4  # 4, 8 filters
  config.model.depth = 2  # two encoder levels
  config.model.bridge_width = 16  # at 4^3
  config.model.aspp_features = 8  # per branch
  config.model.aspp_rates = (1, 2, 3)  # dilations that still read real voxels at 4^3
  config.train.num_epochs = 2  # two epochs of 6 steps
  config.train.learning_rate = 1e-3  # fast enough for the loss to fall in 12 steps
  config.train.schedule = 'cosine'  # the demo's schedule (its step count is in the checkpoint)
  config.train.warmup_steps = 2  # warm-up steps
  config.train.batch_size = 1  # global batch
  config.train.log_every_steps = 2  # train scalars every N steps
  return config
