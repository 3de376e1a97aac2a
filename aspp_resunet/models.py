"""3D Res-UNet with optional ASPP bridge (paper section 4.2); parameter table command line."""

import functools
import sys
from typing import Any

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from aspp_resunet import aspp as aspp_lib
from aspp_resunet import labels
from aspp_resunet import layers

UPSAMPLINGS = ('nearest', 'transpose')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _upsample_nearest(x):
  for axis in (1, 2, 3):
    x = jnp.repeat(x, 2, axis=axis)
  return x


class ResUNet3D(nn.Module):
  """Encoder of residual blocks (base_width * 2^i) with 2x max pooling, a bridge block, an
  optional ASPP on the bridge, a mirrored decoder with skip connections, and a 1x1x1 head.

  `use_aspp=False` is the paper's Res-UNet baseline (the ablation).
  """

  num_classes: int = labels.NUM_CLASSES
  base_width: int = 64
  depth: int = 4
  bridge_width: int = 1024
  use_aspp: bool = True
  aspp_features: int = 256
  aspp_rates: tuple = (6, 12, 18)
  aspp_pool_norm: str = 'none'
  upsampling: str = 'nearest'
  norm: str = 'batch'
  bn_momentum: float = layers.BATCH_NORM_MOMENTUM
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train):
    if self.upsampling not in UPSAMPLINGS:
      raise ValueError(f'upsampling must be one of {UPSAMPLINGS}, got {self.upsampling!r}')
    factor = 2**(self.depth + 1)  # depth poolings in the encoder, one more before the bridge
    if x.ndim != 5 or any(s % factor for s in x.shape[1:4]):
      raise ValueError(f'input must be (batch, X, Y, Z, channels) with X, Y, Z divisible by '
                       f'{factor} (depth {self.depth}), got {x.shape}')
    block = layers.ResidualBlock
    if self.remat:
      # Recompute block activations in the backward pass; `train` (arg 2) is static.
      block = nn.remat(layers.ResidualBlock, static_argnums=(2,))
    block = functools.partial(block, norm=self.norm, dtype=self.dtype,
                              bn_momentum=self.bn_momentum, conv_impl=self.conv_impl)
    pool = functools.partial(nn.max_pool, window_shape=(2, 2, 2), strides=(2, 2, 2))

    skips = []
    for level in range(self.depth):
      x = block(self.base_width * 2**level, name=f'encoder_{level}')(x, train)
      skips.append(x)
      x = pool(x)
    x = block(self.bridge_width, name='bridge')(x, train)
    if self.use_aspp:
      x = aspp_lib.ASPP3D(features=self.aspp_features, rates=tuple(self.aspp_rates),
                          norm=self.norm, pool_norm=self.aspp_pool_norm, dtype=self.dtype,
                          bn_momentum=self.bn_momentum, conv_impl=self.conv_impl,
                          name='aspp')(x, train)
    for level in reversed(range(self.depth)):
      features = self.base_width * 2**level
      if self.upsampling == 'nearest':
        x = _upsample_nearest(x)
      else:
        x = nn.ConvTranspose(features, (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype,
                             param_dtype=jnp.float32, name=f'upsample_{level}')(x)
      x = jnp.concatenate([x, skips[level].astype(x.dtype)], axis=-1)
      x = block(features, name=f'decoder_{level}')(x, train)
    logits = layers.Conv3D(self.num_classes, kernel_size=1, use_bias=True, dtype=self.dtype,
                           name='head')(x)
    return logits.astype(jnp.float32)  # softmax and loss in float32 whatever the compute dtype


def create_model(model_config):
  """Builds a ResUNet3D from the `config.model` section."""
  layers.resolve_conv_impl(model_config.get('conv_impl', 'auto'))  # fail early on a typo
  if model_config.dtype not in DTYPES:
    raise ValueError(f'model.dtype must be one of {tuple(DTYPES)}, got {model_config.dtype!r}')
  return ResUNet3D(
      num_classes=model_config.num_classes, base_width=model_config.base_width,
      depth=model_config.depth, bridge_width=model_config.bridge_width,
      use_aspp=model_config.use_aspp, aspp_features=model_config.aspp_features,
      aspp_rates=tuple(model_config.aspp_rates), aspp_pool_norm=model_config.aspp_pool_norm,
      upsampling=model_config.upsampling, norm=model_config.norm,
      bn_momentum=model_config.bn_momentum, dtype=DTYPES[model_config.dtype],
      remat=model_config.remat, conv_impl=model_config.get('conv_impl', 'auto'))


def abstract_variables(model, image_size, in_channels=labels.NUM_CHANNELS):
  """Variable shapes of `model` for a (1, *image_size, C) input, without allocating them."""
  shape = (1, *image_size, in_channels)
  return jax.eval_shape(
      functools.partial(model.init, train=False), jax.random.key(0),
      jax.ShapeDtypeStruct(shape, jnp.float32))


def count_parameters(params):
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def _definition_order(name):
  kind, _, level = name.partition('_')
  order = {'encoder': 0, 'bridge': 1, 'aspp': 2, 'upsample': 3, 'decoder': 3, 'head': 4}
  # Decoder levels run from the deepest (largest index) up.
  return (order.get(kind, 5), -int(level) if kind in ('decoder', 'upsample') and level else
          int(level or 0), kind)


def parameter_table(params):
  """[(top-level module, parameter count)] in definition order, then ('total', n)."""
  rows = [(name, count_parameters(params[name])) for name in sorted(params, key=_definition_order)]
  rows.append(('total', count_parameters(params)))
  return rows


def main(argv):
  del argv
  config = flags.FLAGS.config
  for title, use_aspp in (('ASPP-ResUNet (paper)', True), ('Res-UNet baseline', False)):
    model_config = config.model.copy_and_resolve_references()
    model_config.use_aspp = use_aspp
    variables = abstract_variables(create_model(model_config), config.data.image_size)
    print(f'{title}: input {config.data.image_size} x {len(labels.MODALITIES)}')
    for name, count in parameter_table(variables['params']):
      print(f'  {name:14s} {count:>14,d}')
  return 0


if __name__ == '__main__':
  from ml_collections import config_flags

  config_flags.DEFINE_config_file('config', 'configs/default.py', 'Model configuration file.')
  app.run(lambda argv: sys.exit(main(argv)))
