"""Test helpers: small BraTS-layout NIfTI cases written on the fly, small training steps."""

import os
import sys

import jax.numpy as jnp
import nibabel as nib
import numpy as np

from aspp_resunet import labels as labels_lib
from configs import test as test_config
from data_pipelines import synthetic

SMALL_SHAPE = (24, 20, 16)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_command(workdir, config, *overrides):
  """argv of train.py on configs/test.py with `config`'s data folders, plus `overrides`."""
  return [sys.executable, 'train.py', '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.synthetic_dir={config.data.synthetic_dir}',
          f'--config.data.prepared_dir={config.data.prepared_dir}', *overrides]


def cpu_env(devices):
  """The environment with `devices` forced CPU devices (for subprocesses)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def case_volumes(shape=SMALL_SHAPE, seed=0, scheme_name='brats2020'):
  """Four int16 modality volumes and a segmentation (scheme labels) with a small tumour."""
  rng = np.random.default_rng(seed)
  modalities = [rng.integers(1, 1000, size=shape).astype(np.int16) for _ in range(4)]
  classes = np.zeros(shape, np.uint8)
  centre = [s // 2 for s in shape]
  classes[centre[0] - 4:centre[0] + 4, centre[1] - 4:centre[1] + 4, centre[2] - 3:centre[2] + 3] = 2
  classes[centre[0] - 2:centre[0] + 2, centre[1] - 2:centre[1] + 2, centre[2] - 2:centre[2] + 2] = 3
  classes[centre[0] - 1:centre[0] + 1, centre[1] - 1:centre[1] + 1, centre[2] - 1:centre[2] + 1] = 1
  segmentation = labels_lib.classes_to_labels(classes, labels_lib.get_scheme(scheme_name))
  return modalities, segmentation


def write_case(root, case_id, scheme_name='brats2020', shape=SMALL_SHAPE, seed=0,
               extension='.nii.gz', with_seg=True, overrides=None, seg_dtype=np.uint8):
  """Writes one case folder; `overrides` maps a key to a volume (or None to omit the file).

  Returns:
    The case folder path.
  """
  scheme = labels_lib.get_scheme(scheme_name)
  modalities, segmentation = case_volumes(shape, seed, scheme_name)
  volumes = dict(zip(labels_lib.MODALITIES, modalities))
  if with_seg:
    volumes[labels_lib.SEGMENTATION] = segmentation.astype(seg_dtype)
  for key, volume in (overrides or {}).items():
    if volume is None:
      volumes.pop(key, None)
    else:
      volumes[key] = volume
  folder = os.path.join(root, case_id)
  os.makedirs(folder, exist_ok=True)
  affine = synthetic.brats_affine(shape)
  for key, volume in volumes.items():
    name = f'{case_id}{scheme.separator}{scheme.suffixes[key]}{extension}'
    nib.save(nib.Nifti1Image(np.asarray(volume), affine), os.path.join(folder, name))
  return folder


def file_of(folder, key, scheme_name='brats2020'):
  scheme = labels_lib.get_scheme(scheme_name)
  suffix = f'{scheme.separator}{scheme.suffixes[key]}.'
  for name in os.listdir(folder):
    if suffix in name:
      return os.path.join(folder, name)
  raise FileNotFoundError(key)


def step_config(**model_overrides):
  """The test config at 16^3 with cross-entropy ('loss', 'image_size' and model fields
  overridable): for training-step tests."""
  config = test_config.get_config()
  config.train.loss = model_overrides.pop('loss', 'ce')
  config.data.image_size = model_overrides.pop('image_size', (16, 16, 16))
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def random_batch(config, batch_size, seed=0):
  """A random training batch (image, label, mask) of `config`'s image size."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, *config.data.image_size)
  return {'image': jnp.asarray(rng.normal(size=(*shape, labels_lib.NUM_CHANNELS)), jnp.float32),
          'label': jnp.asarray(rng.integers(0, labels_lib.NUM_CLASSES, size=shape), jnp.int32),
          'mask': jnp.ones((batch_size,), jnp.float32)}
