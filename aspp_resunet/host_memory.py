"""Host memory settings of the command-line programs: at most two glibc malloc arenas."""

import ctypes
import os
import platform

# glibc gives each thread that allocates its own arena (up to 8 per core) and each keeps the
# memory its thread freed; XLA's worker threads allocate and free the step's large buffers.
# Staged paper step at 128^3, peak RSS over 3 steps: 8.08 GiB with glibc's default (16 arenas
# here), 7.90 GiB with 2, step time +1% (113.1 -> 113.9 s) (issue 6 note, session 6).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number, glibc's malloc.h


def limit_malloc_arenas(count=MALLOC_ARENAS):
  """Caps glibc's malloc arenas at `count` for threads that start allocating from now on.

  Call it before the first computation (jax and TensorFlow may be imported already: their
  worker threads start allocating later). A MALLOC_ARENA_MAX set by the user wins, and other C
  libraries are left alone.

  Returns:
    Whether the cap was set.
  """
  if 'MALLOC_ARENA_MAX' in os.environ or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  return bool(libc.mallopt(_M_ARENA_MAX, count))
