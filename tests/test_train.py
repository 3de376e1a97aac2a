"""End-to-end training tests on the tiny config: checkpoints, resume, multi-device, errors."""

import importlib
import json
import os
import subprocess

import jax
import numpy as np
import pytest

from aspp_resunet import checkpointing
from aspp_resunet import train_lib
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ['default', 'baseline', 'demo', 'demo_baseline', 'test', 'brats_cpu', 'paper_gpu',
           'paper_tpu']


def _metrics(workdir):
  with open(os.path.join(workdir, train_lib.METRICS_FILE)) as stream:
    return [json.loads(line) for line in stream]


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.batch_stats,
                                                            state.opt_state))]


@pytest.fixture(scope='module')
def full_run(tmp_path_factory, data_root):
  """The tiny config trained for its 2 epochs (12 steps), uninterrupted."""
  from configs import test as test_config

  config = test_config.get_config()
  config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
  config.data.prepared_dir = os.path.join(data_root, 'prepared')
  config.train.log_every_steps = 1
  workdir = str(tmp_path_factory.mktemp('full'))
  summary = train_lib.train_and_evaluate(config, workdir)
  return config, workdir, summary


def test_end_to_end_writes_checkpoints_logs_and_loss_falls(full_run):
  config, workdir, summary = full_run
  assert summary['step'] == 12
  assert sorted(os.listdir(os.path.join(workdir, checkpointing.LATEST))) == ['12', '6']
  assert len(os.listdir(os.path.join(workdir, checkpointing.BEST))) == 1
  assert os.path.exists(os.path.join(workdir, train_lib.CONFIG_FILE))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(workdir))
  records = _metrics(workdir)
  train = [r['loss'] for r in records if r['kind'] == 'train']
  assert len(train) == 12
  assert np.mean(train[-3:]) < np.mean(train[:3])
  validation = [r for r in records if r['kind'] == 'validation']
  assert [r['epoch'] for r in validation] == [1, 2]
  assert set(validation[0]) >= {'dice_wt', 'dice_tc', 'dice_et', 'dice_mean', 'loss'}
  assert all(0.0 <= r['dice_mean'] <= 1.0 for r in validation)
  assert summary['best_dice_mean'] == max(r['dice_mean'] for r in validation)


def test_resume_gives_bitwise_identical_parameters(full_run, tmp_path):
  config, _, summary = full_run
  workdir = str(tmp_path / 'interrupted')
  config = config.copy_and_resolve_references()
  config.train.max_steps = 5  # stops inside the first epoch
  first = train_lib.train_and_evaluate(config, workdir)
  assert first['step'] == 5
  assert os.listdir(os.path.join(workdir, checkpointing.LATEST)) == ['5']
  config.train.max_steps = -1
  resumed = train_lib.train_and_evaluate(config, workdir)
  assert resumed['step'] == 12
  for a, b in zip(_leaves(summary['state']), _leaves(resumed['state'])):
    np.testing.assert_array_equal(a, b)
  steps = [r['step'] for r in _metrics(workdir) if r['kind'] == 'train']
  assert steps == list(range(1, 13))  # no duplicated or missing log records


def test_rerun_of_finished_workdir_does_nothing(full_run):
  config, workdir, summary = full_run
  again = train_lib.train_and_evaluate(config, workdir)
  assert again['step'] == 12
  for a, b in zip(_leaves(summary['state']), _leaves(again['state'])):
    np.testing.assert_array_equal(a, b)


def _train_cli(workdir, config, *overrides, devices=1):
  return subprocess.run(helpers.train_command(workdir, config, *overrides), cwd=REPO,
                        capture_output=True, text=True, env=helpers.cpu_env(devices), check=False)


def test_one_and_four_devices_and_the_staged_step_give_the_same_loss_curve(tiny_config,
                                                                            tmp_path):
  overrides = ['--config.train.batch_size=4', '--config.train.num_epochs=3',
               '--config.train.log_every_steps=1']
  curves = []
  for devices, step_mode in ((1, 'fused'), (4, 'fused'), (4, 'staged')):
    workdir = str(tmp_path / f'devices{devices}_{step_mode}')
    result = _train_cli(workdir, tiny_config, *overrides, f'--config.train.step_mode={step_mode}',
                        devices=devices)
    assert result.returncode == 0, result.stderr[-2000:]
    curves.append([r['loss'] for r in _metrics(workdir) if r['kind'] == 'train'])
  assert len(curves[0]) == 3
  np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
  np.testing.assert_allclose(curves[0], curves[2], rtol=1e-4)


def test_batch_not_divisible_by_devices_is_refused(tiny_config, tmp_path):
  result = _train_cli(str(tmp_path / 'w'), tiny_config, '--config.train.batch_size=3',
                      devices=2)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      'error: train.batch_size=3 must be a positive multiple of the 2 devices (each device '
      'takes an equal share)')


def test_top_level_data_dir_is_the_data_section_field(tiny_config, tmp_path):
  missing = tmp_path / 'no_such_brats_folder'
  result = _train_cli(str(tmp_path / 'w'), tiny_config, f'--config.data_dir={missing}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == f'error: data dir {missing}: not a directory'


@pytest.mark.parametrize('override,message', [
    ('--config.model.widht=3', 'error: unknown config field widht'),
    ('--config.train.batch_size=abc',
     "error: flag --config.train.batch_size=abc: invalid literal for int() with base 10: 'abc'"),
    ('--config=configs/no_such_config.py', 'error: Configuration is not available'),
    ('--no_such_flag=1', "error: Unknown command line flag 'no_such_flag'"),
])
def test_config_and_flag_errors_are_one_line(tiny_config, tmp_path, override, message):
  result = _train_cli(str(tmp_path / 'w'), tiny_config, override)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line, no traceback
  assert result.stderr.startswith(message)
  assert not os.path.exists(tmp_path / 'w')


def test_non_finite_loss_stops_with_step_and_cases(tiny_config, tmp_path):
  tiny_config.train.learning_rate = 1e38
  with pytest.raises(train_lib.TrainingError) as info:
    train_lib.train_and_evaluate(tiny_config, str(tmp_path / 'w'))
  message = str(info.value)
  assert message.startswith('non-finite training loss (')
  assert 'batch cases: SynthBraTS_' in message
  assert '\n' not in message


def test_cosine_schedule_warms_up_peaks_and_decays_to_zero(tiny_config):
  tiny_config.train.learning_rate = 2e-3
  tiny_config.train.warmup_steps = 10
  schedule = train_lib.learning_rate_schedule(tiny_config.train, total_steps=110)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(1e-3)
  assert float(schedule(10)) == pytest.approx(2e-3)
  assert float(schedule(60)) == pytest.approx(1e-3)
  assert float(schedule(110)) == pytest.approx(0.0, abs=1e-12)
  tiny_config.train.schedule = 'constant'
  assert train_lib.learning_rate_schedule(tiny_config.train, total_steps=110) == 2e-3


def test_logged_learning_rate_follows_the_schedule(full_run):
  config, workdir, _ = full_run
  schedule = train_lib.learning_rate_schedule(config.train, total_steps=12)
  logged = [(r['step'], r['learning_rate']) for r in _metrics(workdir) if r['kind'] == 'train']
  assert logged[0] == (1, 0.0)  # the first step runs at warm-up's zero
  for step, rate in logged:
    assert rate == pytest.approx(float(schedule(step - 1)))


def test_unknown_schedule_is_refused(tiny_config, tmp_path):
  tiny_config.train.schedule = 'linear'
  with pytest.raises(train_lib.TrainingError, match="train.schedule must be one of"):
    train_lib.train_and_evaluate(tiny_config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_files_load(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.train.optimizer == 'adam'
  assert len(config.data.image_size) == 3
  config.lock()
  with pytest.raises(AttributeError):
    config.model.widht = 3


def test_paper_config_is_the_papers():
  from configs import baseline
  from configs import default

  config = default.get_config()
  assert tuple(config.data.image_size) == (128, 128, 128)
  assert (config.model.base_width, config.model.depth, config.model.bridge_width) == (64, 4, 1024)
  assert (config.model.aspp_features, tuple(config.model.aspp_rates)) == (256, (6, 12, 18))
  assert (config.train.learning_rate, config.train.batch_size, config.train.num_epochs,
          config.train.loss) == (1e-4, 1, 120, 'ce')
  assert config.model.use_aspp and not baseline.get_config().model.use_aspp


@pytest.mark.parametrize('name', ['paper_gpu', 'paper_tpu'])
def test_accelerator_configs_keep_the_papers_model_data_and_optimizer(name):
  from configs import default

  paper = default.get_config()
  config = importlib.import_module(f'configs.{name}').get_config()
  assert config.model.dtype == 'bfloat16' and config.model.conv_impl == 'auto'
  for section, field in [('data', 'image_size'), ('data', 'split_fractions'),
                         ('model', 'base_width'), ('model', 'aspp_rates'), ('model', 'norm'),
                         ('train', 'learning_rate'), ('train', 'loss'), ('train', 'num_epochs'),
                         ('train', 'schedule')]:
    assert config[section][field] == paper[section][field], (section, field)


_PICKLE_APIS = ('import pickle', 'cloudpickle', 'import dill', 'joblib', 'import shelve',
                'import marshal', 'allow_pickle=True', 'torch.load(')


def test_checkpoints_caches_and_logs_hold_no_pickle(full_run):
  # Loading a pickle runs code: only orbax/tensorstore, JSON, NIfTI and TFRecord are written.
  config, workdir, _ = full_run
  checked = 0
  for root in (workdir, config.data.prepared_dir, config.data.synthetic_dir):
    for folder, _, names in os.walk(root):
      for name in names:
        with open(os.path.join(folder, name), 'rb') as stream:
          head = stream.read(2)
        assert not (head[:1] == b'\x80' and head[1:] in (b'\x02', b'\x03', b'\x04', b'\x05')), \
            os.path.join(folder, name)
        checked += 1
  assert checked > 50
  for package in ('aspp_resunet', 'data_pipelines', 'configs'):
    for folder, _, names in os.walk(os.path.join(REPO, package)):
      for name in names:
        if name.endswith('.py'):
          text = open(os.path.join(folder, name)).read()
          assert not [api for api in _PICKLE_APIS if api in text], os.path.join(folder, name)
