"""Tests of the benchmarks' shared arithmetic (benchmarks/common.py)."""

import pytest

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
