"""Shared helpers for benchmarks: machine description and JSON result files."""

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys

from ml_collections import config_flags

from aspp_resunet import host_memory


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


REPLY = 'worker-reply: '  # marks a worker's answers among anything else it prints


def answer(figures):
  """Sends `figures` (JSON) to the process that started this worker (`Worker`)."""
  print(REPLY + json.dumps(figures), flush=True)


def serve(info, handle, closing=dict):
  """A worker's side of `Worker`: answers `info`, then `handle(request)` for each request line
  on stdin, and at the end of input `closing()`."""
  answer(info)
  for line in sys.stdin:
    answer(handle(line.strip()))
  answer(closing())


class Worker:
  """A benchmark's worker process (`command`, environment `env`) that `serve`s requests; the
  constructor returns once it has answered its `info`.

  One framework per process: in one process each framework slows the other (shared heap and
  thread pools, see benchmarks/train_step_vs_torch.py).
  """

  def __init__(self, name, command, env=None):
    self.name = name
    self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True, env=env)
    self.info = self._read()

  def _read(self):
    for line in self.process.stdout:
      if line.startswith(REPLY):
        return json.loads(line[len(REPLY):])
      sys.stdout.write(line)  # the worker's own output, passed on
    raise SystemExit(f'the {self.name} worker exited with {self.process.wait()} '
                     'before answering (its error is above)')

  def ask(self, request):
    """The worker's answer to the one-line `request`."""
    self.process.stdin.write(request + '\n')
    self.process.stdin.flush()
    return self._read()

  def finish(self):
    """The worker's closing answer; it then exits."""
    self.process.stdin.close()
    closing = self._read()
    self.process.wait()
    return closing


def framework_worker(script, framework, config_flag, *flags):
  """A `Worker` running benchmark `script` as the worker of `framework` ('jax' or 'torch':
  `--only=`), with this run's config file (`config_flag`, e.g. FLAGS['config']), its --config.*
  overrides and `flags`; PyTorch's in `torch_environment()`."""
  command = [sys.executable, os.path.abspath(script), f'--only={framework}', *flags,
             f'--config={config_flags.get_config_filename(config_flag)}']
  command += [f'--config.{k}={v}' for k, v in config_overrides().items()]
  return Worker(framework, command, torch_environment() if framework == 'torch' else None)


def max_rss_gib():
  """Peak RSS of this process image. VmHWM, not getrusage's ru_maxrss: a child started by
  subprocess inherits its parent's ru_maxrss through fork + exec, VmHWM starts afresh."""
  try:
    with open('/proc/self/status') as stream:
      for line in stream:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) / 2**20
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def config_overrides(argv=None):
  """The --config.* overrides on a command line (default sys.argv), as {key: value}: passed on
  to a worker."""
  overrides = {}
  for arg in (sys.argv if argv is None else argv)[1:]:
    if arg.startswith('--config.') and '=' in arg:
      key, value = arg[len('--config.'):].split('=', 1)
      overrides[key] = value
  return overrides


def torch_environment(environ=None):
  """The environment (default os.environ) for a PyTorch worker: GLIBC_TUNABLES without the heap
  top pad our restart added (`host_memory.without_added_top_pad`), so PyTorch runs as it does
  in a program of its own. With the pad its demo bfloat16 training step took 0.147 s instead of
  0.094 s, and its paper-model forward at 128^3 31.6 s instead of 29.1 s (issue 6 notes,
  sessions 19-20)."""
  env = dict(os.environ if environ is None else environ)
  env['GLIBC_TUNABLES'] = host_memory.without_added_top_pad(env.get('GLIBC_TUNABLES', ''))
  return env


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
