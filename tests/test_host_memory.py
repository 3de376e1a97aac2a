"""The command-line programs' cap on glibc malloc arenas."""

import ast
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


# Prints how it started, restarts with huge pages (argv[1]: the kernel's THP mode file to
# read), then reports the transparent huge pages (KiB) backing 64 MiB it mallocs and touches,
# and those that 16 MiB of 16 KiB blocks malloced and touched by a new thread (its own arena's
# heap) added (ctypes: numpy asks the kernel for huge pages itself).
_RESTART = r'''
import ctypes, os, sys, threading
print('started', os.environ.get('GLIBC_TUNABLES', '-'), *sys.argv[1:], flush=True)
from aspp_resunet import host_memory
host_memory.restart_with_huge_pages(sys.argv[1])
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
def huge_kib():
  with open('/proc/self/smaps_rollup') as stream:
    return sum(int(line.split()[1]) for line in stream if line.startswith('AnonHugePages:'))
def allocate(count, size):
  for _ in range(count):
    ctypes.memset(libc.malloc(size), 1, size)
allocate(1, 64 * 2**20)
large = huge_kib()
thread = threading.Thread(target=allocate, args=(1024, 16384))
thread.start()
thread.join()
print('huge_kib', large, huge_kib() - large)
'''
_GLIBC_ONLY = pytest.mark.skipif(
    platform.libc_ver()[0] != 'glibc',
    reason='glibc only (its tunables); other C libraries: '
    'test_restart_with_huge_pages_leaves_other_c_libraries_alone')


def _restart(tmp_path, thp_mode, **env):
  mode_file = tmp_path / 'enabled'
  mode_file.write_text(thp_mode + '\n')
  result = subprocess.run([sys.executable, '-X', 'utf8', '-c', _RESTART, str(mode_file), 'a b'],
                          cwd=REPO, check=True, capture_output=True, text=True,
                          env={**{k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'},
                               **env})
  return result.stdout.splitlines()


@_GLIBC_ONLY
def test_restart_with_huge_pages_restarts_once_with_the_same_arguments(tmp_path):
  mode_file = tmp_path / 'enabled'
  first, second, huge = _restart(tmp_path, 'always [madvise] never')
  assert first == f'started - {mode_file} a b'
  assert second == f'started glibc.malloc.hugetlb=1:glibc.malloc.top_pad=134217728 {mode_file} a b'
  assert huge.startswith('huge_kib ')
  # The user's other tunables are kept, and their own top pad wins.
  assert _restart(tmp_path, 'always [madvise] never', GLIBC_TUNABLES='glibc.malloc.arena_max=3')[
      1] == (f'started glibc.malloc.arena_max=3:glibc.malloc.hugetlb=1:'
             f'glibc.malloc.top_pad=134217728 {mode_file} a b')
  assert _restart(tmp_path, 'always [madvise] never', GLIBC_TUNABLES='glibc.malloc.top_pad=0')[
      1] == f'started glibc.malloc.top_pad=0:glibc.malloc.hugetlb=1 {mode_file} a b'


@_GLIBC_ONLY
def test_restart_with_huge_pages_only_where_the_kernel_waits_to_be_asked(tmp_path):
  # 'always': every program has huge pages already; 'never': none can; unreadable: unknown.
  for mode in ('[always] madvise never', 'always madvise [never]'):
    assert len(_restart(tmp_path, mode)) == 2  # started once, then the report
  # The user's own setting wins, and is how to turn it off.
  lines = _restart(tmp_path, 'always [madvise] never', GLIBC_TUNABLES='glibc.malloc.hugetlb=0')
  assert lines[0].startswith('started glibc.malloc.hugetlb=0 ') and len(lines) == 2


def test_restart_with_huge_pages_leaves_other_c_libraries_alone(monkeypatch):
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  monkeypatch.setattr(platform, 'libc_ver', lambda: ('musl', '1.2'))
  monkeypatch.setattr(os, 'execv', lambda *args: pytest.fail(f'restarted: {args}'))
  host_memory.restart_with_huge_pages()
  assert 'GLIBC_TUNABLES' not in os.environ


def _kernel_thp_mode():
  try:
    with open(host_memory.THP_MODE_FILE) as stream:
      return stream.read()
  except OSError:
    return ''


@_GLIBC_ONLY
@pytest.mark.skipif('[madvise]' not in _kernel_thp_mode(),
                    reason='the kernel gives transparent huge pages on request only; here: '
                    f'{_kernel_thp_mode().strip() or "unknown"}')
def test_after_the_restart_mallocs_get_huge_pages(tmp_path):
  host_madvise = _restart(tmp_path, 'always [madvise] never')[-1].split()
  without = _restart(tmp_path, 'always madvise [never]')[-1].split()  # (the kernel: madvise)
  assert int(without[1]) == 0 and int(without[2]) == 0
  assert int(host_madvise[1]) >= 32 * 1024  # at least half of the 64 MiB
  # Small blocks in a worker thread's heap too (the top pad; without it: none).
  assert int(host_madvise[2]) >= 8 * 1024


_ENTRY_POINTS = ('train.py', 'eval.py', 'aspp_resunet/predict.py', 'aspp_resunet/demo.py',
                 'benchmarks/train_step.py', 'benchmarks/train_step_vs_torch.py',
                 'benchmarks/inference.py', 'benchmarks/input_pipeline.py',
                 'benchmarks/conv_impl.py')


@pytest.mark.parametrize('path', _ENTRY_POINTS)
def test_programs_restart_with_huge_pages_before_jax_or_tensorflow(path):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  imported, restarted_after = [], None
  for node in tree.body:
    if isinstance(node, ast.Import):
      imported += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      imported += [f'{node.module}.{alias.name}' for alias in node.names]
    elif (isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'" and
          'host_memory.restart_with_huge_pages()' in ast.unparse(node)):
      restarted_after = list(imported)
      break
  assert restarted_after is not None, f'{path} does not restart with huge pages'
  assert 'aspp_resunet.host_memory' in restarted_after
  heavy = [name for name in restarted_after
           if name.split('.')[0] in ('jax', 'tensorflow', 'flax', 'orbax', 'torch')]
  assert not heavy, f'{path} imports {heavy} before restarting'


def test_without_added_top_pad_keeps_the_rest():
  added = f'glibc.malloc.top_pad={host_memory.TOP_PAD_BYTES}'
  assert host_memory.without_added_top_pad(f'glibc.malloc.hugetlb=1:{added}') == (
      'glibc.malloc.hugetlb=1')
  assert host_memory.without_added_top_pad(f'a=1:{added}:b=2') == 'a=1:b=2'
  # A user's own pad is theirs.
  assert host_memory.without_added_top_pad('glibc.malloc.top_pad=4096') == (
      'glibc.malloc.top_pad=4096')
  assert host_memory.without_added_top_pad('') == ''
