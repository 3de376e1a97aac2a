"""3D Atrous Spatial Pyramid Pooling (paper section 4.1)."""

from typing import Any
import warnings

import flax.linen as nn
import jax.numpy as jnp

from aspp_resunet import layers

POOL_NORMS = ('none', 'batch')


class ASPP3D(nn.Module):
  """Five parallel branches (image pooling, 1x1x1, three dilated 3x3x3), concat, 1x1x1 project.

  Every branch has `features` filters and conv -> norm -> ReLU, except the image-pooling branch
  by default: at batch size 1 a BatchNorm over one pooled voxel per channel normalises a single
  value, so in training it outputs its shift (a constant) and at inference something else.
  `pool_norm='batch'` keeps the paper's form for fidelity experiments (and warns when the batch
  makes it degenerate); `pool_norm='none'` (default) has conv -> ReLU.
  """

  features: int = 256
  rates: tuple = (6, 12, 18)
  norm: str = 'batch'
  pool_norm: str = 'none'
  dtype: Any = jnp.float32
  bn_momentum: float = layers.BATCH_NORM_MOMENTUM
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train):
    if self.pool_norm not in POOL_NORMS:
      raise ValueError(f'aspp_pool_norm must be one of {POOL_NORMS}, got {self.pool_norm!r}')

    def conv_norm_relu(inputs, kernel_size, dilation, name):
      y = layers.Conv3D(self.features, kernel_size=kernel_size, dilation=dilation,
                        dtype=self.dtype, conv_impl=self.conv_impl, name=f'{name}_conv')(inputs)
      return nn.relu(layers.make_norm(self.norm, train, self.dtype, f'{name}_norm',
                                      momentum=self.bn_momentum)(y))

    spatial = x.shape[1:4]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3), keepdims=True).astype(self.dtype)
    # The paper's pooling conv is 3x3x3; on the 1-voxel pooled map only its centre tap acts.
    if self.pool_norm == 'batch':
      if train and x.shape[0] == 1 and self.norm == 'batch':
        warnings.warn('ASPP image-pooling BatchNorm with batch size 1 normalises one value per '
                      'channel: the branch outputs a constant in training (aspp_pool_norm='
                      "'batch' is kept only for fidelity experiments)", stacklevel=2)
      pooled = conv_norm_relu(pooled, 3, 1, 'pool')
    else:
      # No bias either (SPEC 2's parameter count): the branch is conv -> ReLU on the pooled map.
      pooled = layers.Conv3D(self.features, kernel_size=3, dtype=self.dtype,
                             conv_impl=self.conv_impl, name='pool_conv')(pooled)
      pooled = nn.relu(pooled)
    branches = [jnp.broadcast_to(pooled, pooled.shape[:1] + spatial + pooled.shape[-1:])]
    branches.append(conv_norm_relu(x, 1, 1, 'conv1x1'))
    for rate in self.rates:
      branches.append(conv_norm_relu(x, 3, rate, f'atrous{rate}'))
    return conv_norm_relu(jnp.concatenate(branches, axis=-1), 1, 1, 'project')
