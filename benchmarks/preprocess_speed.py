"""Per-case load + validation + preprocessing time on real BraTS cases, vs a naive nibabel+zoom."""

import os
import sys
import time

from absl import app
from absl import flags
import nibabel as nib
import numpy as np
import scipy.ndimage

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aspp_resunet import labels as labels_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from data_pipelines import brats  # noqa: E402
from data_pipelines import preprocess  # noqa: E402

flags.DEFINE_string('real_dir', '../shared/data/brats18_dev', 'Real BraTS folder.')
flags.DEFINE_string('output', 'benchmarks/results/preprocess_speed.json', 'Result JSON.')
FLAGS = flags.FLAGS


def _naive(case):
  """nibabel get_fdata + scipy.ndimage.zoom, the common notebook recipe."""
  channels = []
  for key in labels_lib.MODALITIES:
    volume = nib.load(case.files[key]).get_fdata()
    volume = (volume - volume.min()) / max(volume.max() - volume.min(), 1e-8)
    channels.append(scipy.ndimage.zoom(volume, [128 / s for s in volume.shape], order=1))
  seg = nib.load(case.files['seg']).get_fdata()
  scipy.ndimage.zoom(seg, [128 / s for s in seg.shape], order=0)
  return np.stack(channels, -1)


def _gzip_floor(case):
  """Reading and inflating the five files with Python's zlib (what nibabel does)."""
  import gzip  # pylint: disable=g-import-not-at-top

  for path in case.files.values():
    with gzip.open(path, 'rb') as stream:
      stream.read()


def main(argv):
  del argv
  scheme = labels_lib.get_scheme('brats2020')
  options = preprocess.PreprocessOptions()
  rows = []
  for case in brats.discover_cases(FLAGS.real_dir, scheme):
    started = time.perf_counter()
    loaded = brats.load_case(case, scheme)
    loaded_at = time.perf_counter()
    preprocess.preprocess_case(loaded, options)
    done = time.perf_counter()
    _gzip_floor(case)
    floor_done = time.perf_counter()
    _naive(case)
    naive_done = time.perf_counter()
    rows.append({'case_id': case.case_id, 'load_seconds': loaded_at - started,
                 'preprocess_seconds': done - loaded_at, 'total_seconds': done - started,
                 'zlib_floor_seconds': floor_done - done,
                 'naive_seconds': naive_done - floor_done})
  figures = {key: float(np.median([r[key] for r in rows])) for key in rows[0] if key != 'case_id'}
  for key, value in figures.items():
    print(f'median {key:20s} {value:.3f} s/case')
  common.write_result(FLAGS.output, {'cases': len(rows), 'median': figures, 'per_case': rows})
  print(f'wrote {FLAGS.output}')


if __name__ == '__main__':
  app.run(main)
