"""Shared helpers for benchmarks: machine description and JSON result files."""

import datetime
import json
import os
import platform
import statistics
import subprocess

from ml_collections import config_flags


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as stream:
      for line in stream:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _versions():
  versions = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scipy', 'nibabel', 'tensorflow',
               'torch'):
    try:
      module = __import__(name)
      versions[name] = getattr(module, '__version__', 'unknown')
    except ImportError:
      continue
  return versions


def _git_commit():
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def write_result(path, figures):
  """Writes `figures` with the date, machine and versions to `path` as JSON (atomically)."""
  record = {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'commit': _git_commit(),
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'versions': _versions(),
      # glibc.malloc.hugetlb=1 and top_pad there: see host_memory.restart_with_huge_pages
      'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
      **figures,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp_path = path + '.tmp'
  with open(temp_path, 'w') as stream:
    json.dump(record, stream, indent=2, sort_keys=False, default=float)
    stream.write('\n')
  os.replace(temp_path, path)
  return record


def config_name(config_flag):
  """'demo' for --config=configs/demo.py (the flag object, e.g. FLAGS['config'])."""
  return os.path.splitext(os.path.basename(config_flags.get_config_filename(config_flag)))[0]


def report(path, figures):
  """Prints `figures` one per line, writes them with `write_result` and says where."""
  width = max(len(key) for key in figures) + 2
  for key, value in figures.items():
    print(f'{key:{width}s}{value}')
  write_result(path, figures)
  print(f'wrote {path}')


def turn_time_ratios(ours, theirs):
  """Per turn, ours / theirs of the median step time after each turn's first step (all its
  steps if it has one). The two turns of a pair ran seconds apart, so the ratios share the
  machine's state of the moment, which the ratio of whole-run medians does not.

  Args:
    ours: step seconds per turn (a list of lists), our framework.
    theirs: the same for the other framework, as many turns.
  Returns:
    One ratio per turn.
  """
  if len(ours) != len(theirs):
    raise ValueError(f'{len(ours)} turns of ours against {len(theirs)} of theirs')
  return [median_step_seconds([a], 1) / median_step_seconds([b], 1) for a, b in zip(ours, theirs)]


def median_step_seconds(turns, first, stop=None):
  """Median step time over steps first .. stop - 1 of every turn (all of them if a turn has
  only one step)."""
  return float(statistics.median([t for turn in turns for t in (turn[first:stop] or turn)]))


def place_like_trainer(state, batch):
  """(state, batch, replicated sharding) placed on the mesh as train_lib places them.

  A state left where initialisation put it has the step compiled again at the second call,
  for the updated (replicated) state's placement: warm-up would not cover compilation.
  """
  import jax

  from aspp_resunet import train_lib

  sharder = train_lib._Sharder(train_lib.make_mesh())  # pylint: disable=protected-access
  return (jax.device_put(state, sharder.replicated), jax.device_put(batch, sharder.data),
          sharder.replicated)


def step_flops(config, state, batch, nominal=False):
  """FLOPs of one training step, counted by XLA on the step lowered with native convolutions.

  XLA's cost analysis counts a loop body once, not once per trip, so the 'im2col' convolutions
  (a lax.map over depth blocks) would be undercounted; the arithmetic is the same whatever
  `conv_impl` computes it. `nominal`: the network as written (each decoder convolution on the
  upsampled, concatenated map: PyTorch's work) instead of the arithmetic this project runs
  (layers._upsampled_conv, ~27% fewer FLOPs at the paper's widths).
  """
  # Imported here: the data benchmarks that use this module need neither jax nor the trainer.
  import functools
  from unittest import mock

  import jax

  from aspp_resunet import layers
  from aspp_resunet import models
  from aspp_resunet import train_lib

  config = config.copy_and_resolve_references()
  config.model.conv_impl = 'lax'
  step = jax.jit(functools.partial(train_lib.train_step, loss_name=config.train.loss))
  model = models.create_model(config.model)
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                    (state.replace(apply_fn=model.apply), batch))
  upsampled_conv = layers._upsampled_conv  # pylint: disable=protected-access
  if nominal:
    upsampled_conv = lambda x, kernel, impl: layers._same_conv(  # noqa: E731 pylint: disable=protected-access
        layers.upsample_nearest(x), kernel, 1, impl)
  with mock.patch.object(layers, '_upsampled_conv', upsampled_conv):
    cost = step.lower(*abstract).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', float('nan'))) if cost else float('nan')
