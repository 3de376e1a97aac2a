"""Training step time and memory of a config on this machine (random data, after compilation)."""

import os
import resource
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
flags.DEFINE_integer('steps', 3, 'Timed steps after the compiling one.')
flags.DEFINE_string('output', None,
                    'Result JSON (default benchmarks/results/train_step_<name>[_staged].json).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  host_memory.limit_malloc_arenas()  # as the trainer's programs
  config = FLAGS.config
  model = models.create_model(config.model)
  state = train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'))
  batch_size = config.train.batch_size
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.random((batch_size, *config.data.image_size,
                                            labels.NUM_CHANNELS), np.float32)),
           'label': jnp.asarray(rng.integers(0, 4, (batch_size, *config.data.image_size)),
                                jnp.int32),
           'mask': jnp.ones((batch_size,), jnp.float32)}
  state, batch, replicated = common.place_like_trainer(state, batch)
  started = time.perf_counter()  # 'auto' compiles the fused step to measure its memory
  step = train_lib.make_train_fn(config, model, replicated, state, batch)
  staged = isinstance(step, staged_step.StagedTrainStep)
  # The staged step is several programs, compiled by its first (untimed) call.
  compiled = step if staged else step.lower(state, batch).compile()
  compile_seconds = None if staged else time.perf_counter() - started
  # The fused step's count: the staged step's recomputed forward is not useful work.
  flops = common.step_flops(config, state, batch)
  nominal_flops = common.step_flops(config, state, batch, nominal=True)
  memory = None if staged else compiled.memory_analysis()
  times = []
  for _ in range(FLAGS.steps + 1):
    started = time.perf_counter()
    state, out = compiled(state, batch)
    jax.block_until_ready((state, out))  # the staged step's loss is ready before its update
    times.append(time.perf_counter() - started)
  step_seconds = float(np.median(times[1:])) if len(times) > 1 else times[0]
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  figures = {
      'image_size': list(config.data.image_size), 'batch_size': batch_size,
      'step_mode': 'staged' if staged else 'fused', 'conv_impl': config.model.conv_impl,
      'dtype': config.model.dtype,
      'parameters': models.count_parameters(state.params), 'compile_seconds': compile_seconds,
      'step_seconds_median': step_seconds, 'step_seconds_all': times,
      'xla_flops_per_step': flops, 'achieved_gflops': flops / step_seconds / 1e9,
      'nominal_flops_per_step': nominal_flops,  # upsample, then convolve (the network as written)
      'temp_bytes': getattr(memory, 'temp_size_in_bytes', None),
      'argument_bytes': getattr(memory, 'argument_size_in_bytes', None),
      'peak_rss_gib': peak_rss}
  # The staged step gets its own file: a run of each mode keeps the other's result.
  mode = '_staged' if staged else ''
  name = f'{common.config_name(FLAGS["config"])}{mode}'
  common.report(FLAGS.output or f'benchmarks/results/train_step_{name}.json', figures)


if __name__ == '__main__':
  app.run(main)
