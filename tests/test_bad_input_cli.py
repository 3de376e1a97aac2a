"""The bad-input corpus through every command line: one line per bad case, nothing written."""

import functools
import os
import subprocess
import sys

import pytest

from tests import bad_inputs
from tests import helpers

GOOD_CASES = 8  # enough for a 6 / 1 / 1 split of the valid cases


@functools.cache
def _as_user():
  """argv prefix that runs a command without root's right to read any file (or None)."""
  if os.geteuid() != 0:
    return []
  # As root, chmod 0 does not stop a read: map root to an ordinary user in a user namespace,
  # where root's files (the repository, the test folders) are that user's own.
  prefix = ['unshare', '--user', '--map-user=1000', '--']
  try:
    probe = subprocess.run([*prefix, 'true'], capture_output=True, check=False)
  except FileNotFoundError:
    return None
  return prefix if probe.returncode == 0 else None


def _corpus_cases():
  cases = bad_inputs.CASES + (bad_inputs.NON_UTF8,)
  if _as_user() is None:  # cannot make a file unreadable to the commands
    return tuple(c for c in cases if c.name != 'unreadable_file')
  return cases


def _run(*argv):
  result = subprocess.run([*_as_user(), sys.executable, *argv], cwd=helpers.REPO,
                          capture_output=True, text=True, check=False)
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result


def _train(*overrides):
  return _run('train.py', '--config=configs/test.py', *overrides)


def _assert_each_bad_case_once(output, for_predict=False):
  """Every expected bad case has exactly one line in `output`, and nothing else is a case line.

  Returns:
    The number of bad cases expected.
  """
  lines = [line.strip() for line in output.splitlines() if line.strip().startswith('case ')]
  expected = [c for c in _corpus_cases() if not (for_predict and c.segmentation_only)]
  assert len(lines) == len(expected), '\n'.join(lines)
  for bad_case in expected:
    found = [line for line in lines if bad_case.matches(line, bad_inputs.bad_case_id(bad_case))]
    assert len(found) == 1, (bad_case.name, lines)
  return len(expected)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """A folder of GOOD_CASES valid cases and every bad case of the corpus."""
  root = tmp_path_factory.mktemp('corpus')
  data_dir = str(root / 'cases')
  bad_inputs.write_corpus(data_dir, GOOD_CASES, _corpus_cases())
  return data_dir


@pytest.fixture(scope='module')
def trained(corpus, tmp_path_factory):
  """A workdir trained with data.skip_invalid=True on the corpus (the valid cases only)."""
  root = tmp_path_factory.mktemp('trained')
  workdir, prepared = str(root / 'workdir'), str(root / 'prepared')
  result = _train(f'--workdir={workdir}', f'--config.data.data_dir={corpus}',
                  f'--config.data.prepared_dir={prepared}', '--config.data.skip_invalid=True',
                  '--config.train.num_epochs=1')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, prepared, result.stdout


def test_validate_lists_every_bad_case_in_one_line(corpus):
  result = _run('-m', 'data_pipelines.validate', f'--data_dir={corpus}')
  assert result.returncode == 1
  bad = _assert_each_bad_case_once(result.stdout)
  assert result.stdout.splitlines()[-1] == (f'{GOOD_CASES} of {GOOD_CASES + bad} cases valid, '
                                            f'{bad} invalid')
  skipping = _run('-m', 'data_pipelines.validate', f'--data_dir={corpus}', '--skip_invalid')
  assert skipping.returncode == 0
  assert skipping.stdout == result.stdout


def test_training_refuses_the_corpus_before_writing_anything(corpus, tmp_path):
  workdir, prepared = tmp_path / 'workdir', tmp_path / 'prepared'
  result = _train(f'--workdir={workdir}', f'--config.data.data_dir={corpus}',
                  f'--config.data.prepared_dir={prepared}')
  assert result.returncode == 1
  bad = _assert_each_bad_case_once(result.stdout)
  (error,) = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert error.startswith(f'error: {bad} invalid case(s) in {corpus}, listed above')
  assert not workdir.exists() and not prepared.exists()


def test_training_with_skip_invalid_uses_the_good_cases_and_lists_the_bad(trained):
  _, prepared, stdout = trained
  bad = _assert_each_bad_case_once(stdout)
  assert f'{bad} invalid case(s) left out (data.skip_invalid):' in stdout
  assert 'trained to step 6;' in stdout  # 6 training cases of the 8 valid ones, batch 1


def test_eval_refuses_bad_cases_and_evaluates_the_good_ones(corpus, trained, tmp_path):
  workdir, prepared, _ = trained
  eval_args = ('eval.py', '--config=configs/test.py', f'--workdir={workdir}',
               f'--config.data.data_dir={corpus}')
  out = tmp_path / 'eval'
  result = _run(*eval_args, f'--config.data.prepared_dir={tmp_path / "fresh"}',
                f'--output_dir={out}')
  assert result.returncode == 1
  _assert_each_bad_case_once(result.stdout)
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')
  assert not out.exists() and not (tmp_path / 'fresh').exists()
  result = _run(*eval_args, f'--config.data.prepared_dir={prepared}',
                '--config.data.skip_invalid=True', f'--output_dir={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert (out / 'per_case.csv').read_text().count('Good_') == 1  # the one test case


def test_predict_writes_nothing_unless_skip_invalid(corpus, trained, tmp_path):
  workdir, _, _ = trained
  out = tmp_path / 'predicted'
  args = ('-m', 'aspp_resunet.predict', f'--workdir={workdir}', f'--input_dir={corpus}',
          f'--output_dir={out}')
  result = _run(*args)
  assert result.returncode == 1
  bad = _assert_each_bad_case_once(result.stdout, for_predict=True)
  assert result.stderr.strip() == (f'error: {bad} invalid case(s) in {corpus}; nothing written '
                                   '(fix them, or --skip_invalid to segment the others)')
  assert not out.exists()
  result = _run(*args, '--skip_invalid')
  assert result.returncode == 0, result.stderr[-3000:]
  segmentation_only = sum(c.segmentation_only for c in _corpus_cases())
  written = GOOD_CASES + segmentation_only  # predict does not read segmentations
  assert len(os.listdir(out)) == written
  tail = result.stdout.splitlines()[-bad - 2:]
  assert tail[0] == f'wrote {written} segmentation(s) to {out}'
  assert tail[1] == f'{bad} invalid case(s) skipped (--skip_invalid):'
  _assert_each_bad_case_once('\n'.join(tail[2:]), for_predict=True)


def _folder_problem(kind, root):
  """A data folder with a problem of the folder as a whole; returns (path, expected message)."""
  data_dir = os.path.join(root, kind)
  if kind == 'no_cases':
    os.makedirs(os.path.join(data_dir, 'notes'))
    return data_dir, f'error: data dir {data_dir}: no case folders with brats2020 files'
  if kind == 'missing':
    return data_dir, f'error: data dir {data_dir}: not a directory'
  helpers.write_case(os.path.join(data_dir, 'site_a'), 'Case1')
  helpers.write_case(os.path.join(data_dir, 'site_b'), 'Case1', seed=1)
  return data_dir, f'error: case Case1: duplicate case id in {data_dir}/site_b/Case1 and'


@pytest.mark.parametrize('kind', ['no_cases', 'missing', 'duplicate_case_ids'])
@pytest.mark.parametrize('command', ['validate', 'train', 'eval', 'predict'])
def test_folder_problems_are_one_line_errors(trained, tmp_path, command, kind):
  workdir, _, _ = trained
  data_dir, message = _folder_problem(kind, str(tmp_path))
  out = tmp_path / 'out'
  argv = {
      'validate': ('-m', 'data_pipelines.validate', f'--data_dir={data_dir}'),
      'train': ('train.py', '--config=configs/test.py', f'--workdir={out}',
                f'--config.data.data_dir={data_dir}', f'--config.data.prepared_dir={out}'),
      'eval': ('eval.py', '--config=configs/test.py', f'--workdir={workdir}',
               f'--config.data.data_dir={data_dir}', f'--config.data.prepared_dir={out}',
               f'--output_dir={out}'),
      'predict': ('-m', 'aspp_resunet.predict', f'--workdir={workdir}',
                  f'--input_dir={data_dir}', f'--output_dir={out}'),
  }[command]
  result = _run(*argv)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1 and errors[0].startswith(message), result.stderr[-2000:]
  assert not out.exists()


def test_brats2023_label_4_through_validate_and_train(tmp_path):
  bad_case = bad_inputs.LABEL_4_IN_BRATS2023
  data_dir = str(tmp_path / 'cases')
  helpers.write_case(data_dir, 'Good', scheme_name='brats2023')
  bad_case.write(data_dir, 'Bad')
  line = bad_case.expected('Bad')
  result = _run('-m', 'data_pipelines.validate', f'--data_dir={data_dir}', '--scheme=brats2023')
  assert result.returncode == 1 and result.stdout.splitlines()[0] == line
  result = _train(f'--workdir={tmp_path / "workdir"}', f'--config.data.data_dir={data_dir}',
                  f'--config.data.prepared_dir={tmp_path / "prepared"}',
                  '--config.data.scheme=brats2023')
  assert result.returncode == 1 and line in result.stdout.splitlines()
  assert not (tmp_path / 'workdir').exists()

