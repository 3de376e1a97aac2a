"""Command-line helpers shared by train.py, eval.py and predict: flag errors in one line."""

import sys

from absl import flags


def _one_line(text):
  # ConfigDict and the config loader put their details on separate (sometimes escaped) lines.
  return ' '.join(text.replace('\\n', '\n').replace("\\'", "'").split())


def parse_flags(argv):
  """absl's flag parsing, but a bad flag or config is one 'error:' line and exit status 2.

  absl reports unknown flags itself; an unknown config field (`--config.model.widht=3`) or an
  unreadable config file would otherwise escape as a traceback (the latter only at first use).
  """
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
      flags.FLAGS['config'].value.to_dict()  # a config file that failed to load raises here
    return remaining
  except flags.Error as err:
    message = _one_line(str(err))
  except (AttributeError, KeyError) as err:
    text = _one_line(str(err.args[0]) if err.args else str(err)).strip('\'"')
    name, _, hint = text.partition(' ')
    message = f"unknown config field {name.strip(chr(39))}" + (f' ({hint})' if hint else '')
  except (TypeError, ValueError, OSError) as err:
    message = _one_line(str(err))
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)
