"""Input-pipeline overhead: training steps fed by the real tf.data pipeline vs a resident batch.

python benchmarks/input_pipeline.py --config=configs/demo.py [--config.data.augment=True]
Both loops run the trainer's jitted step and wait for its loss, as train_lib does each step.
Writes benchmarks/results/input_pipeline_<config>.json (`overhead_fraction`: extra time per step
when fed by tf.data, relative to the resident-batch step).
"""

import functools
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
from ml_collections import config_flags
import numpy as np

from aspp_resunet import models  # noqa: E402
from aspp_resunet import train_lib  # noqa: E402
from benchmarks import common  # noqa: E402
from data_pipelines import input_pipeline  # noqa: E402

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Configuration to time.')
flags.DEFINE_integer('steps', 20, 'Timed steps per loop.')
flags.DEFINE_string('output', None, 'Result JSON (default: see module docstring).')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  builder = train_lib.prepare_dataset(config.data)
  sharder = train_lib._Sharder(train_lib.make_mesh())  # the trainer's batch placement
  model = models.create_model(config.model)
  state = jax.device_put(train_lib.create_train_state(
      config, model, jax.random.key(config.seed, impl='rbg')), sharder.replicated)
  step = jax.jit(functools.partial(train_lib.train_step, loss_name=config.train.loss),
                 donate_argnums=(0,))
  batch_size = config.train.batch_size

  def host_batches():
    epoch = 0
    while True:
      yield from input_pipeline.train_batches(builder, config.data, batch_size, config.seed,
                                              epoch)
      epoch += 1

  stream = host_batches()
  resident = sharder.batch(next(stream))
  state, out = step(state, resident)  # compile
  float(out['loss'])
  resident_times, pipeline_times = [], []
  for _ in range(FLAGS.steps):
    started = time.perf_counter()
    state, out = step(state, resident)
    float(out['loss'])
    resident_times.append(time.perf_counter() - started)
  for _ in range(FLAGS.steps):
    started = time.perf_counter()
    state, out = step(state, sharder.batch(next(stream)))
    float(out['loss'])
    pipeline_times.append(time.perf_counter() - started)
  resident_seconds = float(np.median(resident_times))
  pipeline_seconds = float(np.median(pipeline_times))
  figures = {
      'config': common.config_name(FLAGS['config']),
      'image_size': list(config.data.image_size), 'batch_size': batch_size,
      'augment': bool(config.data.augment), 'steps': FLAGS.steps,
      'resident_step_seconds_median': resident_seconds,
      'pipeline_step_seconds_median': pipeline_seconds,
      'resident_step_seconds_mean': float(np.mean(resident_times)),
      'pipeline_step_seconds_mean': float(np.mean(pipeline_times)),
      'overhead_fraction': pipeline_seconds / resident_seconds - 1.0,
      'overhead_fraction_of_means': float(np.mean(pipeline_times) / np.mean(resident_times)) - 1,
  }
  common.report(FLAGS.output or (f'benchmarks/results/input_pipeline_{figures["config"]}'
                                 f'{"_augment" if config.data.augment else ""}.json'), figures)


if __name__ == '__main__':
  app.run(main)
