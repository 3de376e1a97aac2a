"""The command-line programs' cap on glibc malloc arenas."""

import os
import platform
import subprocess
import sys

import pytest

from aspp_resunet import host_memory

REPO = __file__.rsplit('/tests/', 1)[0]

# Starts 6 threads that each allocate while all are alive, then counts glibc's arenas (the heaps
# malloc_info lists); argv[1] 'limit' caps them first with host_memory.limit_malloc_arenas.
_COUNT_ARENAS = r'''
import ctypes, os, re, sys, tempfile, threading
from aspp_resunet import host_memory
applied = host_memory.limit_malloc_arenas() if sys.argv[1] == 'limit' else None
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.fopen.restype = ctypes.c_void_p
barrier = threading.Barrier(7)
def allocate():
  libc.malloc(4096)
  barrier.wait()
  barrier.wait()
threads = [threading.Thread(target=allocate) for _ in range(6)]
for thread in threads:
  thread.start()
barrier.wait()
path = tempfile.mktemp()
stream = libc.fopen(path.encode(), b'w')
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
barrier.wait()
print(applied, len(re.findall('<heap nr=', open(path).read())))
os.remove(path)
'''


def _arenas(mode, **env):
  result = subprocess.run([sys.executable, '-c', _COUNT_ARENAS, mode], cwd=REPO, check=True,
                          capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items()
                                  if k != 'MALLOC_ARENA_MAX'}, **env})
  applied, count = result.stdout.split()
  return applied, int(count)


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc',
                    reason='glibc only; the call on other C libraries: '
                    'test_limit_malloc_arenas_leaves_other_c_libraries_alone')
def test_limit_malloc_arenas_caps_the_arenas_threads_get():
  assert _arenas('none') == ('None', 7)  # glibc's default: one per thread here
  assert _arenas('limit') == ('True', 2)
  # The user's own setting wins (glibc applies it at start-up).
  assert _arenas('limit', MALLOC_ARENA_MAX='3') == ('False', 3)


def test_limit_malloc_arenas_leaves_other_c_libraries_alone(monkeypatch):
  monkeypatch.delenv('MALLOC_ARENA_MAX', raising=False)
  monkeypatch.setattr(platform, 'libc_ver', lambda: ('musl', '1.2'))
  assert host_memory.limit_malloc_arenas() is False
