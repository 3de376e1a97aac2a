"""CPU-sized demo on the synthetic cohort: the paper's ASPP-ResUNet at reduced width and size."""

from configs import default


def get_config():
  """Returns the demo configuration (ASPP); configs/demo_baseline.py is its Res-UNet twin."""
  config = default.get_config()
  config.data.synthetic_cases = 40  # 30 train / 6 validation / 4 test
  config.data.image_size = (64, 64, 64)  # a quarter of the paper's 128 per axis... /8 voxels
  config.data.crop_to_brain = True  # spend the voxels on the brain, not the background
  config.model.base_width = 8  # 8, 16, 32, 64 filters; bridge 128
  config.model.bridge_width = 128  # base_width * 2^depth, as the paper's 64 -> 1024
  config.model.aspp_features = 32  # paper: 256 with width 64
  config.model.aspp_rates = (2, 3, 4)  # the paper's rates rescaled to the 2^3 bridge of 64^3
  config.train.num_epochs = 8  # a few minutes on 2 CPU cores
  config.train.learning_rate = 1e-3  # 1e-4 (paper) converges too slowly for a short run
  config.train.loss = 'ce_dice'  # better small-region Dice in few epochs than plain CE
  config.train.batch_size = 2  # global batch
  config.train.log_every_steps = 5  # train scalars every N steps
  return config
