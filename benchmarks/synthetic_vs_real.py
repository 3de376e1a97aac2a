"""Calibration of the synthetic cohort against real BraTS cases: region volumes and contrasts."""

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aspp_resunet import labels as labels_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from data_pipelines import brats  # noqa: E402
from data_pipelines import synthetic  # noqa: E402

flags.DEFINE_string('real_dir', '../shared/data/brats18_dev', 'Real BraTS folder.')
flags.DEFINE_integer('num_synthetic', 22, 'Synthetic cases to generate.')
flags.DEFINE_integer('seed', 0, 'Synthetic cohort seed.')
flags.DEFINE_string('output', 'benchmarks/results/synthetic_vs_real', 'Output path stem.')
FLAGS = flags.FLAGS

# Tumour sub-regions whose contrast is measured (model class -> row name).
_CONTRAST_CLASSES = {labels_lib.NECROTIC_CORE: 'ncr', labels_lib.EDEMA: 'ed',
                     labels_lib.ENHANCING_TUMOR: 'et'}


def case_statistics(loaded):
  """Region volumes (voxels), brain volume and tumour medians relative to normal brain."""
  classes = loaded.classes
  brain = np.zeros(classes.shape, bool)
  for volume in loaded.modalities:
    brain |= volume > 0
  normal = brain & (classes == labels_lib.BACKGROUND)
  stats = {f'{region}_voxels': int(labels_lib.region_mask(classes, region).sum())
           for region in labels_lib.REGION_NAMES}
  stats['brain_voxels'] = int(brain.sum())
  for modality, volume in zip(labels_lib.MODALITIES, loaded.modalities):
    reference = float(np.median(volume[normal]))
    for model_class, name in _CONTRAST_CLASSES.items():
      inside = classes == model_class
      stats[f'{modality}_{name}_rel'] = (
          float(np.median(volume[inside])) / reference if inside.any() else float('nan'))
  return stats


def cohort_statistics(data_dir):
  scheme = labels_lib.get_scheme('brats2020')
  rows, examples = [], []
  for case in brats.discover_cases(data_dir, scheme):
    loaded = brats.load_case(case, scheme)
    rows.append(case_statistics(loaded))
    if len(examples) < 2:
      examples.append(loaded)
  return rows, examples


def _summary(rows):
  keys = rows[0].keys()
  return {key: {'min': float(np.nanmin([r[key] for r in rows])),
                'median': float(np.nanmedian([r[key] for r in rows])),
                'max': float(np.nanmax([r[key] for r in rows]))} for key in keys}


def _tumour_slice(loaded):
  whole = labels_lib.region_mask(loaded.classes, 'wt')
  return int(np.argmax(whole.sum(axis=(0, 1)))) if whole.any() else loaded.shape[2] // 2


def _plot(real, synth, path):
  rows = real + synth
  figure, axes = plt.subplots(len(rows), 5, figsize=(12, 2.5 * len(rows)))
  for row, loaded in enumerate(rows):
    z = _tumour_slice(loaded)
    panels = list(loaded.modalities) + [loaded.classes]
    titles = list(labels_lib.MODALITIES) + ['segmentation']
    for column, (panel, title) in enumerate(zip(panels, titles)):
      axis = axes[row, column]
      # Rotate so that anterior is up, as radiology viewers show axial slices.
      image = np.rot90(panel[:, :, z])
      axis.imshow(image, cmap='viridis' if column == 4 else 'gray',
                  vmin=0, vmax=3 if column == 4 else None, interpolation='nearest')
      axis.set_axis_off()
      source = 'real' if row < len(real) else 'synthetic'
      axis.set_title(f'{source} {loaded.case_id[:22]}\n{title}' if column == 0 else title,
                     fontsize=7)
  figure.tight_layout()
  figure.savefig(path, dpi=80)
  plt.close(figure)


def main(argv):
  del argv
  started = time.time()
  real_rows, real_examples = cohort_statistics(FLAGS.real_dir)
  with tempfile.TemporaryDirectory() as synthetic_dir:
    generation_started = time.time()
    synthetic.generate_cohort(synthetic_dir, FLAGS.num_synthetic, FLAGS.seed, workers=1)
    seconds_per_case = (time.time() - generation_started) / FLAGS.num_synthetic
    synth_rows, synth_examples = cohort_statistics(synthetic_dir)
  real, synth = _summary(real_rows), _summary(synth_rows)
  print(f'{"statistic":22s} {"real min":>10s} {"median":>10s} {"max":>10s} | '
        f'{"synth min":>10s} {"median":>10s} {"max":>10s}  in range')
  inside = {}
  for key in real:
    r, s = real[key], synth[key]
    inside[key] = bool(r['min'] <= s['median'] <= r['max'])
    print(f'{key:22s} {r["min"]:10.3f} {r["median"]:10.3f} {r["max"]:10.3f} | '
          f'{s["min"]:10.3f} {s["median"]:10.3f} {s["max"]:10.3f}  '
          f'{"yes" if inside[key] else "NO"}')
  print(f'synthetic generation + writing: {seconds_per_case:.2f} s/case (1 process)')
  os.makedirs(os.path.dirname(FLAGS.output), exist_ok=True)
  _plot(real_examples, synth_examples, FLAGS.output + '.png')
  common.write_result(FLAGS.output + '.json', {
      'real_cases': len(real_rows), 'synthetic_cases': len(synth_rows),
      'real': real, 'synthetic': synth, 'synthetic_median_inside_real_range': inside,
      'synthetic_seconds_per_case': seconds_per_case,
      'wall_seconds': time.time() - started})
  print(f'wrote {FLAGS.output}.json and {FLAGS.output}.png')


if __name__ == '__main__':
  app.run(main)
