"""Train: python train.py --config=configs/NAME.py --workdir=DIR [--config.FIELD=VALUE ...]."""

from aspp_resunet import host_memory

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # first: a restart repeats what ran before it

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from aspp_resunet import cli
from aspp_resunet import distributed
from aspp_resunet import train_lib
from data_pipelines import brats
from data_pipelines import tfds_brats

flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and the saved config.')
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])
distributed.define_flags()
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Library INFO logs (orbax writes dozens of lines per checkpoint) drown the progress lines.
  logging.set_verbosity(logging.WARNING)
  host_memory.limit_malloc_arenas()
  try:
    distributed.from_flags()
    summary = train_lib.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (distributed.DistributedError, train_lib.TrainingError, brats.DataDirError,
          brats.CaseError, tfds_brats.SplitManifestError, OSError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  if not train_lib.is_main_process():
    return 0
  print(f'trained to step {summary["step"]}; best mean validation Dice '
        f'{summary["best_dice_mean"]:.4f}; workdir {FLAGS.workdir}')
  return 0


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
