"""Evaluate a trained workdir (SPEC 5 outputs); with --compare_workdir, the paired test."""

from aspp_resunet import host_memory

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # first: a restart repeats what ran before it

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aspp_resunet import cli
from aspp_resunet import distributed
from aspp_resunet import eval_lib
from aspp_resunet import labels
from aspp_resunet import stats
from aspp_resunet import train_lib
from data_pipelines import brats
from data_pipelines import tfds_brats

config_flags.DEFINE_config_file('config', None, 'Configuration the workdir was trained with.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Training workdir to evaluate.')
flags.DEFINE_enum('split', 'test', ['test', 'validation', 'train'], 'Split to evaluate.')
flags.DEFINE_enum('checkpoint', None, ['best', 'latest'],
                  "Which checkpoint (default: the config's eval.checkpoint).")
flags.DEFINE_string('compare_workdir', None, 'Second workdir (the baseline) for the paired test.')
flags.DEFINE_string('output_dir', None, 'Output folder (default: WORKDIR/eval/SPLIT).')
flags.mark_flags_as_required(['config', 'workdir'])
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  host_memory.limit_malloc_arenas()
  output_dir = FLAGS.output_dir or os.path.join(FLAGS.workdir, 'eval', FLAGS.split)
  try:
    distributed.from_flags()
    summary = eval_lib.evaluate(FLAGS.config, FLAGS.workdir, FLAGS.split,
                                FLAGS.checkpoint or FLAGS.config.eval.checkpoint, output_dir,
                                FLAGS.compare_workdir)
  except (distributed.DistributedError, eval_lib.EvaluationError, stats.CaseMismatchError,
          brats.DataDirError, brats.CaseError, tfds_brats.SplitManifestError,
          train_lib.TrainingError, OSError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  if not train_lib.is_main_process():
    return 0
  means = ', '.join(f'Dice {r.upper()} {summary["original"][f"dice_{r}"]["mean"]:.4f}'
                    for r in labels.REGION_NAMES)
  print(f'{summary["n_cases"]} {FLAGS.split} cases: {means}; report {output_dir}/report.md')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
