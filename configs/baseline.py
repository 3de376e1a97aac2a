"""The ablation baseline: the paper's Res-UNet, identical to configs/default.py without ASPP."""

from configs import default


def get_config():
  """Returns the Res-UNet baseline configuration."""
  config = default.get_config()
  config.model.use_aspp = False
  return config
