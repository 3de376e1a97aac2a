"""The main job: synthetic cohort -> TFDS -> train baseline and ASPP -> evaluate -> report."""

from aspp_resunet import host_memory

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # first: a restart repeats what ran before it

import os
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging

from aspp_resunet import checkpointing
from aspp_resunet import eval_lib
from aspp_resunet import labels
from aspp_resunet import train_lib
from configs import demo as demo_config
from configs import demo_baseline as demo_baseline_config
from data_pipelines import input_pipeline
from data_pipelines import synthetic

flags.DEFINE_string('run_dir', 'runs/demo', 'Where both runs, their evaluation and the report go.')
flags.DEFINE_integer('num_epochs', None, 'Override the demo configs\' epoch count.')
flags.DEFINE_integer('num_cases', None, 'Override the synthetic cohort size.')
flags.DEFINE_string('data_root', None, 'Override data/ (synthetic cohort and prepared data).')
FLAGS = flags.FLAGS

STAGES = ('synthetic cohort', 'dataset preparation', 'training: Res-UNet baseline',
          'training: ASPP-ResUNet', 'evaluation and paired comparison')


def _stage(number, detail=''):
  print(f'\n== {number}/{len(STAGES)} {STAGES[number - 1]}{detail}', flush=True)


def demo_configs(num_epochs=None, num_cases=None, data_root=None):
  """(ASPP config, baseline config): identical but for use_aspp, same seed."""
  configs = []
  for module in (demo_config, demo_baseline_config):
    config = module.get_config()
    if num_epochs is not None:
      config.train.num_epochs = num_epochs
    if num_cases is not None:
      config.data.synthetic_cases = num_cases
    if data_root is not None:
      config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
      config.data.prepared_dir = os.path.join(data_root, 'prepared')
    configs.append(config)
  return tuple(configs)


def _finished(workdir, config, builder):
  """Whether a workdir's latest checkpoint is at the configured final step."""
  directory = os.path.join(workdir, checkpointing.LATEST)
  if not os.path.isdir(directory):
    return False
  steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  per_epoch = input_pipeline.steps_per_epoch(builder, config.train.batch_size)
  return bool(steps) and max(steps) >= per_epoch * config.train.num_epochs


def run(run_dir, aspp_config, baseline_config):
  """Runs every stage, skipping those already complete; returns the evaluation summary."""
  started = time.time()
  timings = {}
  data = aspp_config.data
  _stage(1, f' ({data.synthetic_cases} cases in {data.synthetic_dir})')

  def progress(done, total):
    print(f'\rgenerating: {done}/{total} cases', end='\n' if done == total else '', flush=True)

  stage_started = time.time()
  if not synthetic.ensure_cohort(data.synthetic_dir, data.synthetic_cases, data.synthetic_seed,
                                 tuple(data.synthetic_shape), progress):
    print('already there, kept')
  timings['cohort'] = time.time() - stage_started

  _stage(2, f' ({"x".join(map(str, data.image_size))}, {data.normalization}'
            f'{", crop to brain" if data.crop_to_brain else ""})')
  stage_started = time.time()
  builder = train_lib.prepare_dataset(data)
  sizes = {s: builder.info.splits[s].num_examples for s in ('train', 'validation', 'test')}
  print(f'prepared: {sizes["train"]} train / {sizes["validation"]} validation / '
        f'{sizes["test"]} test cases')
  timings['preparation'] = time.time() - stage_started

  workdirs = {'baseline': os.path.join(run_dir, 'baseline'), 'aspp': os.path.join(run_dir, 'aspp')}
  for number, (name, config) in ((3, ('baseline', baseline_config)), (4, ('aspp', aspp_config))):
    _stage(number, f' ({config.train.num_epochs} epochs, {workdirs[name]})')
    stage_started = time.time()
    if _finished(workdirs[name], config, builder):
      print('already trained, kept')
    else:
      summary = train_lib.train_and_evaluate(config, workdirs[name])
      print(f'best mean validation Dice {summary["best_dice_mean"]:.4f}')
    timings[f'train_{name}'] = time.time() - stage_started

  _stage(5)
  stage_started = time.time()
  output_dir = os.path.join(run_dir, 'eval')
  summary = eval_lib.evaluate(aspp_config, workdirs['aspp'], 'test', aspp_config.eval.checkpoint,
                              output_dir, compare_workdir=workdirs['baseline'])
  timings['evaluation'] = time.time() - stage_started
  # The report sits beside the runs, its figures next to it.
  for name in os.listdir(output_dir):
    if name.endswith('.png'):
      shutil.copyfile(os.path.join(output_dir, name), os.path.join(run_dir, name))
  shutil.copyfile(os.path.join(output_dir, 'report.md'), os.path.join(run_dir, 'report.md'))
  timings['total'] = time.time() - started
  summary['timings_seconds'] = timings
  return summary


def print_summary(summary, run_dir):
  comparison = summary.get('comparison', {})
  print('\nTest set, original geometry (mean over cases):')
  print(f'{"metric":14s} {"Res-UNet+ASPP":>14s} {"Res-UNet":>10s} {"Wilcoxon p":>11s}')
  for metric in ('dice', 'hd95'):
    for region in labels.REGION_NAMES:
      column = f'{metric}_{region}'
      entry = comparison.get(column)
      if entry is None:
        continue
      print(f'{column:14s} {entry["first"]["mean"]:14.4f} {entry["second"]["mean"]:10.4f} '
            f'{entry["wilcoxon"]["p_value"]:11.4f}')
  timings = ', '.join(f'{k} {v:.0f} s' for k, v in summary['timings_seconds'].items())
  print(f'\ntimings: {timings}')
  print(f'report: {os.path.join(run_dir, "report.md")}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.ERROR)
  host_memory.limit_malloc_arenas()
  aspp_config, baseline_config = demo_configs(FLAGS.num_epochs, FLAGS.num_cases,
                                              FLAGS.data_root)
  try:
    summary = run(FLAGS.run_dir, aspp_config, baseline_config)
  except (train_lib.TrainingError, eval_lib.EvaluationError, ValueError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  print_summary(summary, FLAGS.run_dir)
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
