"""3D Res-UNet with optional ASPP bridge (paper section 4.2); parameter table command line."""

import functools
import sys
from typing import Any
from typing import NamedTuple

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


class Segment(NamedTuple):
  """One step of the forward pass: what it runs, the parameters it uses and what it reads."""

  block: str  # the top-level submodule it runs: 'encoder_0', 'bridge', 'upsample_3', ...
  part: str  # 'first' or 'second' half of a residual block, or 'whole'
  paths: tuple  # parameter / batch-statistics paths it uses, e.g. ('encoder_0', 'conv1')
  inputs: tuple  # the values it reads: 0 the image, i + 1 the output of segment i


class ResUNet3D(nn.Module):
  """Encoder of residual blocks (base_width * 2^i) with 2x max pooling, a bridge block, an
  optional ASPP on the bridge, a mirrored decoder with skip connections, and a 1x1x1 head.

  `use_aspp=False` is the paper's Res-UNet baseline (the ablation). The forward pass is a chain
  of segments (`segments`, `run_segment`; each residual block in two halves): `__call__` runs
  them in one program, the staged training step (staged_step.py) each as its own program.
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

  def setup(self):
    if self.upsampling not in UPSAMPLINGS:
      raise ValueError(f'upsampling must be one of {UPSAMPLINGS}, got {self.upsampling!r}')
    block = layers.ResidualBlock
    if self.remat:
      # Recompute block activations in the backward pass; `train` and `part` are static.
      block = nn.remat(layers.ResidualBlock, static_argnums=(2, 5))
    block = functools.partial(block, norm=self.norm, dtype=self.dtype,
                              bn_momentum=self.bn_momentum, conv_impl=self.conv_impl)
    # Submodules are named by attribute: 'encoder_0', ..., 'bridge', 'aspp', 'decoder_0', ...
    for level in range(self.depth):
      features = self.base_width * 2**level
      setattr(self, f'encoder_{level}', block(features))
      setattr(self, f'decoder_{level}', block(features))
      if self.upsampling == 'transpose':
        setattr(self, f'upsample_{level}', nn.ConvTranspose(
            features, (2, 2, 2), strides=(2, 2, 2), dtype=self.dtype, param_dtype=jnp.float32))
    self.bridge = block(self.bridge_width)
    if self.use_aspp:
      self.aspp = aspp_lib.ASPP3D(
          features=self.aspp_features, rates=tuple(self.aspp_rates), norm=self.norm,
          pool_norm=self.aspp_pool_norm, dtype=self.dtype, bn_momentum=self.bn_momentum,
          conv_impl=self.conv_impl)
    self.head = layers.Conv3D(self.num_classes, kernel_size=1, use_bias=True, dtype=self.dtype)

  def segments(self):
    """The forward pass as [Segment], each residual block in two halves. Usable unbound."""
    plan = []

    def add(block, part, inputs, extra_paths=()):
      if part == 'whole':
        paths = ((block,),)
      else:
        paths = tuple((block, name) for name in layers.RESIDUAL_BLOCK_PARTS[part])
      plan.append(Segment(block, part, paths + extra_paths, tuple(inputs)))
      return len(plan)  # the value index of its output

    def add_block(block, inputs, extra_paths=()):
      hidden = add(block, 'first', inputs)
      return add(block, 'second', inputs + [hidden], extra_paths)

    value, encoder_outputs = 0, []
    for level in range(self.depth):
      value = add_block(f'encoder_{level}', [value])
      encoder_outputs.append(value)
    value = add('bridge', 'whole', [value], (('aspp',),) if self.use_aspp else ())
    for level in reversed(range(self.depth)):
      if self.upsampling == 'transpose':
        value = add(f'upsample_{level}', 'whole', [value])
      value = add_block(f'decoder_{level}', [value, encoder_outputs[level]],
                        (('head',),) if level == 0 else ())
    return plan

  def run_segment(self, segment, *inputs, train):
    """One `Segment` of `segments()` on the values it reads (`Segment.inputs`)."""
    kind, _, level = segment.block.partition('_')
    module = getattr(self, segment.block)
    if kind == 'bridge':
      # Every argument passed: nn.remat needs the static ones by position.
      x = module(layers.max_pool_2x(inputs[0]), train, None, None, 'whole')
      return self.aspp(x, train) if self.use_aspp else x
    if kind == 'upsample':
      return module(inputs[0])
    hidden = inputs[-1] if segment.part == 'second' else None
    if kind == 'encoder':
      x = layers.max_pool_2x(inputs[0]) if int(level) else inputs[0]
      return module(x, train, None, hidden, segment.part)
    x, skip = inputs[0], inputs[1].astype(self.dtype)
    if self.upsampling == 'nearest':
      # The block upsamples inside its convolutions (exactly equal, far cheaper on the
      # largest maps: see layers.Conv3D).
      x = module(x, train, skip, hidden, segment.part)
    else:
      x = module(jnp.concatenate([x.astype(self.dtype), skip], axis=-1), train, None, hidden,
                 segment.part)
    if segment.part == 'first' or int(level):
      return x
    return self.head(x).astype(jnp.float32)  # softmax and loss in float32 whatever the dtype

  def __call__(self, x, train):
    factor = 2**(self.depth + 1)  # depth poolings in the encoder, one more before the bridge
    if x.ndim != 5 or any(s % factor for s in x.shape[1:4]):
      raise ValueError(f'input must be (batch, X, Y, Z, channels) with X, Y, Z divisible by '
                       f'{factor} (depth {self.depth}), got {x.shape}')
    values = [x]
    for segment in self.segments():
      values.append(self.run_segment(segment, *(values[i] for i in segment.inputs), train=train))
    return values[-1]


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
