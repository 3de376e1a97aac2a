"""Evaluate a trained workdir (SPEC 5 outputs); with --compare_workdir, the paired test."""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aspp_resunet import eval_lib
from aspp_resunet import labels
from aspp_resunet import metrics
from aspp_resunet import report
from aspp_resunet import stats
from aspp_resunet import train_lib
from data_pipelines import brats
from data_pipelines import tfds_brats

config_flags.DEFINE_config_file('config', None, 'Configuration the workdir was trained with.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
flags.DEFINE_enum('split', 'test', ['test', 'validation', 'train'], 'Split to evaluate.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'Which checkpoint.')
flags.DEFINE_string('compare_workdir', None, 'Second workdir (the baseline) for the paired test.')
flags.DEFINE_string('output_dir', None, 'Output folder (default: WORKDIR/eval/SPLIT).')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def method_name(config):
  return 'Res-UNet+ASPP' if config.model.use_aspp else 'Res-UNet'


def _comparison_config(main_config, compare_workdir):
  """The other run's own config, evaluated with the main run's evaluation protocol."""
  config = eval_lib.load_workdir_config(compare_workdir)
  config.eval = main_config.eval
  return config


def evaluate(config, workdir, split, which, output_dir, compare_workdir=None, progress=True):
  """Writes SPEC 5's outputs into `output_dir` and returns the summary dict."""
  os.makedirs(output_dir, exist_ok=True)
  result = eval_lib.evaluate_split(config, workdir, split, which, progress)
  per_case = result['original']
  eval_lib.write_per_case_csv(os.path.join(output_dir, 'per_case.csv'), per_case)
  eval_lib.write_per_case_csv(os.path.join(output_dir, 'per_case_model_resolution.csv'),
                              result['model'])
  summary = {'split': split, 'checkpoint': which, 'checkpoint_step': result['record']['step'],
             'checkpoint_epoch': result['record']['epoch'], 'n_cases': len(per_case),
             'hd95_mode': config.eval.hd95, 'seconds_per_case': result['seconds_per_case'],
             'original': eval_lib.summarise(per_case),
             'model_resolution': eval_lib.summarise(result['model']),
             'cases_without_enhancing_tumor': result['no_enhancing_tumor']}
  eval_lib.write_json(os.path.join(output_dir, 'summary.json'), summary)

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
    other = eval_lib.evaluate_split(other_config, compare_workdir, split, which, progress)
    comparison = stats.paired_comparison(per_case, other['original'], metrics.METRIC_COLUMNS,
                                         seed=config.eval.bootstrap_seed)
    eval_lib.write_json(os.path.join(output_dir, 'comparison.json'), {
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
          first_rows = eval_lib.evaluate_split(config, workdir, table_split, which,
                                               progress)['original']
          second_rows = eval_lib.evaluate_split(other_config, compare_workdir, table_split,
                                                which, progress)['original']
        except eval_lib.EvaluationError:
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, 'eval', FLAGS.split)
  try:
    summary = evaluate(FLAGS.config, FLAGS.workdir, FLAGS.split, FLAGS.checkpoint, output_dir,
                       FLAGS.compare_workdir)
  except (eval_lib.EvaluationError, stats.CaseMismatchError, brats.DataDirError,
          brats.CaseError, tfds_brats.SplitManifestError, train_lib.TrainingError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  means = ', '.join(f'Dice {r.upper()} {summary["original"][f"dice_{r}"]["mean"]:.4f}'
                    for r in labels.REGION_NAMES)
  print(f'{summary["n_cases"]} {FLAGS.split} cases: {means}; report {output_dir}/report.md')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
