"""Evaluation of a trained workdir on a split: predictions, original-geometry metrics, outputs."""

import csv
import json
import os
import tempfile
import time

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from aspp_resunet import checkpointing
from aspp_resunet import inference
from aspp_resunet import labels
from aspp_resunet import metrics
from aspp_resunet import models
from aspp_resunet import report
from aspp_resunet import stats
from aspp_resunet import train_lib
from aspp_resunet import xla_options
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
  # The optimizer-state layout (e.g. a schedule's step counter) is the one the workdir was
  # trained with (its config.json), whatever `config` says; the network must match `config`
  # (a different architecture is refused below, not silently replaced).
  if os.path.exists(os.path.join(workdir, train_lib.CONFIG_FILE)):
    config = ml_collections.ConfigDict(
        {**config.to_dict(), 'train': load_workdir_config(workdir).train.to_dict()})
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
      overlap=config.eval.overlap, mirror=config.eval.mirror,
      compiler_options=xla_options.options(config.model.dtype))


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
  qualitative, no_enhancing_tumor, local_cases = [], [], []
  started = time.time()
  total = builder.info.splits[split].num_examples
  bar = tqdm.tqdm(total=total, desc=f'evaluating {split}', disable=not progress, leave=False)
  batch_size = max(1, config.train.eval_batch_size)
  # Several processes: each predicts its shard of the cases on its own devices, then all
  # exchange their per-case rows (`_gather_cases`).
  for batch in input_pipeline.eval_batches(builder, split, batch_size * jax.process_count(),
                                           jax.process_index(), jax.process_count()):
    predicted, _ = jax.device_get(predict(variables, batch['image']))
    for row in np.flatnonzero(batch['mask'] > 0):
      case_id = batch['case_id'][row].decode()
      local_cases.append(case_id)
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
  if jax.process_count() > 1:
    case_ids = list(builder.builder_config.splits[split])
    results = {space: _gather_cases(rows, case_ids, metrics.METRIC_COLUMNS)
               for space, rows in results.items()}
    local_flags = {c: {'no_et': float(c in no_enhancing_tumor)} for c in local_cases}
    no_enhancing_tumor = [c for c, row in _gather_cases(local_flags, case_ids, ('no_et',)).items()
                          if row['no_et']]
  return {**results, 'record': record, 'qualitative': qualitative,
          'no_enhancing_tumor': sorted(no_enhancing_tumor),
          'seconds_per_case': (time.time() - started) / total}


def _gather_cases(rows, case_ids, columns):
  """Every process's {case_id: {column: value}} rows, merged, on every process."""
  table = np.full((len(case_ids), 1 + len(columns)), np.nan)
  table[:, 0] = 0.0  # column 0 marks the rows this process filled
  for index, case_id in enumerate(case_ids):
    if case_id in rows:
      table[index] = [1.0] + [rows[case_id][c] for c in columns]
  # Sent as the raw bits of the float64 values: JAX (without x64) would round them to float32.
  bits = np.asarray(multihost_utils.process_allgather(table.view(np.uint32)))
  gathered = bits.view(np.float64)  # (processes, cases, 1 + m)
  owner = np.argmax(gathered[:, :, 0], axis=0)
  if not np.all(gathered[:, :, 0].sum(axis=0) == 1):
    raise EvaluationError('cases were not evaluated exactly once across processes')
  return {case_id: dict(zip(columns, (float(v) for v in gathered[owner[i], i, 1:])))
          for i, case_id in enumerate(case_ids)}


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


def method_name(config):
  return 'Res-UNet+ASPP' if config.model.use_aspp else 'Res-UNet'


def _comparison_config(main_config, compare_workdir):
  """The other run's own config, evaluated with the main run's evaluation protocol."""
  config = load_workdir_config(compare_workdir)
  config.eval = main_config.eval
  return config


def evaluate(config, workdir, split, which, output_dir, compare_workdir=None, progress=True):
  """Writes SPEC 5's outputs into `output_dir` and returns the summary dict.

  With several processes every process takes part (the cases are shared out) and only
  process 0 writes `output_dir`.
  """
  if not train_lib.is_main_process():
    with tempfile.TemporaryDirectory() as scratch:
      return _evaluate(config, workdir, split, which, scratch, compare_workdir, progress=False)
  return _evaluate(config, workdir, split, which, output_dir, compare_workdir, progress)


def _evaluate(config, workdir, split, which, output_dir, compare_workdir, progress):
  result = evaluate_split(config, workdir, split, which, progress)
  os.makedirs(output_dir, exist_ok=True)  # only once the data and checkpoint have been read
  per_case = result['original']
  write_per_case_csv(os.path.join(output_dir, 'per_case.csv'), per_case)
  write_per_case_csv(os.path.join(output_dir, 'per_case_model_resolution.csv'),
                              result['model'])
  summary = {'split': split, 'checkpoint': which, 'checkpoint_step': result['record']['step'],
             'checkpoint_epoch': result['record']['epoch'], 'n_cases': len(per_case),
             'hd95_mode': config.eval.hd95, 'seconds_per_case': result['seconds_per_case'],
             'original': summarise(per_case),
             'model_resolution': summarise(result['model']),
             'cases_without_enhancing_tumor': result['no_enhancing_tumor']}
  write_json(os.path.join(output_dir, 'summary.json'), summary)

  name = method_name(config)
  report.boxplots(per_case, os.path.join(output_dir, 'boxplots.png'), f'{name}, {split} split')
  figures = ['boxplots.png']
  if report.training_curves(workdir, os.path.join(output_dir, 'training_curves.png'),
                            f'{name}: training'):
    figures.append('training_curves.png')
  if report.qualitative_panel(result['qualitative'], os.path.join(output_dir, 'qualitative.png'),
                              f'{name}: {split} cases'):
    figures.append('qualitative.png')

  sections = [(None, f'# Evaluation of {name} ({workdir}), {split} split\n\n'
               f'{len(per_case)} cases, {which} checkpoint (epoch {summary["checkpoint_epoch"]}, '
               f'step {summary["checkpoint_step"]}); metrics in the original scan geometry '
               f'(model-resolution metrics in `per_case_model_resolution.csv`); HD95 '
               f'{config.eval.hd95} in mm.')]
  sections.append((f'Dice ({split})', report.dice_table([(name, per_case)])))
  original = summary['original']
  sections.append(('Dice per region', report.metric_table(original, 'dice')))
  sections.append(('HD95 per region', report.metric_table(original, 'hd95', ' (mm)')))
  sections.append(('Sensitivity and specificity',
                   report.metric_table(original, 'sensitivity') + '\n\n' +
                   report.metric_table(original, 'specificity')))
  no_et = result['no_enhancing_tumor']
  sections.append(('Cases without enhancing tumour in the ground truth',
                   ', '.join(no_et) + ' (ET Dice is 1 for an empty prediction, 0 otherwise)'
                   if no_et else 'none'))

  if compare_workdir:
    other_config = _comparison_config(config, compare_workdir)
    other_name = method_name(other_config)
    if other_name == name:
      other_name += ' (compared)'
    other = evaluate_split(other_config, compare_workdir, split, which, progress)
    comparison = stats.paired_comparison(per_case, other['original'], metrics.METRIC_COLUMNS,
                                         seed=config.eval.bootstrap_seed)
    write_json(os.path.join(output_dir, 'comparison.json'), {
        'first': {'name': name, 'workdir': workdir},
        'second': {'name': other_name, 'workdir': compare_workdir},
        'split': split, 'difference': 'first - second', 'metrics': comparison})
    summary['comparison'] = comparison
    tables = []
    for table_split in ('validation', 'test'):
      if table_split == split:
        first_rows, second_rows = per_case, other['original']
      else:
        try:
          first_rows = evaluate_split(config, workdir, table_split, which,
                                               progress)['original']
          second_rows = evaluate_split(other_config, compare_workdir, table_split,
                                                which, progress)['original']
        except EvaluationError:
          continue
      p_values = None
      if table_split == split:
        p_values = {c: comparison[c]['wilcoxon']['p_value'] for c in metrics.METRIC_COLUMNS}
      number = 1 if table_split == 'validation' else 2
      tables.append((f'Table {number}. Dice per region, {table_split} set '
                     f'({len(first_rows)} cases)',
                     report.dice_table([(other_name, second_rows), (name, first_rows)],
                                       p_values)))
    sections[2:2] = tables
    sections.append((f'Paired comparison on the {split} set ({name} - {other_name})',
                     report.comparison_table(comparison, name, other_name) +
                     '\n\nWilcoxon signed-rank test, two-sided, per patient (zero differences '
                     'dropped); 95% CI: percentile bootstrap of the mean difference, '
                     f'{stats.BOOTSTRAP_RESAMPLES} resamples, seed {config.eval.bootstrap_seed}.'))
  sections.append(('Figures', '\n\n'.join(f'![{f}]({f})' for f in figures)))
  report.write_markdown(os.path.join(output_dir, 'report.md'), sections)
  return summary
