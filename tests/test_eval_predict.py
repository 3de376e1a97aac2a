"""Tests for inference, eval.py outputs (with the paired comparison) and predict."""

import csv
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from aspp_resunet import inference
from aspp_resunet import metrics
from aspp_resunet import predict
from aspp_resunet import train_lib
from tests import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Inference.

def _toy_logits(images):
  """A fixed 'model': class scores from position-weighted channels (not flip-symmetric)."""
  ramp = jnp.linspace(0.0, 1.0, images.shape[1])[None, :, None, None, None]
  return jnp.concatenate([images[..., :2] * ramp, images[..., 2:] * (1 - ramp)], axis=-1)


def test_sliding_window_equals_whole_volume_when_one_window_covers_it():
  images = jnp.asarray(np.random.default_rng(0).random((1, 8, 8, 8, 4)), jnp.float32)
  whole = inference.whole_volume_probabilities(_toy_logits, images)
  sliding = inference.sliding_window_probabilities(_toy_logits, images, (8, 8, 8))
  np.testing.assert_allclose(sliding, whole, rtol=1e-6)
  bigger = inference.sliding_window_probabilities(_toy_logits, images, (16, 16, 16))
  np.testing.assert_allclose(bigger, whole, rtol=1e-6)


def test_sliding_window_of_a_pointwise_model_equals_whole_volume():
  pointwise = lambda x: x * 3.0  # noqa: E731  (no spatial context: windows cannot differ)
  images = jnp.asarray(np.random.default_rng(1).random((2, 12, 10, 9, 4)), jnp.float32)
  np.testing.assert_allclose(
      inference.sliding_window_probabilities(pointwise, images, (6, 5, 4), overlap=0.5),
      inference.whole_volume_probabilities(pointwise, images), rtol=1e-5)


def test_mirror_tta_on_a_symmetric_input_equals_plain_prediction_of_symmetric_model():
  symmetric_model = lambda x: x + jnp.flip(x, (1, 2, 3))  # noqa: E731  (flip-equivariant)
  images = jnp.asarray(np.random.default_rng(2).random((1, 6, 6, 6, 4)), jnp.float32)
  np.testing.assert_allclose(
      inference.whole_volume_probabilities(symmetric_model, images, mirror=True),
      inference.whole_volume_probabilities(symmetric_model, images), rtol=1e-6)
  # For a model that is not flip-equivariant TTA changes the result: it is really applied.
  assert not np.allclose(inference.whole_volume_probabilities(_toy_logits, images, mirror=True),
                         inference.whole_volume_probabilities(_toy_logits, images))


def test_window_starts_cover_the_axis():
  assert inference.window_starts(10, 10, 0.5) == [0]
  starts = inference.window_starts(20, 8, 0.5)
  assert starts[0] == 0 and starts[-1] == 12
  assert all(b - a <= 4 for a, b in zip(starts, starts[1:]))


def test_make_predict_fn_returns_classes():
  fn = inference.make_predict_fn(lambda v, x, train: _toy_logits(x), mode='whole')
  classes, probs = fn({}, jnp.ones((1, 4, 4, 4, 4)))
  assert classes.dtype == jnp.uint8 and classes.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match='inference mode'):
    inference.make_predict_fn(lambda v, x, train: x, mode='patches')


# Trained tiny workdirs.

@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_root):
  """Two tiny one-epoch runs: ASPP and the baseline."""
  from configs import test as test_config

  workdirs = {}
  for name, use_aspp in (('aspp', True), ('baseline', False)):
    config = test_config.get_config()
    config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
    config.data.prepared_dir = os.path.join(data_root, 'prepared')
    config.train.num_epochs = 1
    config.model.use_aspp = use_aspp
    workdirs[name] = str(tmp_path_factory.mktemp(name))
    train_lib.train_and_evaluate(config, workdirs[name])
  return config, workdirs


def _eval_cli(config, workdir, *extra):
  return subprocess.run(
      [sys.executable, 'eval.py', '--config=configs/test.py', f'--workdir={workdir}',
       f'--config.data.synthetic_dir={config.data.synthetic_dir}',
       f'--config.data.prepared_dir={config.data.prepared_dir}', *extra],
      cwd=REPO, capture_output=True, text=True, check=False)


def test_eval_writes_every_output_and_comparison(trained, tmp_path):
  config, workdirs = trained
  out = str(tmp_path / 'eval')
  result = _eval_cli(config, workdirs['aspp'], f'--compare_workdir={workdirs["baseline"]}',
                     f'--output_dir={out}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'report' in result.stdout
  for name in ('per_case.csv', 'per_case_model_resolution.csv', 'summary.json', 'report.md',
               'comparison.json', 'boxplots.png', 'training_curves.png', 'qualitative.png'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, 'per_case.csv')) as stream:
    rows = list(csv.DictReader(stream))
  assert list(rows[0]) == ['case_id', *metrics.METRIC_COLUMNS]
  assert len(rows) == 1 and rows[0]['case_id'].startswith('SynthBraTS_')
  summary = json.load(open(os.path.join(out, 'summary.json')))
  assert set(summary['original']['dice_wt']) == {'n', 'mean', 'std', 'median', 'q1', 'q3'}
  comparison = json.load(open(os.path.join(out, 'comparison.json')))
  entry = comparison['metrics']['dice_wt']
  assert set(entry) >= {'mean_difference', 'ci', 'wilcoxon', 'n'}
  assert set(entry['wilcoxon']) >= {'statistic', 'p_value', 'method', 'n'}
  report_text = open(os.path.join(out, 'report.md')).read()
  assert 'Table 1. Dice per region, validation set' in report_text
  assert 'Table 2. Dice per region, test set' in report_text
  assert '| Wilcoxon (p) |' in report_text
  assert '| Res-UNet |' in report_text and '| Res-UNet+ASPP |' in report_text
  assert 'HD95 per region' in report_text


def test_eval_without_checkpoint_is_a_clear_error(trained, tmp_path):
  config, _ = trained
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / train_lib.CONFIG_FILE).write_text(config.to_json())
  result = _eval_cli(config, str(empty))
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: '), result.stderr[-3000:]
  assert 'no best checkpoint' in result.stderr
  assert 'Traceback' not in result.stderr


def test_predict_writes_original_geometry_and_scheme_labels(trained, tmp_path):
  _, workdirs = trained
  data = tmp_path / 'new_patients'
  helpers.write_case(str(data), 'Patient1', with_seg=False, shape=(40, 36, 30))
  helpers.write_case(str(data), 'Patient2', with_seg=False, shape=(30, 28, 20))
  # Real headers can have other spacings: the output keeps them.
  for key in ('t1', 't1ce', 't2', 'flair'):
    path = helpers.file_of(str(data / 'Patient2'), key)
    image = nib.load(path)
    affine = image.affine @ np.diag([1.2, 1.2, 2.0, 1.0])
    nib.save(nib.Nifti1Image(np.asanyarray(image.dataobj), affine), path)
  out = str(tmp_path / 'out')
  lines = []

  class _Out:
    def write(self, text):
      lines.append(text)

    def flush(self):
      pass

  written, failures = predict.predict_folder(workdirs['aspp'], str(data), out, out=_Out())
  assert (written, failures) == (2, [])
  assert sorted(os.listdir(out)) == ['Patient1.nii.gz', 'Patient2.nii.gz']
  for case_id in ('Patient1', 'Patient2'):
    source = nib.load(helpers.file_of(str(data / case_id), 't1'))
    result = nib.load(os.path.join(out, f'{case_id}.nii.gz'))
    assert result.shape == source.shape
    np.testing.assert_allclose(result.affine, source.affine)
    assert result.header.get_zooms() == source.header.get_zooms()
    if case_id == 'Patient2':
      assert result.header.get_zooms() == (1.2, 1.2, 2.0)
    assert result.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(result.dataobj))) <= {0, 1, 2, 4}


def _predict_cli(workdir, data, out, *extra):
  return subprocess.run(
      [sys.executable, '-m', 'aspp_resunet.predict', f'--workdir={workdir}',
       f'--input_dir={data}', f'--output_dir={out}', *extra], cwd=REPO, capture_output=True,
      text=True, check=False)


def test_predict_cli_with_a_bad_case_writes_nothing_unless_skip_invalid(trained, tmp_path):
  _, workdirs = trained
  data = tmp_path / 'mixed'
  helpers.write_case(str(data), 'Good', with_seg=False)
  helpers.write_case(str(data), 'NoT2', with_seg=False, overrides={'t2': None})
  out = tmp_path / 'out'
  result = _predict_cli(workdirs['aspp'], data, out)
  assert result.returncode == 1, result.stderr[-2000:]
  assert result.stdout.strip() == 'case NoT2: missing t2 (no file ending in _t2.nii.gz or .nii)'
  assert result.stderr.strip() == (f'error: 1 invalid case(s) in {data}; nothing written (fix '
                                   f'them, or --skip_invalid to segment the others)')
  assert not os.path.exists(out) or not os.listdir(out)

  result = _predict_cli(workdirs['aspp'], data, out, '--skip_invalid')
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-3:] == [f'wrote 1 segmentation(s) to {out}',
                        '1 invalid case(s) skipped (--skip_invalid):',
                        '  case NoT2: missing t2 (no file ending in _t2.nii.gz or .nii)']
  assert sorted(os.listdir(out)) == ['Good.nii.gz']
  assert 'Traceback' not in result.stderr


def test_restore_uses_the_workdir_config_and_refuses_another_architecture(trained):
  from aspp_resunet import eval_lib

  config, workdirs = trained
  aspp_config = eval_lib.load_workdir_config(workdirs['aspp'])
  assert aspp_config.model.use_aspp
  model, variables, record = eval_lib.restore_model(aspp_config, workdirs['aspp'])
  assert record['epoch'] == 1
  classes, _ = eval_lib.predictor(model, aspp_config)(
      variables, jnp.zeros((1, *aspp_config.data.image_size, 4)))
  assert classes.shape == (1, *aspp_config.data.image_size)
  assert not config.model.use_aspp  # the baseline's config cannot read the ASPP checkpoint
  with pytest.raises(RuntimeError, match='different model configuration'):
    eval_lib.restore_model(config, workdirs['aspp'])
