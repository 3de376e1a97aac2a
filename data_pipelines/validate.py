"""Command line: validate a BraTS-layout folder, one line per bad case (exit 1 if any)."""

import sys

from absl import app
from absl import flags

from aspp_resunet import labels as labels_lib
from data_pipelines import brats


def validate_folder(data_dir, scheme_name, require_seg=True, out=sys.stdout):
  """Validates every case of `data_dir`, printing one line per bad case.

  Returns:
    (number of cases, number of bad cases).

  Raises:
    brats.DataDirError: the folder itself is unusable.
  """
  scheme = labels_lib.get_scheme(scheme_name)
  cases = brats.discover_cases(data_dir, scheme)
  bad = 0
  for case in cases:
    try:
      brats.load_case(case, scheme, require_seg=require_seg)
    except brats.CaseError as err:
      bad += 1
      print(err, file=out, flush=True)
  return len(cases), bad


def main(argv):
  del argv
  flags_ = flags.FLAGS
  if not flags_.data_dir:
    raise app.UsageError('--data_dir is required')
  try:
    total, bad = validate_folder(flags_.data_dir, flags_.scheme, flags_.require_seg)
  except (brats.DataDirError, ValueError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  print(f'{total - bad} of {total} cases valid' + (f', {bad} invalid' if bad else ''))
  if flags_.skip_invalid:
    return 0 if total > bad else 1  # the valid cases can go on; none valid is still an error
  return 1 if bad else 0


if __name__ == '__main__':
  flags.DEFINE_string('data_dir', None, 'BraTS-layout folder to check.')
  flags.DEFINE_enum('scheme', labels_lib.DEFAULT_SCHEME, list(labels_lib.SCHEMES),
                    'File naming scheme.')
  flags.DEFINE_bool('require_seg', True, 'A missing segmentation makes a case invalid.')
  flags.DEFINE_bool('skip_invalid', False, 'Exit 0 when some cases are valid (the invalid ones '
                    'are listed; preparation with data.skip_invalid=True leaves them out).')
  app.run(lambda argv: sys.exit(main(argv)))
