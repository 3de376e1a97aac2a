"""The main job on the embedded default: synthetic cohort -> validation -> preprocessing."""

import os
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


def ensure_cohort(data_dir, num_cases, seed):
  """Generates the synthetic cohort unless `data_dir` already holds it complete and valid."""
  scheme = labels_lib.get_scheme('brats2020')
  expected = [synthetic.case_id_for(i) for i in range(num_cases)]
  if os.path.isdir(data_dir):
    try:
      found = [c.case_id for c in brats.discover_cases(data_dir, scheme)]
    except brats.DataDirError:
      found = []
    if found == expected:
      print(f'{data_dir}: {num_cases} synthetic cases already there, kept')
      return

  def progress(done, total):
    print(f'\rgenerating: {done}/{total} cases', end='\n' if done == total else '', flush=True)

  synthetic.generate_cohort(data_dir, num_cases, seed, progress=progress)


def main(argv):
  del argv
  started = time.time()
  _stage(f'1. synthetic BraTS cohort ({FLAGS.num_cases} cases) in {FLAGS.data_dir}')
  ensure_cohort(FLAGS.data_dir, FLAGS.num_cases, FLAGS.seed)
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
