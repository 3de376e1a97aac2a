"""The main job's pipeline on a tiny config: every stage, output file and table."""

import json
import os

from aspp_resunet import demo
from configs import test as test_config


def _configs(data_root):
  configs = []
  for use_aspp in (True, False):
    config = test_config.get_config()
    config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
    config.data.prepared_dir = os.path.join(data_root, 'prepared')
    config.train.num_epochs = 1
    config.model.use_aspp = use_aspp
    configs.append(config)
  return configs


def test_demo_pipeline_writes_report_and_resumes(data_root, tmp_path, capsys):
  run_dir = str(tmp_path / 'demo')
  aspp_config, baseline_config = _configs(data_root)
  summary = demo.run(run_dir, aspp_config, baseline_config)
  demo.print_summary(summary, run_dir)
  printed = capsys.readouterr().out
  for number, stage in enumerate(demo.STAGES, 1):
    assert f'== {number}/{len(demo.STAGES)} {stage}' in printed
  assert 'dice_wt' in printed and 'report: ' in printed
  for name in ('report.md', 'boxplots.png', 'training_curves.png', 'qualitative.png'):
    assert os.path.getsize(os.path.join(run_dir, name)) > 0
  for name in ('per_case.csv', 'summary.json', 'comparison.json'):
    assert os.path.getsize(os.path.join(run_dir, 'eval', name)) > 0
  comparison = json.load(open(os.path.join(run_dir, 'eval', 'comparison.json')))
  assert comparison['first']['name'] == 'Res-UNet+ASPP'
  assert comparison['second']['name'] == 'Res-UNet'
  report = open(os.path.join(run_dir, 'report.md')).read()
  assert 'Table 1.' in report and 'Table 2.' in report and '| Wilcoxon (p) |' in report
  # A rerun keeps the trained models.
  demo.run(run_dir, aspp_config, baseline_config)
  assert printed.count('already trained, kept') == 0
  assert capsys.readouterr().out.count('already trained, kept') == 2
