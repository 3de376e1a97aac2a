"""TFDS builder writing preprocessed BraTS cases once; the patient-level split manifest."""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os

import numpy as np

from aspp_resunet import labels as labels_lib
from data_pipelines import brats
from data_pipelines import preprocess
from data_pipelines import tf_setup

tf = tf_setup.tensorflow()
import tensorflow_datasets as tfds  # noqa: E402

SPLITS = ('train', 'validation', 'test')
MANIFEST_NAME = 'splits.json'


class SplitManifestError(ValueError):
  """The saved split manifest does not match the data folder."""


def make_split(case_ids, fractions, seed):
  """Patient-level split, deterministic in (sorted case ids, seed).

  Rounding: validation and test get round(n * fraction) cases (at least one each when n >= 3 and
  the fraction is positive); train gets the rest.
  """
  case_ids = sorted(case_ids)
  if len(fractions) != 3 or abs(sum(fractions) - 1.0) > 1e-6 or min(fractions) < 0:
    raise ValueError(f'split fractions must be three non-negative numbers summing to 1, got '
                     f'{tuple(fractions)}')
  n = len(case_ids)
  sizes = [int(round(n * f)) for f in fractions[1:]]
  if n >= 3:
    sizes = [max(size, 1) if fraction > 0 else size for size, fraction in zip(sizes, fractions[1:])]
  if n - sum(sizes) < 1:
    raise ValueError(f'{n} cases are too few for a train/validation/test split')
  order = np.random.default_rng(seed).permutation(n)
  shuffled = [case_ids[i] for i in order]
  validation = sorted(shuffled[:sizes[0]])
  test = sorted(shuffled[sizes[0]:sizes[0] + sizes[1]])
  train = sorted(shuffled[sizes[0] + sizes[1]:])
  return {'train': train, 'validation': validation, 'test': test}


def load_or_create_manifest(path, case_ids, fractions, seed, excluded=None):
  """Reuses the split manifest at `path`, or writes a new one (atomically) if there is none.

  `excluded` ({case_id: reason}, new manifests only): invalid cases left out of every split
  (data.skip_invalid); they are recorded in the manifest so that a rerun makes the same split.

  Raises:
    SplitManifestError: the manifest exists but lists other cases than the folder holds.
  """
  excluded = dict(excluded or {})
  if os.path.exists(path):
    with open(path) as stream:
      manifest = json.load(stream)
    listed = sorted([c for split in SPLITS for c in manifest['splits'][split]] +
                    list(manifest.get('excluded', {})))
    if listed != sorted(case_ids):
      missing = sorted(set(listed) - set(case_ids))
      new = sorted(set(case_ids) - set(listed))
      raise SplitManifestError(
          f'split manifest {path} does not match the data folder (missing: {missing[:5]}, '
          f'new: {new[:5]}); it is never regenerated silently: move it away to make a new split '
          f'or restore the cases')
    return manifest['splits']
  splits = make_split([c for c in case_ids if c not in excluded], fractions, seed)
  manifest = {'seed': seed, 'fractions': list(fractions), 'splits': splits}
  if excluded:
    manifest['excluded'] = excluded
  os.makedirs(os.path.dirname(path), exist_ok=True)
  temp = f'{path}.tmp-{os.getpid()}'
  with open(temp, 'w') as stream:
    json.dump(manifest, stream, indent=1)
  os.replace(temp, path)
  return splits


class BratsConfig(tfds.core.BuilderConfig):
  """One preprocessing of one source folder."""

  def __init__(self, *, source_dir, scheme, options, image_dtype, splits, **kwargs):
    self.source_dir = source_dir
    self.scheme = scheme
    self.options = options
    self.image_dtype = image_dtype
    self.splits = splits
    super().__init__(**kwargs)


class BratsDataset(tfds.core.GeneratorBasedBuilder):
  """Preprocessed BraTS cases (SPEC 1): image, label, case id and original geometry."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass a BraTS-layout folder (config.data.data_dir).'

  def _info(self):
    size = self.builder_config.options.image_size
    return tfds.core.DatasetInfo(
        builder=self,
        description='Preprocessed multimodal brain MRI with tumour segmentations.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(*size, labels_lib.NUM_CHANNELS),
                                          dtype=np.dtype(self.builder_config.image_dtype)),
            'label': tfds.features.Tensor(shape=size, dtype=np.uint8),
            'case_id': tfds.features.Text(),
            'original_shape': tfds.features.Tensor(shape=(3,), dtype=np.int32),
            'affine': tfds.features.Tensor(shape=(4, 4), dtype=np.float64),
            'crop_start': tfds.features.Tensor(shape=(3,), dtype=np.int32),
            'crop_stop': tfds.features.Tensor(shape=(3,), dtype=np.int32),
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(case_ids)
            for split, case_ids in self.builder_config.splits.items() if case_ids}

  def _generate_examples(self, case_ids):
    config = self.builder_config
    scheme = labels_lib.get_scheme(config.scheme)
    by_id = {c.case_id: c for c in brats.discover_cases(config.source_dir, scheme)}
    cases = [by_id[case_id] for case_id in case_ids]
    pool = _worker_pool()
    for prepared in pool.map(preprocess.load_and_preprocess, cases, [scheme] * len(cases),
                             [config.options] * len(cases)):
      yield prepared.case_id, {
          'image': prepared.image.astype(config.image_dtype),
          'label': prepared.classes,
          'case_id': prepared.case_id,
          'original_shape': np.asarray(prepared.original_shape, np.int32),
          'affine': prepared.affine.astype(np.float64),
          'crop_start': np.asarray(prepared.crop_start, np.int32),
          'crop_stop': np.asarray(prepared.crop_stop, np.int32),
      }


def config_name(source_dir, scheme, options, image_dtype, splits):
  """A readable name plus a digest of everything that changes the prepared data."""
  size = 'x'.join(str(s) for s in options.image_size)
  key = json.dumps([os.path.abspath(source_dir), scheme, list(options.image_size),
                    options.normalization, options.crop_to_brain, image_dtype, splits],
                   sort_keys=True)
  digest = hashlib.sha256(key.encode()).hexdigest()[:10]
  crop = '_crop' if options.crop_to_brain else ''
  return f'{size}_{options.normalization}{crop}_{image_dtype}_{digest}'


def manifest_path(data_config, source_dir):
  """Where the split manifest of `source_dir` lives: beside its prepared data."""
  source_digest = hashlib.sha256(os.path.abspath(source_dir).encode()).hexdigest()[:10]
  return os.path.join(data_config.prepared_dir,
                      f'{os.path.basename(os.path.normpath(source_dir))}-{source_digest}',
                      MANIFEST_NAME)


def excluded_cases(data_config, source_dir):
  """{case_id: reason} of the cases the manifest leaves out ({} if none or no manifest)."""
  path = manifest_path(data_config, source_dir)
  if not os.path.exists(path):
    return {}
  with open(path) as stream:
    return json.load(stream).get('excluded', {})


def builder_for(data_config, source_dir, excluded=None):
  """The BratsDataset builder (not yet prepared) for `config.data` and a source folder.

  The split manifest is created (leaving out `excluded` cases) or reused first, beside the
  prepared data.
  """
  scheme = labels_lib.get_scheme(data_config.scheme)
  options = preprocess.PreprocessOptions(
      image_size=tuple(data_config.image_size), normalization=data_config.normalization,
      crop_to_brain=data_config.crop_to_brain)
  case_ids = [c.case_id for c in brats.discover_cases(source_dir, scheme)]
  splits = load_or_create_manifest(manifest_path(data_config, source_dir), case_ids,
                                   tuple(data_config.split_fractions), data_config.split_seed,
                                   excluded)
  config = BratsConfig(
      name=config_name(source_dir, data_config.scheme, options, data_config.image_dtype, splits),
      version=BratsDataset.VERSION, source_dir=source_dir, scheme=data_config.scheme,
      options=options, image_dtype=data_config.image_dtype, splits=splits)
  return BratsDataset(config=config, data_dir=os.path.join(data_config.prepared_dir, 'tfds'))


def validate_cases(data_config, source_dir, case_ids=None):
  """Validates every case (or those of `case_ids`) before preparation; returns the list of
  CaseErrors (empty if fine)."""
  scheme = labels_lib.get_scheme(data_config.scheme)
  errors = []
  for case in brats.discover_cases(source_dir, scheme):
    if case_ids is not None and case.case_id not in case_ids:
      continue
    try:
      brats.load_case(case, scheme, require_seg=True)
    except brats.CaseError as err:
      errors.append(err)
  return errors


_POOL = []


def _worker_pool():
  """The preparation's process pool, shared by its three splits (a worker takes seconds to
  start: it imports the main module). Loading and resizing are numpy/gzip work spread over
  the cores, in order; workers are spawned, not forked from this multi-threaded process."""
  if not _POOL:
    context = multiprocessing.get_context('spawn')
    _POOL.append(concurrent.futures.ProcessPoolExecutor(min(os.cpu_count() or 1, 4),
                                                        mp_context=context))
  return _POOL[0]


def prepare(data_config, source_dir):
  """Builds (once) and returns the prepared dataset builder.

  TFDS writes into a temporary folder and renames it when complete, so an interrupted
  preparation is never read and a rerun starts it again.
  """
  builder = builder_for(data_config, source_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=source_dir))
  finally:
    while _POOL:
      _POOL.pop().shutdown(cancel_futures=True)
  return builder
