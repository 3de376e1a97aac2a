"""Faults: the trainer killed with SIGKILL at several moments resumes to the same parameters."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np

from aspp_resunet import checkpointing
from aspp_resunet import eval_lib
from aspp_resunet import train_lib
from tests import helpers

REPO = helpers.REPO
TMP_MARKER = '.orbax-checkpoint-tmp'


def _command(workdir, config):
  return helpers.train_command(workdir, config, '--config.train.log_every_steps=1')


def _env():
  return helpers.cpu_env(1)


def _train_steps_logged(workdir):
  try:
    with open(os.path.join(workdir, train_lib.METRICS_FILE)) as stream:
      return sum(1 for line in stream if '"kind": "train"' in line)
  except OSError:
    return 0


def _saving(workdir):
  for series in (checkpointing.LATEST, checkpointing.BEST):
    try:
      if any(TMP_MARKER in name for name in os.listdir(os.path.join(workdir, series))):
        return True
    except OSError:
      continue
  return False


def _run_and_kill(workdir, config, moment, timeout=300):
  """Starts the trainer and SIGKILLs it when `moment(workdir)` is true; True if it was killed."""
  process = subprocess.Popen(_command(workdir, config), cwd=REPO, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + timeout
  try:
    while process.poll() is None and time.time() < deadline:
      if moment(workdir):
        process.send_signal(signal.SIGKILL)
        process.wait()
        return True
      time.sleep(0.002)
    return False
  finally:
    if process.poll() is None:
      process.kill()
      process.wait()


def _final(workdir):
  config = eval_lib.load_workdir_config(workdir)
  _, variables, record = eval_lib.restore_model(config, workdir, 'latest')
  return record['step'], [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(variables)]


def test_sigkill_at_several_moments_resumes_to_the_uninterrupted_parameters(tiny_config,
                                                                             tmp_path):
  reference = str(tmp_path / 'reference')
  result = subprocess.run(_command(reference, tiny_config), cwd=REPO, env=_env(),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]

  workdir = str(tmp_path / 'killed')
  moments = {
      'mid-epoch 1, before any checkpoint': lambda w: _train_steps_logged(w) >= 3,
      'during a checkpoint save': _saving,
      'mid-epoch 2, after checkpoints': lambda w: _train_steps_logged(w) >= 9,
  }
  killed = {name: _run_and_kill(workdir, tiny_config, moment)
            for name, moment in moments.items()}
  print(killed)  # shown with -s: whether the short save window was caught
  # The save window is short; the two step-based moments are always reached.
  assert killed['mid-epoch 1, before any checkpoint']
  assert killed['mid-epoch 2, after checkpoints']
  result = subprocess.run(_command(workdir, tiny_config), cwd=REPO, env=_env(),
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert not any(TMP_MARKER in name for series in (checkpointing.LATEST, checkpointing.BEST)
                 for name in os.listdir(os.path.join(workdir, series)))

  expected_step, expected = _final(reference)
  got_step, got = _final(workdir)
  assert got_step == expected_step == 12
  for a, b in zip(expected, got):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU
  with open(os.path.join(workdir, train_lib.METRICS_FILE)) as stream:
    steps = [r['step'] for r in map(json.loads, stream) if r['kind'] == 'train']
  assert steps == list(range(1, 13))  # killed steps re-run, logged once


def test_sigkill_during_dataset_preparation_then_rerun_completes(tiny_config, tmp_path):
  tiny_config.data.prepared_dir = str(tmp_path / 'prepared')  # a fresh preparation
  workdir = str(tmp_path / 'w')

  def preparing(_):
    for _, dirs, _ in os.walk(tiny_config.data.prepared_dir):
      if any(name.startswith('incomplete.') for name in dirs):
        return True
    return False

  assert _run_and_kill(workdir, tiny_config, preparing)
  result = subprocess.run(_command(workdir, tiny_config) + ['--config.train.max_steps=2'],
                          cwd=REPO, env=_env(), capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  builder = train_lib.prepare_dataset(tiny_config.data)
  assert sum(builder.info.splits[s].num_examples for s in ('train', 'validation', 'test')) == 8
