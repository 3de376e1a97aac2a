"""Whole-case CPU inference: load NIfTI, preprocess, predict, map back, write; ours vs PyTorch.

python benchmarks/inference.py --config=configs/demo.py --case_dir=DIR/Brats18_..._1
Random weights (timing only). Loading, preprocessing, mapping back and writing are this
project's code for both; the network forward is JAX (ours) or the PyTorch reference. Each
framework runs in a worker process of its own, PyTorch's without our heap top pad
(common.torch_environment), the timed cases alternating between them after one warm-up case
each. Writes benchmarks/results/inference_<config>.json with `case_time_ratio_vs_torch` (ours /
theirs, medians) and each pair of cases' ratio.

In one process, one after the other, both frameworks had our pad: paper model at 128^3, forward
ours 29.4 s, PyTorch's 31.6 s; both without it 33.8 and 29.1 s (issue 6 note, session 20).
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
flags.DEFINE_enum('only', None, ['jax', 'torch'],
                  'Internal: be the worker of one framework (a case timed on request).')
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


def _serve(framework, config, case_dir):
  """The worker: builds one framework's forward, runs the warm-up case, then times one whole
  case per request; at the end of input answers its peak RSS."""
  scheme = labels.get_scheme(config.data.scheme)
  options = preprocess.PreprocessOptions(
      image_size=tuple(config.data.image_size), normalization=config.data.normalization,
      crop_to_brain=config.data.crop_to_brain)
  data_dir, case_name = os.path.split(os.path.abspath(case_dir))
  case = next(c for c in brats.discover_cases(data_dir, scheme) if c.case_id == case_name)
  forward = (_jax_forward if framework == 'jax' else _torch_forward)(config)
  with tempfile.TemporaryDirectory() as output_dir:
    _case_pipeline(case, scheme, options, forward, output_dir)  # warm-up (compilation)
    common.serve({}, lambda request: _case_pipeline(case, scheme, options, forward, output_dir),
                 lambda: {'max_rss_gib': common.max_rss_gib()})


def main(argv):
  del argv
  host_memory.limit_malloc_arenas()  # as the predict program
  config = FLAGS.config
  if FLAGS.only:
    _serve(FLAGS.only, config, FLAGS.case_dir)
    return
  with tempfile.TemporaryDirectory() as scratch:
    case_dir = FLAGS.case_dir
    if not case_dir:
      data_dir = os.path.join(scratch, 'cases')
      synthetic.write_case(data_dir, 0, 0)
      scheme = labels.get_scheme(config.data.scheme)
      case_dir = os.path.join(data_dir, brats.discover_cases(data_dir, scheme)[0].case_id)
    workers = {framework: common.framework_worker(__file__, framework, FLAGS['config'],
                                                  f'--case_dir={case_dir}')
               for framework in ('jax', 'torch')}
    runs = {framework: [] for framework in workers}
    for _ in range(FLAGS.repeats):  # alternating, so both see the same machine state
      for framework, worker in workers.items():
        runs[framework].append(worker.ask('case'))
    peak_rss = {framework: worker.finish()['max_rss_gib'] for framework, worker in workers.items()}
  results = {framework: {stage: float(np.median([r[stage] for r in framework_runs]))
                         for stage in framework_runs[0]}
             for framework, framework_runs in runs.items()}
  figures = {
      'config': common.config_name(FLAGS['config']),
      'image_size': list(config.data.image_size),
      'case': os.path.basename(os.path.normpath(case_dir)),
      'conv_impl': config.model.conv_impl, 'isolation': 'process',
      'jax_seconds': results['jax'], 'torch_seconds': results['torch'],
      'case_time_ratio_vs_torch': results['jax']['total'] / results['torch']['total'],
      'predict_time_ratio_vs_torch': results['jax']['predict'] / results['torch']['predict'],
      # Each of our cases against the PyTorch case right after it: the spread of the ratio.
      'case_time_ratios_vs_torch': [ours['total'] / theirs['total']
                                    for ours, theirs in zip(runs['jax'], runs['torch'])],
      'jax_max_rss_gib': peak_rss['jax'], 'torch_max_rss_gib': peak_rss['torch'],
      'peak_memory_ratio_vs_torch': peak_rss['jax'] / peak_rss['torch'],
  }
  common.report(FLAGS.output or f'benchmarks/results/inference_{figures["config"]}.json',
                figures)


if __name__ == '__main__':
  app.run(main)
