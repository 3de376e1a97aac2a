"""tf.data pipelines over the prepared dataset: seeded shuffling, augmentation, host sharding."""

import math

import numpy as np

from data_pipelines import tf_setup

tf = tf_setup.tensorflow()
import tensorflow_datasets as tfds  # noqa: E402

# Keys that travel to the accelerator; the others (case ids, geometry) stay on the host.
DEVICE_KEYS = ('image', 'label', 'mask')


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 2
  return options


def _augment(example, seed, data_config):
  """Random flips (image and label together) and per-channel intensity scale/shift."""
  # In float32 whatever the storage dtype (float16 by default): the jitter is float32.
  image, label = tf.cast(example['image'], tf.float32), example['label']
  seeds = tf.random.experimental.stateless_split(seed, num=3)
  flips = tf.random.stateless_uniform((3,), seeds[0]) < 0.5
  for axis in data_config.flip_axes:
    image = tf.cond(flips[axis], lambda a=axis, x=image: tf.reverse(x, [a]), lambda x=image: x)
    label = tf.cond(flips[axis], lambda a=axis, y=label: tf.reverse(y, [a]), lambda y=label: y)
  channels = image.shape[-1]
  scale = 1.0 + tf.random.stateless_uniform(
      (channels,), seeds[1], -data_config.intensity_scale, data_config.intensity_scale)
  shift = tf.random.stateless_uniform(
      (channels,), seeds[2], -data_config.intensity_shift, data_config.intensity_shift)
  return {**example, 'image': image * scale + shift, 'label': label}


def _to_model_types(example):
  return {**example, 'image': tf.cast(example['image'], tf.float32),
          'label': tf.cast(example['label'], tf.int32),
          'mask': tf.constant(1.0, tf.float32)}


def steps_per_epoch(builder, global_batch_size):
  """Training steps per epoch (the last incomplete batch is dropped)."""
  return builder.info.splits['train'].num_examples // global_batch_size


def train_batches(builder, data_config, global_batch_size, seed, epoch, skip_batches=0,
                  process_index=0, process_count=1):
  """This process's share of every global training batch of one epoch, as numpy dicts.

  The order of an epoch depends only on (seed, epoch), so a resumed run sees the same batches;
  `skip_batches` drops the batches an interrupted epoch already trained on. Example k of the
  shuffled epoch goes to process k % process_count, so the union over processes of their local
  batch j is global batch j, whatever the number of processes.
  """
  if global_batch_size % process_count:
    raise ValueError(f'batch size {global_batch_size} is not divisible by the {process_count} '
                     f'processes')
  local_batch = global_batch_size // process_count
  num_examples = builder.info.splits['train'].num_examples
  dataset = builder.as_dataset('train', shuffle_files=False).with_options(_options())
  epoch_seed = [seed, epoch]
  dataset = dataset.shuffle(num_examples, seed=int(np.random.default_rng(epoch_seed).integers(
      2**31)), reshuffle_each_iteration=False)
  dataset = dataset.enumerate()
  dataset = dataset.shard(process_count, process_index)
  if data_config.augment:
    dataset = dataset.map(
        lambda index, example: _augment(example, tf.stack(
            [tf.constant(seed, tf.int64) * 1_000_003 + epoch, index]), data_config),
        num_parallel_calls=tf.data.AUTOTUNE)
  else:
    dataset = dataset.map(lambda index, example: example)
  dataset = dataset.map(_to_model_types, num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.batch(local_batch, drop_remainder=True)
  dataset = dataset.skip(skip_batches)
  dataset = dataset.prefetch(data_config.prefetch)
  return tfds.as_numpy(dataset)


def eval_batches(builder, split, global_batch_size, process_index=0, process_count=1):
  """All examples of `split` in fixed order, padded so that every process yields the same
  number of full batches; padding examples have mask 0.
  """
  local_batch = global_batch_size // process_count
  num_examples = builder.info.splits[split].num_examples
  num_batches = math.ceil(num_examples / global_batch_size)
  dataset = builder.as_dataset(split, shuffle_files=False).with_options(_options())
  dataset = dataset.shard(process_count, process_index).map(_to_model_types)
  dataset = dataset.batch(local_batch).prefetch(2)
  produced = 0
  for batch in tfds.as_numpy(dataset):
    yield _pad(batch, local_batch)
    produced += 1
  template = None
  while produced < num_batches:
    if template is None:
      template = next(iter(tfds.as_numpy(
          builder.as_dataset(split).map(_to_model_types).batch(1).take(1))))
    yield _pad({key: value[:0] for key, value in template.items()}, local_batch)
    produced += 1


def _pad(batch, size):
  missing = size - len(batch['mask'])
  if missing <= 0:
    return batch
  return {key: np.concatenate([value, np.zeros((missing, *value.shape[1:]), value.dtype)])
          for key, value in batch.items()}
