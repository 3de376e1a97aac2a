"""Tests for the split manifest, the TFDS builder and the tf.data pipeline."""

import json
import os

import numpy as np
import pytest

from aspp_resunet import train_lib
from data_pipelines import brats
from data_pipelines import input_pipeline
from data_pipelines import tfds_brats
from tests import helpers


@pytest.fixture
def builder(tiny_config):
  return train_lib.prepare_dataset(tiny_config.data)


def test_split_is_deterministic_disjoint_and_complete():
  case_ids = [f'case{i:03d}' for i in range(40)]
  split = tfds_brats.make_split(case_ids, (0.75, 0.15, 0.10), seed=3)
  assert split == tfds_brats.make_split(list(reversed(case_ids)), (0.75, 0.15, 0.10), seed=3)
  assert [len(split[s]) for s in tfds_brats.SPLITS] == [30, 6, 4]
  together = split['train'] + split['validation'] + split['test']
  assert sorted(together) == case_ids
  assert split != tfds_brats.make_split(case_ids, (0.75, 0.15, 0.10), seed=4)


def test_paper_split_sizes_for_brats2020():
  split = tfds_brats.make_split([f'c{i}' for i in range(369)], (0.75, 0.15, 0.10), seed=0)
  # The paper reports 258 / 52 / 34 of 344 patients; on 369 cases the same fractions give:
  assert [len(split[s]) for s in tfds_brats.SPLITS] == [277, 55, 37]


def test_too_few_cases_and_bad_fractions():
  with pytest.raises(ValueError, match='too few'):
    tfds_brats.make_split(['a', 'b', 'c'], (0.0, 0.5, 0.5), 0)
  with pytest.raises(ValueError, match='summing to 1'):
    tfds_brats.make_split(['a', 'b', 'c'], (0.5, 0.5, 0.5), 0)


def test_manifest_is_reused_and_never_silently_regenerated(tmp_path):
  path = str(tmp_path / 'splits.json')
  ids = [f'c{i}' for i in range(10)]
  first = tfds_brats.load_or_create_manifest(path, ids, (0.75, 0.15, 0.10), seed=0)
  assert json.load(open(path))['splits'] == first
  # Same cases, another seed: the saved split wins.
  assert tfds_brats.load_or_create_manifest(path, ids, (0.75, 0.15, 0.10), seed=9) == first
  with pytest.raises(tfds_brats.SplitManifestError, match=r"new: \['c99'\]"):
    tfds_brats.load_or_create_manifest(path, ids + ['c99'], (0.75, 0.15, 0.10), seed=0)


def test_builder_output_shapes_dtypes_and_split_sizes(builder, tiny_config):
  splits = builder.info.splits
  assert (splits['train'].num_examples, splits['validation'].num_examples,
          splits['test'].num_examples) == (6, 1, 1)
  example = next(iter(input_pipeline.tfds.as_numpy(builder.as_dataset('train').take(1))))
  assert example['image'].shape == (16, 16, 16, 4)
  assert example['image'].dtype == np.float32
  assert example['label'].shape == (16, 16, 16)
  assert example['label'].dtype == np.uint8
  assert tuple(example['original_shape']) == tuple(tiny_config.data.synthetic_shape)
  assert example['affine'].shape == (4, 4)
  assert example['case_id'].decode().startswith('SynthBraTS_')
  manifest_dirs = [d for d in os.listdir(tiny_config.data.prepared_dir) if d != 'tfds']
  assert len(manifest_dirs) == 1


def test_prepared_once(builder, tiny_config):
  before = os.path.getmtime(builder.data_dir)
  again = train_lib.prepare_dataset(tiny_config.data)
  assert again.data_dir == builder.data_dir
  assert os.path.getmtime(builder.data_dir) == before


def _case_order(builder, config, seed, epoch, **kwargs):
  return [c.decode() for batch in input_pipeline.train_batches(
      builder, config.data, 1, seed, epoch, **kwargs) for c in batch['case_id']]


def test_train_order_depends_only_on_seed_and_epoch(builder, tiny_config):
  first = _case_order(builder, tiny_config, seed=0, epoch=0)
  assert first == _case_order(builder, tiny_config, seed=0, epoch=0)
  assert sorted(first) == sorted(_case_order(builder, tiny_config, seed=0, epoch=1))
  assert first != _case_order(builder, tiny_config, seed=0, epoch=1)
  assert _case_order(builder, tiny_config, seed=0, epoch=0, skip_batches=2) == first[2:]


def test_process_shards_make_up_the_global_batch(builder, tiny_config):
  whole = list(input_pipeline.train_batches(builder, tiny_config.data, 2, 0, 0))
  parts = [list(input_pipeline.train_batches(builder, tiny_config.data, 2, 0, 0,
                                             process_index=i, process_count=2)) for i in (0, 1)]
  assert len(whole) == len(parts[0]) == len(parts[1]) == 3
  for j, batch in enumerate(whole):
    local = sorted([parts[0][j]['case_id'][0], parts[1][j]['case_id'][0]])
    assert local == sorted(batch['case_id'].tolist())


def test_augmentation_keeps_image_and_label_aligned(builder, tiny_config):
  tiny_config.data.augment = True
  tiny_config.data.intensity_scale = 0.0
  tiny_config.data.intensity_shift = 0.0
  plain = {b['case_id'][0]: b
           for b in input_pipeline.train_batches(builder, _plain(tiny_config), 1, 0, 0)}
  flipped_any = False
  for batch in input_pipeline.train_batches(builder, tiny_config.data, 1, 0, 0):
    reference = plain[batch['case_id'][0]]
    matched = False
    for flips in np.ndindex(2, 2, 2):
      axes = [a + 1 for a, f in enumerate(flips) if f]
      image = np.flip(reference['image'], axes) if axes else reference['image']
      label = np.flip(reference['label'], axes) if axes else reference['label']
      if np.array_equal(image, batch['image']):
        np.testing.assert_array_equal(label, batch['label'])
        matched, flipped_any = True, flipped_any or bool(axes)
        break
    assert matched
  assert flipped_any
  # Augmentation is seeded: the same epoch gives the same flips.
  again = list(input_pipeline.train_batches(builder, tiny_config.data, 1, 0, 0))
  np.testing.assert_array_equal(again[0]['image'], next(iter(
      input_pipeline.train_batches(builder, tiny_config.data, 1, 0, 0)))['image'])


def test_augmentation_of_float16_storage(tiny_config):
  tiny_config.data.image_dtype = 'float16'  # the default storage of every real config
  tiny_config.data.augment = True
  tiny_config.data.intensity_scale = 0.1
  tiny_config.data.intensity_shift = 0.1
  builder = train_lib.prepare_dataset(tiny_config.data)
  plain = {b['case_id'][0]: b['image']
           for b in input_pipeline.train_batches(builder, _plain(tiny_config), 1, 0, 0)}
  for batch in input_pipeline.train_batches(builder, tiny_config.data, 1, 0, 0):
    assert batch['image'].dtype == np.float32
    reference = plain[batch['case_id'][0]]
    # Scale in [0.9, 1.1] and shift in [-0.1, 0.1] per channel keep min-max data within:
    assert batch['image'].min() >= reference.min() * 1.1 - 0.1 - 1e-6
    assert batch['image'].max() <= reference.max() * 1.1 + 0.1 + 1e-6
    assert not np.array_equal(np.sort(batch['image'].ravel()), np.sort(reference.ravel()))


def _plain(config):
  data = config.data.copy_and_resolve_references()
  data.augment = False
  return data


def test_eval_batches_pad_to_equal_counts(builder):
  batches = list(input_pipeline.eval_batches(builder, 'train', 4))
  assert len(batches) == 2
  assert batches[1]['mask'].tolist() == [1.0, 1.0, 0.0, 0.0]
  per_process = [list(input_pipeline.eval_batches(builder, 'validation', 2, i, 2))
                 for i in (0, 1)]
  assert [len(p) for p in per_process] == [1, 1]
  assert per_process[0][0]['mask'].tolist() == [1.0]
  assert per_process[1][0]['mask'].tolist() == [0.0]


def _folder_with_one_bad_case(root):
  for index in range(6):
    helpers.write_case(root, f'case{index}', seed=index)
  bad = helpers.write_case(root, 'case_bad', seed=9)
  with open(helpers.file_of(bad, 't2'), 'wb') as stream:
    stream.write(b'not a nifti at all')
  return root


def _small_data_config(tiny_config, tmp_path):
  data = tiny_config.data
  data.data_dir = _folder_with_one_bad_case(str(tmp_path / 'cases'))
  data.prepared_dir = str(tmp_path / 'prepared')
  data.image_size = (8, 8, 8)
  return data


def test_invalid_case_stops_preparation_before_anything_is_written(tiny_config, tmp_path,
                                                                  capsys):
  data = _small_data_config(tiny_config, tmp_path)
  with pytest.raises(brats.DataDirError) as info:
    train_lib.prepare_dataset(data)
  message = str(info.value)
  assert message.startswith(f'1 invalid case(s) in {data.data_dir}, listed above (first: case '
                            'case_bad: ')
  assert capsys.readouterr().out.splitlines()[-1].startswith('case case_bad: case_bad_t2.nii.gz')
  assert 'data.skip_invalid=True' in message and '\n' not in message
  assert not os.path.exists(data.prepared_dir)


def test_skip_invalid_leaves_bad_cases_out_and_lists_them(tiny_config, tmp_path, capsys):
  data = _small_data_config(tiny_config, tmp_path)
  data.skip_invalid = True
  builder = train_lib.prepare_dataset(data)
  printed = capsys.readouterr().out.splitlines()
  assert printed[-2] == '1 invalid case(s) left out (data.skip_invalid):'
  assert printed[-1].startswith('  case case_bad: case_bad_t2.nii.gz: ')
  splits = builder.builder_config.splits
  assert sorted(c for ids in splits.values() for c in ids) == [f'case{i}' for i in range(6)]
  assert sum(builder.info.splits[s].num_examples for s in splits) == 6
  with open(tfds_brats.manifest_path(data, data.data_dir)) as stream:
    assert list(json.load(stream)['excluded']) == ['case_bad']
  # A rerun reuses the manifest (same split, bad case still out) without preparing again.
  again = train_lib.prepare_dataset(data)
  assert again.builder_config.splits == splits and again.data_dir == builder.data_dir
