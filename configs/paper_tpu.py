"""The paper's run on a Cloud TPU slice (v4/v5e/v5p), one process per TPU host.

Same model, data, loss and optimizer as configs/default.py; bfloat16 compute (the MXU's native
input type; params, optimizer state and loss in float32), residual blocks rematerialised to fit
16 GiB of HBM per chip, and the global batch split over every chip of the slice.
"""

from configs import default


def get_config():
  """Returns the TPU configuration of the paper run."""
  config = default.get_config()
  # One volume per chip: a v5e-8 slice has 8 chips; on a v4-32 (16 chips) use 16.
  config.train.batch_size = 8
  config.train.eval_batch_size = 1  # rounded up to a multiple of the device count
  config.model.dtype = 'bfloat16'  # native MXU inputs
  config.model.remat = True  # 128^3 activations of the 64-wide levels exceed 16 GiB otherwise
  config.data.prefetch = 4  # batches prepared ahead on the host CPUs
  return config
