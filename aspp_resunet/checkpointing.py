"""Orbax checkpoints in the workdir: the latest few (resume) and the best by validation Dice."""

import errno
import logging
import os
import shutil

from flax import serialization
import jax
import orbax.checkpoint as ocp

LATEST = 'checkpoints'
BEST = 'best'
_TMP_MARKER = '.orbax-checkpoint-tmp'
# Free space kept beyond the raw array bytes (metadata, JSON record, file system blocks).
_SPACE_MARGIN = 4 * 2**20


def _remove_partial_saves(directory):
  """Deletes the temporary folders of saves that were interrupted (never read by a restore).

  Done here, synchronously, rather than by orbax's `cleanup_tmp_directories`, whose background
  thread can outlive a short-lived process and fail at interpreter shutdown.
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    if _TMP_MARKER in name:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (the message is one line); earlier ones are intact."""


def _mib(size):
  return f'{size / 2**20:.1f} MiB'


def _write_failure(err):
  text = ' '.join(str(err).split())
  if 'No space left on device' in text or getattr(err, 'errno', None) == errno.ENOSPC:
    return 'no space left on device'
  return text[:300]


def _manager(directory, keep):
  _remove_partial_saves(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, cleanup_tmp_directories=False,
      # Synchronous: a save is complete and renamed into place before training goes on, so a
      # kill at any moment leaves the previous checkpoints intact and the newest one whole.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


class Checkpoints:
  """The workdir's two checkpoint series. Each checkpoint holds the train state (orbax/
  tensorstore arrays) and a JSON record (epoch, step, validation metrics)."""

  def __init__(self, workdir, keep_latest=3):
    self._managers = {LATEST: _manager(os.path.join(workdir, LATEST), keep_latest),
                      BEST: _manager(os.path.join(workdir, BEST), 1)}

  def save(self, which, step, state, record):
    """Saves `state` (a flax struct) and `record` (JSON-able dict) as step `step` of `which`.

    Raises:
      CheckpointWriteError: not enough free space (checked before writing), or the write failed;
        the partial folder is removed and the previous checkpoints are untouched.
    """
    manager = self._managers[which]
    directory = str(manager.directory)
    state_dict = serialization.to_state_dict(state)
    # Checked up front: orbax reports a full disk from many writer threads at once, as pages
    # of tracebacks, after part of the checkpoint is written.
    needed = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state_dict)) + _SPACE_MARGIN
    free = shutil.disk_usage(directory).free
    if free < needed:
      raise CheckpointWriteError(
          f'checkpoint {which}/{step} not written: {directory} has {_mib(free)} free, a checkpoint '
          f'needs up to {_mib(needed)}; the previous checkpoints are intact '
          f'{self.steps(which)} (free space, then rerun to resume)')
    try:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state_dict), record=ocp.args.JsonSave(record)), force=True)
      manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001 - any failed write is reported the same way
      _remove_partial_saves(directory)
      raise CheckpointWriteError(
          f'checkpoint {which}/{step} not written to {directory} ({_write_failure(err)}); the '
          f'previous checkpoints are intact {self.steps(which)}') from None

  def steps(self, which):
    manager = self._managers[which]
    manager.reload()  # what is on disk now (another process may have written)
    return sorted(manager.all_steps())

  def restore(self, which, template, step=None):
    """Restores the newest (or `step`) checkpoint of `which` into the structure of `template`.

    A newest checkpoint that cannot be read is reported and the previous one is tried, so a
    damaged file never silently restarts training from scratch.

    Returns:
      (state, record), or None when the series is empty.

    Raises:
      RuntimeError: checkpoints exist but none can be restored.
    """
    steps = [step] if step is not None else self.steps(which)[::-1]
    if not steps:
      return None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct,
                                      serialization.to_state_dict(template))
    failures = []
    for candidate in steps:
      try:
        restored = self._managers[which].restore(candidate, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
      except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back
        logging.warning('checkpoint %s/%d cannot be restored (%s); trying an older one', which,
                        candidate, ' '.join(str(err).split())[:300])
        failures.append(candidate)
        continue
      state = serialization.from_state_dict(template, restored['state'])
      return state, dict(restored['record'])
    raise RuntimeError(f'no {which} checkpoint of steps {steps} can be restored: damaged, or '
                       f'saved by a different model configuration')

  def close(self):
    for manager in self._managers.values():
      manager.close()
