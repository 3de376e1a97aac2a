"""The paper's run on NVIDIA GPUs: one host with 1-8 GPUs (or several hosts, see the README).

Same model, data, loss and optimizer as configs/default.py; what changes is how a step is
computed: the global batch is split over the GPUs of all hosts, bfloat16 compute (params,
optimizer state and loss in float32) and XLA's native 3D convolution (conv_impl 'auto' -> 'lax').
"""

from configs import default


def get_config():
  """Returns the GPU configuration of the paper run."""
  config = default.get_config()
  # The paper trains with batch 1 on one GPU. Here: one volume per GPU, so set the global batch
  # to the device count (8 on an 8-GPU host): --config.train.batch_size=8. Adam at 1e-4 is kept.
  config.train.batch_size = 1
  config.train.eval_batch_size = 1  # rounded up to a multiple of the device count
  config.model.dtype = 'bfloat16'  # Ampere and newer: tensor cores; halves activation memory
  config.model.remat = False  # 128^3 x batch 1 fits 40 GB in bfloat16; True for 24 GB cards
  config.data.prefetch = 4  # batches prepared ahead (tf.data runs on the host CPUs)
  return config
