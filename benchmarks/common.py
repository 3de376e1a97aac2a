"""Shared helpers for benchmarks: machine description and JSON result files."""

import datetime
import json
import os
import platform
import subprocess


def _cpu_model():
  try:
    with open('/proc/cpuinfo') as stream:
      for line in stream:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _versions():
  versions = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'scipy', 'nibabel', 'tensorflow',
               'torch'):
    try:
      module = __import__(name)
      versions[name] = getattr(module, '__version__', 'unknown')
    except ImportError:
      continue
  return versions


def _git_commit():
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def write_result(path, figures):
  """Writes `figures` with the date, machine and versions to `path` as JSON (atomically)."""
  record = {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'commit': _git_commit(),
      'cpu_model': _cpu_model(),
      'cpu_count': os.cpu_count(),
      'versions': _versions(),
      **figures,
  }
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp_path = path + '.tmp'
  with open(temp_path, 'w') as stream:
    json.dump(record, stream, indent=2, sort_keys=False, default=float)
    stream.write('\n')
  os.replace(temp_path, path)
  return record
