"""Multi-process data parallel: 2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from aspp_resunet import checkpointing
from aspp_resunet import distributed
from aspp_resunet import eval_lib
from aspp_resunet import models
from aspp_resunet import train_lib
from tests import helpers

REPO = helpers.REPO
STEPS = 4  # 6 training cases, global batch 4: one step per epoch


def _free_port():
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _command(workdir, config, *extra):
  return helpers.train_command(
      workdir, config, '--config.train.batch_size=4', f'--config.train.num_epochs={STEPS}',
      '--config.train.schedule=constant', '--config.train.log_every_steps=1', *extra)


_env = helpers.cpu_env


def _two_processes(argv):
  """Runs `argv` as processes 0 and 1 (2 CPU devices each) on loopback; [(stdout, stderr)]."""
  port = _free_port()
  processes = [subprocess.Popen(
      argv + [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
              f'--process_id={index}'], cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for index in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-2000:]
  return outputs


def _one_then_two_processes(argv, tmp_path):
  """Runs `argv` in one process into tmp_path/one, then in two into tmp_path/two."""
  single = subprocess.run(argv + [f'--output_dir={tmp_path / "one"}'], cwd=REPO, env=_env(1),
                          capture_output=True, text=True, check=False)
  assert single.returncode == 0, single.stderr[-2000:]
  return _two_processes(argv + [f'--output_dir={tmp_path / "two"}'])


def _run_two_processes(workdir, config, *extra):
  return _two_processes(_command(workdir, config, *extra))


def _train_losses(workdir):
  with open(os.path.join(workdir, train_lib.METRICS_FILE)) as stream:
    records = [json.loads(line) for line in stream]
  return [(r['step'], r['loss']) for r in records if r['kind'] == 'train']


def _final_params(workdir):
  config = eval_lib.load_workdir_config(workdir)
  _, variables, record = eval_lib.restore_model(config, workdir, 'latest')
  return record['step'], jax.tree_util.tree_leaves(variables)


@pytest.fixture(scope='module')
def single_process_run(tmp_path_factory, data_root):
  from configs import test as test_config

  config = test_config.get_config()
  config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
  config.data.prepared_dir = os.path.join(data_root, 'prepared')
  workdir = str(tmp_path_factory.mktemp('single') / 'w')
  result = subprocess.run(_command(workdir, config), cwd=REPO, env=_env(4), capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return config, workdir


def test_two_processes_match_one_process_and_resume(single_process_run, tmp_path):
  config, single = single_process_run
  multi = str(tmp_path / 'multi')
  # Interrupted after 2 steps, then resumed by a second launch of both processes.
  first = _run_two_processes(multi, config, '--config.train.max_steps=2')
  assert sorted(os.listdir(os.path.join(multi, checkpointing.LATEST))) == ['1', '2']
  second = _run_two_processes(multi, config)
  assert 'resuming from step 2' in second[0][0]
  # Only process 0 reports.
  assert 'trained to step' in first[0][0] and 'trained to step' not in first[1][0]

  expected, got = _train_losses(single), _train_losses(multi)
  assert [s for s, _ in got] == list(range(1, STEPS + 1)) == [s for s, _ in expected]
  np.testing.assert_allclose([v for _, v in got], [v for _, v in expected], rtol=1e-5)
  single_step, single_leaves = _final_params(single)
  multi_step, multi_leaves = _final_params(multi)
  assert single_step == multi_step == STEPS
  # Equal up to the order in which the 4 devices' partial sums are added (in process vs gloo),
  # which Adam's first steps amplify where a gradient is near 0: up to 2.5e-6 measured before
  # BatchNorm summed over depth slices, 1.6e-5 after (steps move parameters by ~1e-3).
  for a, b in zip(single_leaves, multi_leaves):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
  # The parameters moved: the comparison is not between two initialisations.
  init_config = eval_lib.load_workdir_config(single)
  initial = train_lib.create_train_state(init_config, models.create_model(init_config.model),
                                         jax.random.key(init_config.seed, impl='rbg'))
  initial_leaves = jax.tree_util.tree_leaves({'params': initial.params,
                                              'batch_stats': initial.batch_stats})
  assert not all(np.allclose(np.asarray(a), np.asarray(b))
                 for a, b in zip(single_leaves, initial_leaves))


def test_two_process_evaluation_shares_cases_and_gathers_them(single_process_run, tmp_path):
  config, workdir = single_process_run
  argv = [sys.executable, 'eval.py', '--config=configs/test.py', f'--workdir={workdir}',
          f'--config.data.synthetic_dir={config.data.synthetic_dir}',
          f'--config.data.prepared_dir={config.data.prepared_dir}', '--split=train',
          '--checkpoint=latest']
  outputs = _one_then_two_processes(argv, tmp_path)
  assert '6 train cases' in outputs[0][0] and 'train cases' not in outputs[1][0]
  for name in ('per_case.csv', 'per_case_model_resolution.csv'):
    assert (tmp_path / 'one' / name).read_text() == (tmp_path / 'two' / name).read_text()
  assert sorted(os.listdir(tmp_path / 'two')) == sorted(os.listdir(tmp_path / 'one'))


def test_two_process_predict_shares_cases(single_process_run, tmp_path):
  config, workdir = single_process_run
  argv = [sys.executable, '-m', 'aspp_resunet.predict', f'--workdir={workdir}',
          f'--input_dir={config.data.synthetic_dir}', '--checkpoint=latest']
  outputs = _one_then_two_processes(argv, tmp_path)
  names = sorted(os.listdir(tmp_path / 'one'))
  assert len(names) == 8 and sorted(os.listdir(tmp_path / 'two')) == names
  assert 'wrote 8 segmentation(s)' in outputs[0][0] and 'wrote' not in outputs[1][0]
  for index, name in enumerate(names):  # sorted case k was written by process k % 2
    assert f'{name[:-len(".nii.gz")]}: ' in outputs[index % 2][0]
    one = nib.load(tmp_path / 'one' / name)
    two = nib.load(tmp_path / 'two' / name)
    np.testing.assert_array_equal(np.asarray(one.dataobj), np.asarray(two.dataobj))


def test_settings_from_flags_and_environment():
  assert distributed.settings(environ={})[0] == 'off'
  mode, address, count, index = distributed.settings(environ={
      distributed.ENV_COORDINATOR: '10.0.0.1:1234', distributed.ENV_NUM_PROCESSES: '8',
      distributed.ENV_PROCESS_ID: '3'})
  assert (mode, address, count, index) == ('explicit', '10.0.0.1:1234', 8, 3)
  # Flags win over the environment.
  assert distributed.settings(process_id=5, environ={
      distributed.ENV_COORDINATOR: 'h:1', distributed.ENV_NUM_PROCESSES: '8',
      distributed.ENV_PROCESS_ID: '3'})[3] == 5
  assert distributed.settings('auto', environ={})[0] == 'auto'


@pytest.mark.parametrize('kwargs,message', [
    ({'coordinator_address': 'h:1', 'num_processes': 2}, 'needs --coordinator_address'),
    ({'coordinator_address': 'h:1', 'num_processes': 2, 'process_id': 2}, 'not in [0, 2)'),
    ({'mode': 'mpi'}, 'distributed must be one of'),
])
def test_incomplete_settings_are_refused(kwargs, message):
  with pytest.raises(distributed.DistributedError, match=message.replace('[', r'\[')
                     .replace(')', r'\)')):
    distributed.settings(environ={}, **kwargs)


def test_incomplete_launch_exits_with_one_line(tmp_path, tiny_config):
  result = subprocess.run(
      _command(str(tmp_path / 'w'), tiny_config, '--coordinator_address=127.0.0.1:1'),
      cwd=REPO, env=_env(1), capture_output=True, text=True, check=False)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith(
      'error: multi-process launch needs --coordinator_address')
