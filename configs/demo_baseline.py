"""The demo's Res-UNet baseline: configs/demo.py without ASPP (the ablation twin)."""

from configs import demo


def get_config():
  """Returns the demo baseline configuration."""
  config = demo.get_config()
  config.model.use_aspp = False
  return config
