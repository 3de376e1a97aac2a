"""The ASPP-ResUNet and its baseline in PyTorch, for speed comparisons only (`bench` extra).

Same layers, shapes and parameter count as aspp_resunet.models.ResUNet3D for a config's `model`
section (checked by `parameter_count_matches`); channels-last 3D memory format, as oneDNN prefers.
"""

import torch
from torch import nn
import torch.nn.functional as F

from aspp_resunet import labels
from aspp_resunet import layers as jax_layers


def _norm(features, momentum):
  # Keras/flax momentum m keeps m of the old average; PyTorch's momentum is the new share.
  return nn.BatchNorm3d(features, eps=jax_layers.BATCH_NORM_EPSILON, momentum=1.0 - momentum)


class ResidualBlock(nn.Module):
  """ReLU(BN(conv3(ReLU(BN(conv3(x))))) + shortcut(x)), as layers.ResidualBlock."""

  def __init__(self, in_features, features, momentum):
    super().__init__()
    self.conv1 = nn.Conv3d(in_features, features, 3, padding=1, bias=False)
    self.norm1 = _norm(features, momentum)
    self.conv2 = nn.Conv3d(features, features, 3, padding=1, bias=False)
    self.norm2 = _norm(features, momentum)
    self.shortcut = None
    if in_features != features:
      self.shortcut = nn.Sequential(nn.Conv3d(in_features, features, 1, bias=False),
                                    _norm(features, momentum))

  def forward(self, x):
    y = F.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ASPP3D(nn.Module):
  """Image pooling (conv, no norm), 1x1x1 and three dilated branches, concat, 1x1x1 project."""

  def __init__(self, in_features, features, rates, momentum):
    super().__init__()

    def branch(kernel, rate):
      return nn.Sequential(
          nn.Conv3d(in_features, features, kernel, padding=rate * (kernel // 2), dilation=rate,
                    bias=False), _norm(features, momentum), nn.ReLU())

    # 3x3x3 as in the paper; on the 1-voxel pooled map only its centre tap reads data.
    self.pool_conv = nn.Conv3d(in_features, features, 3, padding=1, bias=False)
    self.conv1x1 = branch(1, 1)
    self.atrous = nn.ModuleList([branch(3, rate) for rate in rates])
    self.project = nn.Sequential(nn.Conv3d(5 * features, features, 1, bias=False),
                                 _norm(features, momentum), nn.ReLU())

  def forward(self, x):
    pooled = F.relu(self.pool_conv(x.mean(dim=(2, 3, 4), keepdim=True)))
    branches = [pooled.expand(-1, -1, *x.shape[2:]), self.conv1x1(x)]
    branches += [atrous(x) for atrous in self.atrous]
    return self.project(torch.cat(branches, dim=1))


class ResUNet3D(nn.Module):
  """Encoder, bridge, optional ASPP, nearest-upsampling decoder with skips, 1x1x1 head."""

  def __init__(self, model_config, in_channels=labels.NUM_CHANNELS):
    super().__init__()
    if model_config.upsampling != 'nearest' or model_config.norm != 'batch':
      raise ValueError('the reference implements nearest upsampling and BatchNorm only')
    momentum = model_config.bn_momentum
    widths = [model_config.base_width * 2**level for level in range(model_config.depth)]
    self.encoder = nn.ModuleList()
    channels = in_channels
    for width in widths:
      self.encoder.append(ResidualBlock(channels, width, momentum))
      channels = width
    self.bridge = ResidualBlock(channels, model_config.bridge_width, momentum)
    channels = model_config.bridge_width
    self.aspp = None
    if model_config.use_aspp:
      self.aspp = ASPP3D(channels, model_config.aspp_features, tuple(model_config.aspp_rates),
                         momentum)
      channels = model_config.aspp_features
    self.decoder = nn.ModuleList()
    for width in reversed(widths):
      self.decoder.append(ResidualBlock(channels + width, width, momentum))
      channels = width
    self.head = nn.Conv3d(channels, model_config.num_classes, 1)

  def forward(self, x):
    skips = []
    for block in self.encoder:
      x = block(x)
      skips.append(x)
      x = F.max_pool3d(x, 2)
    x = self.bridge(x)
    if self.aspp is not None:
      x = self.aspp(x)
    for block, skip in zip(self.decoder, reversed(skips)):
      x = F.interpolate(x, scale_factor=2, mode='nearest')
      x = block(torch.cat([x, skip], dim=1))
    return self.head(x)


def create(model_config):
  """The reference network in channels-last 3D memory format."""
  return ResUNet3D(model_config).to(memory_format=torch.channels_last_3d)


def parameter_count(module):
  """Trainable parameters (BatchNorm running statistics excluded, as in flax 'params')."""
  return sum(p.numel() for p in module.parameters())


def soft_dice_loss(logits, labels_, num_classes):
  """1 - mean over classes of the soft Dice summed over batch and voxels (losses.soft_dice)."""
  probs = torch.softmax(logits.float(), dim=1)
  one_hot = F.one_hot(labels_, num_classes).permute(0, 4, 1, 2, 3).float()
  dims = (0, 2, 3, 4)
  intersection = (probs * one_hot).sum(dims)
  total = (probs + one_hot).sum(dims)
  return 1.0 - ((2.0 * intersection + 1.0) / (total + 1.0)).mean()


def loss_fn(name, logits, labels_, num_classes):
  """'ce', 'dice' or 'ce_dice', as losses.compute_loss on an unpadded batch."""
  ce = F.cross_entropy(logits.float(), labels_)
  if name == 'ce':
    return ce
  dice = soft_dice_loss(logits, labels_, num_classes)
  return dice if name == 'dice' else ce + dice
