"""3D ASPP-ResUNet for multimodal brain tumour segmentation (JAX/Flax)."""
