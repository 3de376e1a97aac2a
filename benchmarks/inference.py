"""Whole-case CPU inference: load NIfTI, preprocess, predict, map back, write; ours vs PyTorch.

python benchmarks/inference.py --config=configs/demo.py --case_dir=DIR/Brats18_..._1
Random weights (timing only). Loading, preprocessing, mapping back and writing are this
project's code for both; the network forward is JAX (ours) or the PyTorch reference. Writes
benchmarks/results/inference_<config>.json with `case_time_ratio_vs_torch` (ours / theirs).
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aspp_resunet import host_memory  # noqa: E402

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # before the heavy imports, as the programs

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from aspp_resunet import eval_lib  # noqa: E402
from aspp_resunet import labels  # noqa: E402
from aspp_resunet import models  # noqa: E402
from aspp_resunet import train_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from data_pipelines import brats  # noqa: E402
from data_pipelines import preprocess  # noqa: E402
from data_pipelines import synthetic  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Configuration (model and size).')
flags.DEFINE_string('case_dir', None, 'A BraTS case folder (default: a synthetic case).')
flags.DEFINE_integer('repeats', 2, 'Timed cases per framework after one warm-up case.')
flags.DEFINE_string('output', None, 'Result JSON (default: see module docstring).')
FLAGS = flags.FLAGS


def _jax_forward(config):
  model = models.create_model(config.model)
  state = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  predict = eval_lib.predictor(model, config)

  def forward(image):
    classes, _ = predict(variables, image[None])
    return np.asarray(jax.device_get(classes))[0]

  return forward


def _torch_forward(config):
  import torch

  from benchmarks import torch_reference

  torch.manual_seed(0)
  net = torch_reference.create(config.model).eval()

  def forward(image):
    x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)[None])).contiguous(
        memory_format=torch.channels_last_3d)
    with torch.inference_mode():
      return net(x).argmax(dim=1)[0].numpy().astype(np.int32)

  return forward


def _case_pipeline(case, scheme, options, forward, output_dir):
  """Seconds per stage of one whole case."""
  times = {}
  started = time.perf_counter()
  loaded = brats.load_case(case, scheme, require_seg=False, read_seg=False)
  times['load'] = time.perf_counter() - started
  started = time.perf_counter()
  prepared = preprocess.preprocess_case(loaded, options)
  times['preprocess'] = time.perf_counter() - started
  started = time.perf_counter()
  classes = forward(prepared.image)
  times['predict'] = time.perf_counter() - started
  started = time.perf_counter()
  file_labels = preprocess.prediction_to_labels(classes, prepared.original_shape,
                                                prepared.crop_start, prepared.crop_stop, scheme)
  brats.write_nifti(os.path.join(output_dir, f'{case.case_id}.nii.gz'),
                    file_labels.astype(np.uint8), loaded.affine, header=loaded.header)
  times['map_back_and_write'] = time.perf_counter() - started
  times['total'] = sum(times.values())
  return times


def main(argv):
  del argv
  host_memory.limit_malloc_arenas()  # as the predict program
  config = FLAGS.config
  scheme = labels.get_scheme(config.data.scheme)
  options = preprocess.PreprocessOptions(
      image_size=tuple(config.data.image_size), normalization=config.data.normalization,
      crop_to_brain=config.data.crop_to_brain)
  with tempfile.TemporaryDirectory() as scratch:
    if FLAGS.case_dir:
      data_dir, case_name = os.path.split(os.path.abspath(FLAGS.case_dir))
    else:
      data_dir = os.path.join(scratch, 'cases')
      synthetic.write_case(data_dir, 0, 0)
      case_name = brats.discover_cases(data_dir, scheme)[0].case_id
    case = next(c for c in brats.discover_cases(data_dir, scheme) if c.case_id == case_name)
    results = {}
    for name, make in (('jax', _jax_forward), ('torch', _torch_forward)):
      forward = make(config)
      _case_pipeline(case, scheme, options, forward, scratch)  # warm-up (compilation)
      runs = [_case_pipeline(case, scheme, options, forward, scratch)
              for _ in range(FLAGS.repeats)]
      results[name] = {stage: float(np.median([r[stage] for r in runs])) for stage in runs[0]}
  figures = {
      'config': common.config_name(FLAGS['config']),
      'image_size': list(config.data.image_size), 'case': case_name,
      'conv_impl': config.model.conv_impl, 'jax_seconds': results['jax'],
      'torch_seconds': results['torch'],
      'case_time_ratio_vs_torch': results['jax']['total'] / results['torch']['total'],
      'predict_time_ratio_vs_torch': results['jax']['predict'] / results['torch']['predict'],
  }
  common.report(FLAGS.output or f'benchmarks/results/inference_{figures["config"]}.json',
                figures)


if __name__ == '__main__':
  app.run(main)
