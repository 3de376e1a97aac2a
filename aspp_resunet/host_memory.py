"""Host memory settings of the command-line programs: glibc malloc arenas and huge pages."""

import ctypes
import os
import platform
import sys

# glibc gives each thread that allocates its own arena (up to 8 per core) and each keeps the
# memory its thread freed; XLA's worker threads allocate and free the step's large buffers.
# Staged paper step at 128^3, peak RSS over 3 steps: 8.08 GiB with glibc's default (16 arenas
# here), 7.90 GiB with 2, step time +1% (113.1 -> 113.9 s) (issue 6 note, session 6).
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt parameter number, glibc's malloc.h

# XLA:CPU's step buffers are mapped afresh by malloc every step and each 4 KiB page faults on
# first touch (fused paper step at 96^3: 8.8 million faults in 4 steps). With this tunable glibc
# asks for transparent huge pages (madvise) on what it maps: 0.3 million faults, step 19.5 ->
# 16.8 s, peak RSS 10.32 -> 10.18 GiB (issue 6 note, session 8). glibc reads its tunables only
# when a process starts, hence `restart_with_huge_pages`.
HUGE_PAGE_TUNABLE = 'glibc.malloc.hugetlb'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'
# glibc asks for huge pages on a heap's growth only when it spans one, and grows the heaps of
# worker threads' arenas by what a request needs plus this pad (128 KiB by default): so with
# the default those heaps (XLA's and YNNPACK's buffers under the mmap threshold) stayed on 4 KiB
# pages (16 MiB malloced in a thread: no huge pages; with this pad: 18 MiB of them). Demo
# bfloat16 step, A/B in worker processes, both orders: 0.1185 -> 0.1121 s and 0.1121 -> 0.0985
# s, peak RSS even (1.72-1.89 GiB); huge pages in the process 364 -> 1002 MiB, RSS 1785 -> 1674
# MiB (issue 6 note, session 19).
TOP_PAD_TUNABLE = 'glibc.malloc.top_pad'
TOP_PAD_BYTES = 128 * 2**20
_ADDED_TOP_PAD = f'{TOP_PAD_TUNABLE}={TOP_PAD_BYTES}'  # as `restart_with_huge_pages` adds it


def without_added_top_pad(tunables):
  """GLIBC_TUNABLES `tunables` without the top pad `restart_with_huge_pages` adds (a user's own
  pad stays): for a program that allocates otherwise, such as PyTorch's CPU step. Once a pad is
  set glibc fixes its mmap threshold at 128 KiB, and buffers of 0.1-32 MiB freed and malloced
  again each step are then mapped afresh every time."""
  return ':'.join(tunable for tunable in tunables.split(':')
                  if tunable and tunable != _ADDED_TOP_PAD)


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


def restart_with_huge_pages(thp_mode_file=THP_MODE_FILE):
  """Restarts this program (same interpreter, same arguments) with glibc's huge-page tunable
  and its heap top pad (TOP_PAD_BYTES, unless the user set one).

  Call it first thing in a program's main module, before the heavy imports (a restart repeats
  whatever ran before it). Nothing happens unless the C library is glibc and the kernel gives
  transparent huge pages on request only ('madvise': with 'always' every program has them,
  with 'never' none can), or when GLIBC_TUNABLES already names the tunable: so it restarts at
  most once, and GLIBC_TUNABLES=glibc.malloc.hugetlb=0 turns it off. Other tunables the user
  set are kept.
  """
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if HUGE_PAGE_TUNABLE in tunables or platform.libc_ver()[0] != 'glibc':
    return
  try:
    with open(thp_mode_file) as stream:
      if '[madvise]' not in stream.read():
        return
  except OSError:
    return
  added = [f'{HUGE_PAGE_TUNABLE}=1']
  if TOP_PAD_TUNABLE not in tunables:
    added.append(_ADDED_TOP_PAD)
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, [tunables, *added]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
