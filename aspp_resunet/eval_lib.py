"""Evaluation of a trained workdir on a split: predictions, original-geometry metrics, outputs."""

import csv
import json
import os
import time

import jax
import ml_collections
import numpy as np
import tqdm

from aspp_resunet import checkpointing
from aspp_resunet import inference
from aspp_resunet import labels
from aspp_resunet import metrics
from aspp_resunet import models
from aspp_resunet import stats
from aspp_resunet import train_lib
from data_pipelines import brats
from data_pipelines import input_pipeline
from data_pipelines import preprocess

SPACES = ('original', 'model')
# How many cases keep their images and predictions for the qualitative figure.
QUALITATIVE_CASES = 3


class EvaluationError(RuntimeError):
  """Evaluation cannot run (no checkpoint, no config); the message is one line."""


def load_workdir_config(workdir):
  """The config a workdir was trained with (saved by train_lib as config.json)."""
  path = os.path.join(workdir, train_lib.CONFIG_FILE)
  if not os.path.exists(path):
    raise EvaluationError(f'{workdir}: no {train_lib.CONFIG_FILE}; is it a training workdir?')
  with open(path) as stream:
    return ml_collections.ConfigDict(json.load(stream))


def restore_model(config, workdir, which='best'):
  """(model, variables, record) of the `which` checkpoint ('best' or 'latest') of a workdir."""
  series = {'best': checkpointing.BEST, 'latest': checkpointing.LATEST}
  if which not in series:
    raise EvaluationError(f"checkpoint must be 'best' or 'latest', got {which!r}")
  model = models.create_model(config.model)
  template = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'))
  checkpoints = checkpointing.Checkpoints(workdir)
  try:
    restored = checkpoints.restore(series[which], template)
  finally:
    checkpoints.close()
  if restored is None:
    raise EvaluationError(f'{workdir}: no {which} checkpoint; train first')
  state, record = restored
  return model, {'params': state.params, 'batch_stats': state.batch_stats}, record


def predictor(model, config):
  """The jitted predict fn for a config's eval section."""
  return inference.make_predict_fn(
      model.apply, mode=config.eval.mode, window=tuple(config.eval.window or
                                                      config.data.image_size),
      overlap=config.eval.overlap, mirror=config.eval.mirror)


def evaluate_split(config, workdir, split='test', which='best', progress=True):
  """Predicts every case of `split` and computes the metrics in both spaces.

  Returns:
    {'original': {case_id: metrics}, 'model': {case_id: metrics}, 'record': checkpoint record,
     'qualitative': [dict(case_id, image, truth, prediction)], 'no_enhancing_tumor': [ids],
     'seconds_per_case': float}
  """
  builder = train_lib.prepare_dataset(config.data)
  if split not in builder.info.splits or builder.info.splits[split].num_examples == 0:
    raise EvaluationError(f'split {split!r} has no cases')
  model, variables, record = restore_model(config, workdir, which)
  predict = predictor(model, config)
  source_dir = train_lib.resolve_source_dir(config.data)
  scheme = labels.get_scheme(config.data.scheme)
  cases = {c.case_id: c for c in brats.discover_cases(source_dir, scheme)}
  hd95_mode = config.eval.hd95
  results = {space: {} for space in SPACES}
  qualitative, no_enhancing_tumor = [], []
  started = time.time()
  total = builder.info.splits[split].num_examples
  bar = tqdm.tqdm(total=total, desc=f'evaluating {split}', disable=not progress, leave=False)
  batch_size = max(1, config.train.eval_batch_size)
  for batch in input_pipeline.eval_batches(builder, split, batch_size):
    predicted, _ = jax.device_get(predict(variables, batch['image']))
    for row in np.flatnonzero(batch['mask'] > 0):
      case_id = batch['case_id'][row].decode()
      crop_start, crop_stop = tuple(batch['crop_start'][row]), tuple(batch['crop_stop'][row])
      original_shape = tuple(batch['original_shape'][row])
      spacing = metrics.voxel_spacing(batch['affine'][row])
      model_spacing = tuple(sp * (b - a) / s for sp, a, b, s in
                            zip(spacing, crop_start, crop_stop, predicted.shape[1:4]))
      results['model'][case_id] = metrics.case_metrics(
          predicted[row], batch['label'][row], model_spacing, hd95_mode)
      loaded = brats.load_case(cases[case_id], scheme, require_seg=True)
      restored = preprocess.classes_to_original(predicted[row], original_shape, crop_start,
                                                crop_stop)
      results['original'][case_id] = metrics.case_metrics(restored, loaded.classes,
                                                          loaded.zooms, hd95_mode)
      if not (loaded.classes == labels.ENHANCING_TUMOR).any():
        no_enhancing_tumor.append(case_id)
      if len(qualitative) < QUALITATIVE_CASES:
        qualitative.append({'case_id': case_id, 'image': np.stack(loaded.modalities, -1),
                            'truth': loaded.classes, 'prediction': restored})
      bar.update(1)
  bar.close()
  return {**results, 'record': record, 'qualitative': qualitative,
          'no_enhancing_tumor': sorted(no_enhancing_tumor),
          'seconds_per_case': (time.time() - started) / total}


def write_per_case_csv(path, per_case):
  """One row per case: case_id and the SPEC 5 metric columns (atomic write)."""
  temp = path + '.tmp'
  with open(temp, 'w', newline='') as stream:
    writer = csv.writer(stream)
    writer.writerow(['case_id', *metrics.METRIC_COLUMNS])
    for case_id in sorted(per_case):
      writer.writerow([case_id] + [f'{per_case[case_id][c]:.6f}' for c in metrics.METRIC_COLUMNS])
  os.replace(temp, path)


def summarise(per_case):
  """{column: summary statistics over cases}."""
  return {column: stats.summary([row[column] for row in per_case.values()])
          for column in metrics.METRIC_COLUMNS}


def write_json(path, payload):
  temp = path + '.tmp'
  with open(temp, 'w') as stream:
    json.dump(payload, stream, indent=1)
    stream.write('\n')
  os.replace(temp, path)
