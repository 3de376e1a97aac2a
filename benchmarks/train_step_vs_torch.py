"""Training step: ours (JAX) vs the PyTorch reference, same shapes, alternating steps.

python benchmarks/train_step_vs_torch.py --config=configs/demo.py --dtype=float32
Prints and writes benchmarks/results/train_step_vs_torch_<config>_<size>_<dtype>[_staged].json:
median step times and their ratio (`step_time_ratio_vs_torch`, ours / theirs), achieved FLOP/s from
XLA's cost analysis, a GEMM peak measured in the same run, and peak memory (XLA's memory
analysis, and each framework's max RSS).

By default each framework runs in its own worker process, the turns alternating between them
(`--isolation=process`): in one process each slows the other (at 64^3, paper widths, our step
5.5-5.8 s alone and up to 7.0 s right after a PyTorch step; PyTorch's 5.7 s alone, 5.9-6.3 s
after ours), from the shared heap and thread pools. `--isolation=none` runs both in this
process, as before.

A turn is `--steps_per_turn` steps back to back, as in training, and the medians compare the
steps after the first of each turn; the first steps, and all steps, are compared apart
(`first_of_turn_time_ratio_vs_torch`, `all_steps_time_ratio_vs_torch`). Our first step after
the other framework's turn is slower: on this virtual machine memory left free for a while is
handed back to the host (free page reporting) and costs again when reused. At 64^3, paper
widths, our step back to back 5.6-5.8 s; after a PyTorch step 6.3-7.0 s; after a 5 s pause
7.8-8.4 s (issue 6 note, session 8).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aspp_resunet import host_memory  # noqa: E402

if __name__ == '__main__':
  host_memory.restart_with_huge_pages()  # before the heavy imports, as the programs

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from aspp_resunet import labels  # noqa: E402
from aspp_resunet import models  # noqa: E402
from aspp_resunet import staged_step  # noqa: E402
from aspp_resunet import train_lib  # noqa: E402
from benchmarks import common  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Configuration to time.')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype of both.')
flags.DEFINE_integer('steps', 3, 'Turns per framework after one warm-up step.')
flags.DEFINE_integer('steps_per_turn', 3, 'Steps back to back in each turn (all timed).')
flags.DEFINE_enum('isolation', 'process', ['process', 'none'],
                  'process: one worker process per framework, steps alternating; none: both '
                  'frameworks in this process.')
flags.DEFINE_enum('only', None, ['jax', 'torch'],
                  'Internal: be the worker of one framework (steps timed on request).')
flags.DEFINE_string('output', None, 'Result JSON (default: see module docstring).')
FLAGS = flags.FLAGS


def _batch(config):
  rng = np.random.default_rng(0)
  size = tuple(config.data.image_size)
  image = rng.random((config.train.batch_size, *size, labels.NUM_CHANNELS), np.float32)
  label = rng.integers(0, labels.NUM_CLASSES, (config.train.batch_size, *size)).astype(np.int32)
  return image, label


def _jax_step(config, image, label):
  """(run one step -> loss, what it is) for our trainer's train_step."""
  model = models.create_model(config.model)
  state = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'))
  batch = {'image': jnp.asarray(image), 'label': jnp.asarray(label),
           'mask': jnp.ones((image.shape[0],), jnp.float32)}
  state, batch, replicated = common.place_like_trainer(state, batch)
  step = train_lib.make_train_fn(config, model, replicated, state, batch)
  # The staged step is several programs, compiled by the warm-up call.
  staged = isinstance(step, staged_step.StagedTrainStep)
  compiled = step if staged else step.lower(state, batch).compile()
  flops = {kind: common.step_flops(config, state, batch, nominal=kind == 'nominal')
           for kind in ('nominal', 'executed')}  # before the state is donated
  holder = [state]

  def run():
    holder[0], out = compiled(holder[0], batch)
    jax.block_until_ready(holder[0])
    return float(out['loss'])

  return run, {'parameters': models.count_parameters(state.params), 'flops': flops,
               'staged': staged,
               'xla_memory_analysis_gib': (None if staged else
                                           staged_step.program_bytes(compiled) / 2**30)}


def _torch_step(config, image, label):
  import torch

  from benchmarks import torch_reference

  torch.manual_seed(0)
  net = torch_reference.create(config.model)
  optimizer = torch.optim.Adam(net.parameters(), lr=float(config.train.learning_rate))
  x = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 1))).contiguous(
      memory_format=torch.channels_last_3d)
  y = torch.from_numpy(label.astype(np.int64))
  net.train()

  def run():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=config.model.dtype == 'bfloat16'):
      logits = net(x)
    loss = torch_reference.loss_fn(config.train.loss, logits, y, config.model.num_classes)
    loss.backward()
    optimizer.step()
    return float(loss)

  return run, {'parameters': torch_reference.parameter_count(net),
               'torch_version': torch.__version__, 'torch_threads': torch.get_num_threads()}


def _timed(run):
  started = time.perf_counter()
  run()
  return time.perf_counter() - started


def gemm_peak_gflops(dtype, n=2048, repeats=5):
  """GFLOP/s of a jitted n x n matmul (bf16 inputs accumulate in float32)."""
  a = jnp.asarray(np.random.default_rng(0).random((n, n)), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    matmul(a, a).block_until_ready()
    times.append(time.perf_counter() - started)
  return 2 * n**3 / min(times) / 1e9


def _serve(framework, config, image, label):
  """The worker: builds and warms up one framework's step, says what it is, then times one
  step per request; at the end of input answers its peak RSS."""
  step = _jax_step if framework == 'jax' else _torch_step
  run, info = step(config, image, label)
  run()  # warm-up (compilation; oneDNN picks its kernels on the first call)
  common.serve(info, lambda request: {'seconds': _timed(run)},
               lambda: {'max_rss_gib': common.max_rss_gib()})


class _Worker:
  """A framework's worker process (`_serve`), started and warmed up by the constructor."""

  def __init__(self, framework):
    self.worker = common.framework_worker(__file__, framework, FLAGS['config'],
                                          f'--dtype={FLAGS.dtype}')
    self.info = self.worker.info

  def step(self):
    """Seconds of one timed step."""
    return self.worker.ask('step')['seconds']

  def finish(self):
    """Peak RSS (GiB) of the worker, which then exits."""
    return self.worker.finish()['max_rss_gib']


def main(argv):
  del argv
  host_memory.limit_malloc_arenas()  # as the trainer's programs
  config = FLAGS.config
  config.model.dtype = FLAGS.dtype
  image, label = _batch(config)
  if FLAGS.only:
    _serve(FLAGS.only, config, image, label)
    return

  gemm_dtype = jnp.bfloat16 if FLAGS.dtype == 'bfloat16' else jnp.float32
  # Read before and after the steps, the higher kept: a single reading after a 96^3 run once
  # gave 162 GFLOP/s on a machine that read 387 alone before it and ran both steps at speed.
  gemm_readings = [gemm_peak_gflops(gemm_dtype)]
  jax_times, torch_times = [], []
  if FLAGS.isolation == 'process':
    jax_worker, torch_worker = _Worker('jax'), _Worker('torch')  # one after the other
    jax_info, torch_info = jax_worker.info, torch_worker.info
    _check_parameters(jax_info, torch_info)
    for _ in range(FLAGS.steps):  # alternating, so both see the same machine state
      jax_times.append([jax_worker.step() for _ in range(FLAGS.steps_per_turn)])
      torch_times.append([torch_worker.step() for _ in range(FLAGS.steps_per_turn)])
    jax_rss, torch_rss = jax_worker.finish(), torch_worker.finish()
  else:
    jax_run, jax_info = _jax_step(config, image, label)
    torch_run, torch_info = _torch_step(config, image, label)
    _check_parameters(jax_info, torch_info)
    jax_run(), torch_run()  # warm-up
    for _ in range(FLAGS.steps):
      jax_times.append([_timed(jax_run) for _ in range(FLAGS.steps_per_turn)])
      torch_times.append([_timed(torch_run) for _ in range(FLAGS.steps_per_turn)])
    # Peak RSS of each framework alone: a worker per framework, one after the other.
    jax_rss, torch_rss = (_memory_of(framework) for framework in ('jax', 'torch'))
  jax_seconds, torch_seconds = (common.median_step_seconds(times, 1)
                                for times in (jax_times, torch_times))
  turn_ratios = common.turn_time_ratios(jax_times, torch_times)
  gemm_readings.append(gemm_peak_gflops(gemm_dtype))
  peak = max(gemm_readings)
  flops, staged = jax_info['flops'], jax_info['staged']
  figures = {
      'config': common.config_name(FLAGS['config']),
      'image_size': list(config.data.image_size), 'base_width': config.model.base_width,
      'use_aspp': config.model.use_aspp, 'batch_size': config.train.batch_size,
      'loss': config.train.loss, 'dtype': FLAGS.dtype,
      'conv_impl': config.model.conv_impl, 'parameters': jax_info['parameters'],
      'torch_version': torch_info['torch_version'],
      'torch_threads': torch_info['torch_threads'], 'isolation': FLAGS.isolation,
      'steps_per_turn': FLAGS.steps_per_turn,
      'jax_step_seconds': jax_times, 'torch_step_seconds': torch_times,  # per turn
      'jax_step_seconds_median': jax_seconds, 'torch_step_seconds_median': torch_seconds,
      'first_of_turn_time_ratio_vs_torch': (common.median_step_seconds(jax_times, 0, 1) /
                                            common.median_step_seconds(torch_times, 0, 1)),
      'all_steps_time_ratio_vs_torch': (common.median_step_seconds(jax_times, 0) /
                                        common.median_step_seconds(torch_times, 0)),
      'step_time_ratio_vs_torch': jax_seconds / torch_seconds,
      # Each turn's ratio against its neighbour turn of PyTorch's: the spread a single run's
      # ratio carries on a noisy machine (quartiles of the turns).
      'turn_time_ratios_vs_torch': turn_ratios,
      'turn_time_ratio_vs_torch_quartiles': np.percentile(turn_ratios, [25, 50, 75]).tolist(),
      'step_mode': 'staged' if staged else 'fused',
      # nominal: the network as written (PyTorch's arithmetic); executed: ours (the decoder's
      # upsampling folded into its convolutions, see layers._upsampled_conv).
      'nominal_flops_per_step': flops['nominal'], 'executed_flops_per_step': flops['executed'],
      'jax_effective_gflops': flops['nominal'] / jax_seconds / 1e9,
      'jax_executed_gflops': flops['executed'] / jax_seconds / 1e9,
      'torch_achieved_gflops': flops['nominal'] / torch_seconds / 1e9,
      'gemm_peak_gflops': peak, 'gemm_peak_gflops_readings': gemm_readings,
      'jax_fraction_of_gemm_peak': flops['executed'] / jax_seconds / 1e9 / peak,
      'torch_fraction_of_gemm_peak': flops['nominal'] / torch_seconds / 1e9 / peak,
      'xla_memory_analysis_gib': jax_info['xla_memory_analysis_gib'],
      'jax_max_rss_gib': jax_rss, 'torch_max_rss_gib': torch_rss,
      'peak_memory_ratio_vs_torch': jax_rss / torch_rss,
  }
  size = 'x'.join(map(str, config.data.image_size))
  mode = '_staged' if staged else ''  # a run of each step mode keeps the other's result
  common.report(FLAGS.output or (f'benchmarks/results/train_step_vs_torch_'
                                 f'{figures["config"]}_{size}_{FLAGS.dtype}{mode}.json'), figures)


def _check_parameters(jax_info, torch_info):
  if jax_info['parameters'] != torch_info['parameters']:
    raise SystemExit(f'parameter counts differ: ours {jax_info["parameters"]}, '
                     f'torch {torch_info["parameters"]}')


def _memory_of(framework):
  """Max RSS of a worker running the warm-up and the timed steps of one framework alone."""
  worker = _Worker(framework)
  for _ in range(FLAGS.steps * FLAGS.steps_per_turn):
    worker.step()
  return worker.finish()


if __name__ == '__main__':
  app.run(main)
