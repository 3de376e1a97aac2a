"""3D ASPP-ResUNet for multimodal brain tumour segmentation (JAX/Flax)."""

# Before clu or TFDS import TensorFlow: its start-up log lines off (tf_setup.quiet_environment).
from data_pipelines import tf_setup as _tf_setup  # noqa: F401
