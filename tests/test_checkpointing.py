"""Tests for the checkpoint series: save/restore, partial saves, damaged newest checkpoint."""

import os
import shutil

import numpy as np
import pytest

from aspp_resunet import checkpointing


def _state(value):
  return {'params': {'w': np.full((3, 2), value, np.float32)}, 'step': np.asarray(value, np.int32)}


def test_save_and_restore_newest(tmp_path):
  checkpoints = checkpointing.Checkpoints(str(tmp_path), keep_latest=2)
  for step in (1, 2, 3):
    checkpoints.save(checkpointing.LATEST, step, _state(step), {'epoch': step})
  assert checkpoints.steps(checkpointing.LATEST) == [2, 3]
  state, record = checkpoints.restore(checkpointing.LATEST, _state(0))
  np.testing.assert_array_equal(state['params']['w'], _state(3)['params']['w'])
  assert record == {'epoch': 3}
  assert checkpoints.restore(checkpointing.BEST, _state(0)) is None
  checkpoints.close()


def test_interrupted_save_folders_are_removed_on_open(tmp_path):
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(checkpointing.LATEST, 1, _state(1), {'epoch': 1})
  checkpoints.close()
  partial = tmp_path / checkpointing.LATEST / '2.orbax-checkpoint-tmp-1234'
  partial.mkdir()
  (partial / 'junk').write_text('x')
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  assert not partial.exists()
  assert checkpoints.steps(checkpointing.LATEST) == [1]
  checkpoints.close()


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  checkpoints = checkpointing.Checkpoints(str(tmp_path), keep_latest=3)
  for step in (1, 2):
    checkpoints.save(checkpointing.LATEST, step, _state(step), {'epoch': step})
  newest = tmp_path / checkpointing.LATEST / '2' / 'state'
  shutil.rmtree(newest)
  os.makedirs(newest)
  state, record = checkpoints.restore(checkpointing.LATEST, _state(0))
  assert record == {'epoch': 1}
  np.testing.assert_array_equal(state['params']['w'], _state(1)['params']['w'])
  assert any('cannot be restored' in r.getMessage() for r in caplog.records)
  checkpoints.close()


def test_all_damaged_is_an_error_not_a_silent_restart(tmp_path):
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(checkpointing.LATEST, 1, _state(1), {'epoch': 1})
  shutil.rmtree(tmp_path / checkpointing.LATEST / '1' / 'state')
  with pytest.raises(RuntimeError, match='can be restored: damaged'):
    checkpoints.restore(checkpointing.LATEST, _state(0))
  checkpoints.close()


def test_too_little_free_space_is_refused_before_writing(tmp_path, monkeypatch):
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(checkpointing.LATEST, 1, _state(1), {'epoch': 1})
  usage = shutil.disk_usage(str(tmp_path))
  monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=1024))
  with pytest.raises(checkpointing.CheckpointWriteError) as info:
    checkpoints.save(checkpointing.LATEST, 2, _state(2), {'epoch': 2})
  message = str(info.value)
  assert message.startswith('checkpoint checkpoints/2 not written: ')
  assert '0.0 MiB free' in message and 'the previous checkpoints are intact [1]' in message
  assert sorted(os.listdir(tmp_path / checkpointing.LATEST)) == ['1']
  checkpoints.close()


def test_a_failed_write_removes_its_partial_folder_and_keeps_the_previous(tmp_path, monkeypatch):
  checkpoints = checkpointing.Checkpoints(str(tmp_path))
  checkpoints.save(checkpointing.LATEST, 1, _state(1), {'epoch': 1})

  def disk_full_midway(self, step, *args, **kwargs):
    partial = os.path.join(str(self.directory), f'{step}.orbax-checkpoint-tmp-99')
    os.makedirs(partial)
    raise ValueError('RESOURCE_EXHAUSTED: Failed to write 193 bytes to file 4: No space left on '
                     "device [os_error_code='28']\n[tensorstore_spec=...]")

  monkeypatch.setattr(checkpointing.ocp.CheckpointManager, 'save', disk_full_midway)
  with pytest.raises(checkpointing.CheckpointWriteError) as info:
    checkpoints.save(checkpointing.LATEST, 2, _state(2), {'epoch': 2})
  assert str(info.value) == (f'checkpoint checkpoints/2 not written to {tmp_path}/checkpoints '
                             '(no space left on device); the previous checkpoints are intact [1]')
  assert sorted(os.listdir(tmp_path / checkpointing.LATEST)) == ['1']
  monkeypatch.undo()
  state, _ = checkpoints.restore(checkpointing.LATEST, _state(0))
  np.testing.assert_array_equal(state['params']['w'], _state(1)['params']['w'])
  checkpoints.close()
