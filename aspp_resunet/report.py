"""Report: markdown tables in the paper's form (Tables 1-2, HD95) and figures (PNG)."""

import json
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aspp_resunet import labels  # noqa: E402
from aspp_resunet import train_lib  # noqa: E402

REGION_TITLES = {'wt': 'WT', 'tc': 'TC', 'et': 'ET'}
# The paper's tables list the regions in this order.
PAPER_REGION_ORDER = ('wt', 'et', 'tc')


def _mean(per_case, column):
  return float(np.mean([row[column] for row in per_case.values()]))


def dice_table(rows, wilcoxon_p=None):
  """Markdown table: one row per (method, per_case) with mean Dice WT/ET/TC, optional p row."""
  header = '| Method | ' + ' | '.join(f'Dice {REGION_TITLES[r]}' for r in PAPER_REGION_ORDER)
  lines = [header + ' |', '|---|' + '---|' * len(PAPER_REGION_ORDER)]
  for method, per_case in rows:
    lines.append(f'| {method} | ' + ' | '.join(
        f'{_mean(per_case, f"dice_{r}"):.4f}' for r in PAPER_REGION_ORDER) + ' |')
  if wilcoxon_p is not None:
    lines.append('| Wilcoxon (p) | ' + ' | '.join(
        f'{wilcoxon_p[f"dice_{r}"]:.4f}' for r in PAPER_REGION_ORDER) + ' |')
  return '\n'.join(lines)


def metric_table(summary, metric, unit=''):
  """Markdown table of one metric per region: mean, std, median, IQR, n."""
  lines = [f'| {metric}{unit} | mean | std | median | q1 | q3 | n |',
           '|---|---|---|---|---|---|---|']
  for region in labels.REGION_NAMES:
    s = summary[f'{metric}_{region}']
    lines.append(f'| {REGION_TITLES[region]} | {s["mean"]:.4f} | {s["std"]:.4f} | '
                 f'{s["median"]:.4f} | {s["q1"]:.4f} | {s["q3"]:.4f} | {s["n"]} |')
  return '\n'.join(lines)


def comparison_table(comparison, first_name, second_name):
  """Markdown table of the paired comparison per metric column."""
  lines = [f'| metric | {first_name} mean | {second_name} mean | difference | 95% CI | '
           'Wilcoxon W | p | method | n (zero diffs) |', '|---|---|---|---|---|---|---|---|---|']
  for column, c in comparison.items():
    ci = c['ci']
    interval = f'[{ci["low"]:.4f}, {ci["high"]:.4f}]' if ci['low'] is not None else '-'
    w = c['wilcoxon']
    statistic = f'{w["statistic"]:.1f}' if w['statistic'] is not None else '-'
    lines.append(f'| {column} | {c["first"]["mean"]:.4f} | {c["second"]["mean"]:.4f} | '
                 f'{c["mean_difference"]:+.4f} | {interval} | {statistic} | '
                 f'{w["p_value"]:.4f} | {w["method"]} | {c["n"]} ({w["n_zero_differences"]}) |')
  return '\n'.join(lines)


def boxplots(per_case, path, title):
  """Per-region boxplots of Dice and HD95."""
  figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for axis, metric, unit in ((axes[0], 'dice', ''), (axes[1], 'hd95', ' (mm)')):
    data = [[row[f'{metric}_{r}'] for row in per_case.values()] for r in labels.REGION_NAMES]
    axis.boxplot(data, tick_labels=[REGION_TITLES[r] for r in labels.REGION_NAMES])
    axis.set_title(f'{metric.upper()}{unit}')
    axis.grid(alpha=0.3)
  figure.suptitle(title)
  figure.tight_layout()
  _save(figure, path)


def training_curves(workdir, path, title):
  """Loss and validation Dice per epoch from the workdir's metrics.jsonl (paper Fig. 5)."""
  metrics_path = os.path.join(workdir, train_lib.METRICS_FILE)
  if not os.path.exists(metrics_path):
    return False
  with open(metrics_path) as stream:
    records = [json.loads(line) for line in stream if line.strip()]
  train = {}
  for r in records:
    if r['kind'] == 'train':
      train.setdefault(r['epoch'], []).append(r['loss'])
  validation = [r for r in records if r['kind'] == 'validation']
  figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  epochs = sorted(train)
  axes[0].plot(epochs, [np.mean(train[e]) for e in epochs], label='train')
  if validation:
    axes[0].plot([r['epoch'] for r in validation], [r['loss'] for r in validation],
                 label='validation')
    for key in ('dice_wt', 'dice_tc', 'dice_et', 'dice_mean'):
      axes[1].plot([r['epoch'] for r in validation], [r[key] for r in validation],
                   label=key.replace('dice_', '').upper())
  axes[0].set_title('loss')
  axes[1].set_title('validation Dice')
  for axis in axes:
    axis.set_xlabel('epoch')
    axis.legend()
    axis.grid(alpha=0.3)
  figure.suptitle(title)
  figure.tight_layout()
  _save(figure, path)
  return True


def qualitative_panel(cases, path, title):
  """Axial slice through each tumour: four modalities, ground truth, prediction (paper Fig. 6)."""
  if not cases:
    return False
  figure, axes = plt.subplots(len(cases), 6, figsize=(13, 2.4 * len(cases)), squeeze=False)
  for row, case in enumerate(cases):
    whole = labels.region_mask(case['truth'], 'wt')
    z = int(np.argmax(whole.sum(axis=(0, 1)))) if whole.any() else case['truth'].shape[2] // 2
    panels = [case['image'][..., c] for c in range(labels.NUM_CHANNELS)]
    panels += [case['truth'], case['prediction']]
    titles = [m.upper() for m in labels.MODALITIES] + ['ground truth', 'prediction']
    for column, (panel, name) in enumerate(zip(panels, titles)):
      axis = axes[row, column]
      is_label = column >= labels.NUM_CHANNELS
      axis.imshow(np.rot90(panel[:, :, z]), cmap='magma' if is_label else 'gray',
                  vmin=0 if is_label else None, vmax=3 if is_label else None,
                  interpolation='nearest')
      axis.set_axis_off()
      axis.set_title(f'{case["case_id"]}\n{name}' if column == 0 else name, fontsize=7)
  figure.suptitle(title)
  figure.tight_layout()
  _save(figure, path)
  return True


def _save(figure, path):
  temp = path + '.tmp.png'
  figure.savefig(temp, dpi=90)
  plt.close(figure)
  os.replace(temp, path)


def write_markdown(path, sections):
  """Writes '# title' + sections (list of (heading, body)) atomically."""
  text = '\n\n'.join(f'## {heading}\n\n{body}' if heading else body for heading, body in sections)
  temp = path + '.tmp'
  with open(temp, 'w') as stream:
    stream.write(text.rstrip() + '\n')
  os.replace(temp, path)
