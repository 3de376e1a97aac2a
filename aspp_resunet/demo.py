"""The main job on the embedded default: synthetic cohort -> validation -> preprocessing."""

import sys
import time

from absl import app
from absl import flags

from aspp_resunet import labels as labels_lib
from data_pipelines import brats
from data_pipelines import preprocess
from data_pipelines import synthetic

flags.DEFINE_string('data_dir', 'data/synthetic', 'Where the synthetic cohort lives.')
flags.DEFINE_integer('num_cases', 40, 'Synthetic cases (75/15/10 split).')
flags.DEFINE_integer('seed', 0, 'Cohort seed.')
FLAGS = flags.FLAGS


def _stage(title):
  print(f'\n== {title}', flush=True)


def main(argv):
  del argv
  started = time.time()
  _stage(f'1. synthetic BraTS cohort ({FLAGS.num_cases} cases) in {FLAGS.data_dir}')
  def progress(done, total):
    print(f'\rgenerating: {done}/{total} cases', end='\n' if done == total else '', flush=True)

  if not synthetic.ensure_cohort(FLAGS.data_dir, FLAGS.num_cases, FLAGS.seed, progress=progress):
    print(f'{FLAGS.data_dir}: {FLAGS.num_cases} synthetic cases already there, kept')
  _stage('2. validation and preprocessing (240x240x155 -> 128^3, min-max)')
  scheme = labels_lib.get_scheme('brats2020')
  options = preprocess.PreprocessOptions()
  bad = 0
  preprocess_seconds = []
  for case in brats.discover_cases(FLAGS.data_dir, scheme):
    case_started = time.time()
    try:
      prepared = preprocess.preprocess_case(brats.load_case(case, scheme), options)
    except brats.CaseError as err:
      print(err)
      bad += 1
      continue
    preprocess_seconds.append(time.time() - case_started)
  print(f'{len(preprocess_seconds)} cases valid and preprocessed to {prepared.image.shape}, '
        f'{bad} invalid; {sum(preprocess_seconds) / len(preprocess_seconds):.2f} s/case')
  _stage('training and evaluation are not built yet (issues 3-5); stopping here')
  print(f'done in {time.time() - started:.0f} s')
  return 1 if bad else 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
