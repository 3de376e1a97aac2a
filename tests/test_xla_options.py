"""XLA compiler options by backend, compute dtype and CPU, and the programs that take them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aspp_resunet import eval_lib
from aspp_resunet import models
from aspp_resunet import staged_step
from aspp_resunet import train_lib
from aspp_resunet import xla_options
from tests import helpers

AVX512_FLAGS = 'flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n'
AVX2_FLAGS = 'flags\t\t: fpu sse2 avx avx2 fma\n'


def _cpu_info(tmp_path, name, flags_line):
  path = tmp_path / name
  path.write_text('processor\t: 0\nmodel name\t: a CPU\n' + flags_line)
  return str(path)


def test_bfloat16_programs_on_an_avx512_cpu_prefer_512_bit_vectors(tmp_path):
  avx512 = _cpu_info(tmp_path, 'avx512', AVX512_FLAGS)
  assert xla_options.options('bfloat16', 'cpu', avx512) == {
      'xla_cpu_prefer_vector_width': xla_options.BFLOAT16_CPU_VECTOR_WIDTH}
  assert xla_options.options(jnp.bfloat16, 'cpu', avx512) is not None


@pytest.mark.parametrize('dtype, backend, flags_line', [
    ('float32', 'cpu', AVX512_FLAGS),  # slower float32 inference with them
    ('bfloat16', 'gpu', AVX512_FLAGS),  # an XLA:CPU option only
    ('bfloat16', 'tpu', AVX512_FLAGS),
    ('bfloat16', 'cpu', AVX2_FLAGS),  # measured on AVX-512 only
])
def test_other_programs_keep_xla_defaults(tmp_path, dtype, backend, flags_line):
  cpu_info = _cpu_info(tmp_path, f'{dtype}-{backend}-{len(flags_line)}', flags_line)
  assert xla_options.options(dtype, backend, cpu_info) is None


def test_amx_is_read_from_the_cpu_flags(tmp_path):
  amx = _cpu_info(tmp_path, 'amx', AVX512_FLAGS.rstrip() + ' amx_bf16 amx_tile\n')
  assert xla_options.cpu_has_amx(amx)
  assert not xla_options.cpu_has_amx(_cpu_info(tmp_path, 'avx512', AVX512_FLAGS))
  # A flag's name inside another's does not count.
  assert not xla_options.cpu_has_amx(_cpu_info(tmp_path, 'tile', 'flags\t: amx_bf16x amx_tile\n'))


def test_unknown_cpu_features_keep_xla_defaults(tmp_path):
  assert not xla_options.cpu_has_avx512(str(tmp_path / 'missing'))
  assert not xla_options.cpu_has_amx(str(tmp_path / 'missing'))
  assert xla_options.options('bfloat16', 'cpu', str(tmp_path / 'missing')) is None


def _state_and_batch(config, model, sharder):
  state = jax.device_put(
      train_lib.create_train_state(config, model, jax.random.key(0, impl='rbg'), 10),
      sharder.replicated)
  return state, jax.device_put(helpers.random_batch(config, 1), sharder.data)


@pytest.mark.parametrize('program', ['fused', 'staged', 'eval', 'predict'])
def test_every_model_program_is_compiled_with_the_options(monkeypatch, program):
  # An option XLA does not know fails the compilation: proof that it reached the compiler.
  asked = []
  monkeypatch.setattr(xla_options, 'options',
                      lambda dtype, *args: asked.append(jnp.dtype(dtype)) or {
                          'xla_cpu_no_such_option_here': 1})
  config = helpers.step_config(dtype='bfloat16')
  model = models.create_model(config.model)
  sharder = train_lib._Sharder(train_lib.make_mesh())  # pylint: disable=protected-access
  state, batch = _state_and_batch(config, model, sharder)
  if program in ('fused', 'staged'):
    config.train.step_mode = program
    run = lambda: train_lib.make_train_fn(config, model, sharder.replicated)(state, batch)
  elif program == 'eval':
    run = lambda: train_lib.make_eval_fn(config, sharder.replicated)(state, batch)
  else:
    run = lambda: eval_lib.predictor(model, config)(
        {'params': state.params, 'batch_stats': state.batch_stats}, batch['image'])
  with pytest.raises(Exception, match='xla_cpu_no_such_option_here'):
    run()
  assert asked and set(asked) == {jnp.dtype(jnp.bfloat16)}
  if program == 'staged':
    assert isinstance(train_lib.make_train_fn(config, model, sharder.replicated),
                      staged_step.StagedTrainStep)


def test_a_bfloat16_step_compiles_and_runs_with_the_real_options():
  config = helpers.step_config(dtype='bfloat16')
  model = models.create_model(config.model)
  sharder = train_lib._Sharder(train_lib.make_mesh())  # pylint: disable=protected-access
  state, batch = _state_and_batch(config, model, sharder)
  config.train.step_mode = 'fused'
  _, out = train_lib.make_train_fn(config, model, sharder.replicated)(state, batch)
  assert np.isfinite(float(out['loss']))
