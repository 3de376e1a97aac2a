"""Tests of the benchmarks' shared code (benchmarks/common.py): arithmetic and workers."""

import os
import sys

import pytest

from aspp_resunet import host_memory
from benchmarks import common


def test_turn_time_ratios_compare_each_turn_after_its_first_step():
  ours = [[9.0, 2.0, 4.0], [9.0, 6.0, 6.0], [5.0]]
  theirs = [[1.0, 1.0, 2.0], [1.0, 4.0, 2.0], [2.0]]
  # Medians after the first step: 3 / 1.5, 6 / 3; a one-step turn counts its step.
  assert common.turn_time_ratios(ours, theirs) == [2.0, 2.0, 2.5]


def test_turn_time_ratios_need_as_many_turns_on_both_sides():
  with pytest.raises(ValueError, match='2 turns of ours against 1'):
    common.turn_time_ratios([[1.0], [1.0]], [[1.0]])


def test_median_step_seconds_pools_the_chosen_steps_of_every_turn():
  turns = [[9.0, 1.0, 2.0], [7.0, 3.0, 4.0], [5.0]]
  assert common.median_step_seconds(turns, 1) == 3.0  # 1, 2, 3, 4 and the one-step turn's 5
  assert common.median_step_seconds(turns, 0, 1) == 7.0  # the first steps: 9, 7, 5
  assert common.median_step_seconds(turns, 0) == 4.0  # all seven steps


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_worker(code):
  """A Python worker process running `code` with this checkout importable."""
  return [sys.executable, '-c', f'import sys; sys.path.insert(0, {_ROOT!r}); {code}']


def test_worker_answers_its_info_each_request_and_its_closing(capsys):
  worker = common.Worker('echo', _python_worker(
      "from benchmarks import common; print('worker log line', flush=True); "
      "common.serve({'ready': 1}, lambda request: {'echo': request}, lambda: {'bye': 2})"))
  assert worker.info == {'ready': 1}
  assert worker.ask('case') == {'echo': 'case'}
  assert worker.ask('step') == {'echo': 'step'}
  assert worker.finish() == {'bye': 2}
  assert worker.process.returncode == 0
  assert 'worker log line' in capsys.readouterr().out  # its own output passed on


def test_worker_that_dies_before_answering_is_named_with_its_exit_code():
  with pytest.raises(SystemExit, match='the torch worker exited with 3 before answering'):
    common.Worker('torch', _python_worker('sys.exit(3)'))


def test_torch_environment_drops_only_the_pad_our_restart_added():
  added = f'{host_memory.TOP_PAD_TUNABLE}={host_memory.TOP_PAD_BYTES}'
  env = common.torch_environment({'GLIBC_TUNABLES': f'glibc.malloc.hugetlb=1:{added}', 'A': '1'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1', 'A': '1'}
  own_pad = {'GLIBC_TUNABLES': 'glibc.malloc.top_pad=4096'}
  assert common.torch_environment(own_pad) == own_pad


def test_config_overrides_are_the_config_flags_given():
  argv = ['prog', '--config=configs/demo.py', '--config.model.dtype=bfloat16',
          '--steps=3', '--config.data.image_size=96,96,96']
  assert common.config_overrides(argv) == {'model.dtype': 'bfloat16',
                                           'data.image_size': '96,96,96'}
