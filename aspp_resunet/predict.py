"""Segment new patients: writes OUT/<case>.nii.gz in the original geometry."""

from aspp_resunet import host_memory

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # first: a restart repeats what ran before it

import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from aspp_resunet import cli
from aspp_resunet import distributed
from aspp_resunet import eval_lib
from aspp_resunet import labels
from data_pipelines import brats
from data_pipelines import preprocess


class InvalidInputError(ValueError):
  """Some input cases are invalid and nothing was written (one-line message)."""


def _total(count):
  """`count` summed over all processes."""
  if jax.process_count() == 1:
    return count
  return int(np.asarray(multihost_utils.process_allgather(np.int32(count))).sum())


def predict_folder(workdir, input_dir, output_dir, which=None, scheme_name=None, mirror=None,
                   out=sys.stdout, skip_invalid=False):
  """Writes OUT/<case>.nii.gz for every case folder of `input_dir`.

  `which` checkpoint: 'best', 'latest', or None for the workdir config's eval.checkpoint.
  Segmentations are not needed. Each output has the input's shape, affine and header spacing
  and the scheme's labels (uint8); it is written atomically. Every case is checked first: a bad
  case is reported in one line and, unless `skip_invalid`, nothing is written
  (InvalidInputError); with `skip_invalid` the bad cases are skipped.

  Returns:
    (number written, list of CaseError for the cases skipped); with several processes the
    number and the list's length count every process's cases (other processes' errors are
    None entries: each process prints its own).
  """
  config = eval_lib.load_workdir_config(workdir)
  if mirror is not None:
    config.eval.mirror = mirror
  scheme = labels.get_scheme(scheme_name or config.data.scheme)
  options = preprocess.PreprocessOptions(
      image_size=tuple(config.data.image_size), normalization=config.data.normalization,
      crop_to_brain=config.data.crop_to_brain)
  written, failures = 0, []
  # Several processes: case k goes to process k % count; each writes its own cases' files.
  all_cases = brats.discover_cases(input_dir, scheme)
  my_cases = all_cases[jax.process_index()::jax.process_count()]
  if not skip_invalid:
    bad = 0
    for case in my_cases:
      try:
        brats.load_case(case, scheme, require_seg=False, read_seg=False)
      except brats.CaseError as err:
        bad += 1
        print(err, file=out, flush=True)
    bad = _total(bad)
    if bad:
      raise InvalidInputError(f'{bad} invalid case(s) in {input_dir}; nothing written (fix them, '
                              f'or --skip_invalid to segment the others)')
  # The inputs are checked before the model is loaded and before the output folder exists.
  model, variables, _ = eval_lib.restore_model(
      config, workdir, which or config.eval.get('checkpoint', 'best'))
  predict = eval_lib.predictor(model, config)
  os.makedirs(output_dir, exist_ok=True)
  for case in my_cases:
    started = time.time()
    try:
      loaded = brats.load_case(case, scheme, require_seg=False, read_seg=False)
      prepared = preprocess.preprocess_case(loaded, options)
    except brats.CaseError as err:
      failures.append(err)
      print(err, file=out, flush=True)
      continue
    classes, _ = predict(variables, prepared.image[None])
    file_labels = preprocess.prediction_to_labels(
        np.asarray(jax.device_get(classes))[0], prepared.original_shape, prepared.crop_start,
        prepared.crop_stop, scheme)
    path = os.path.join(output_dir, f'{case.case_id}.nii.gz')
    brats.write_nifti(path, file_labels.astype(np.uint8), loaded.affine, header=loaded.header)
    written += 1
    print(f'{case.case_id}: {path} ({time.time() - started:.1f} s)', file=out, flush=True)
  # Totals over all processes, so that process 0's summary line and every exit status agree.
  written, skipped = _total(written), _total(len(failures))
  failures = failures + [None] * (skipped - len(failures))
  return written, failures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)
  host_memory.limit_malloc_arenas()
  flags_ = flags.FLAGS
  try:
    distributed.from_flags()
    written, failures = predict_folder(flags_.workdir, flags_.input_dir, flags_.output_dir,
                                       flags_.checkpoint, flags_.scheme, flags_.mirror,
                                       skip_invalid=flags_.skip_invalid)
  except (distributed.DistributedError, eval_lib.EvaluationError, brats.DataDirError,
          ValueError, OSError) as err:
    print(f'error: {err}', file=sys.stderr)
    return 1
  if jax.process_index() == 0:
    print(f'wrote {written} segmentation(s) to {flags_.output_dir}')
    if failures:
      print(f'{len(failures)} invalid case(s) skipped (--skip_invalid):')
      for failure in failures:
        if failure is not None:  # other processes' failures were printed by them
          print(f'  {failure}')
  return 0 if written or not failures else 1


if __name__ == '__main__':
  flags.DEFINE_string('workdir', None, 'Training workdir (its config.json and checkpoints).')
  flags.DEFINE_string('input_dir', None, 'Folder of case folders (segmentations optional).')
  flags.DEFINE_string('output_dir', None, 'Where <case>.nii.gz are written.')
  flags.DEFINE_enum('checkpoint', None, ['best', 'latest'],
                    "Which checkpoint (default: the workdir config's eval.checkpoint).")
  flags.DEFINE_string('scheme', None, 'Naming scheme of input_dir (default: the training one).')
  flags.DEFINE_bool('mirror', None, 'Mirroring test-time augmentation (default: config).')
  flags.DEFINE_bool('skip_invalid', False, 'Segment the valid cases and list the invalid ones '
                    'at the end, instead of writing nothing when any case is invalid.')
  flags.mark_flags_as_required(['workdir', 'input_dir', 'output_dir'])
  distributed.define_flags()
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
