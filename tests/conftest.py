"""Shared fixtures: a tiny synthetic cohort prepared once per session; fast JAX compiles."""

import os
import tempfile

# Compiled programs are reused across tests and their subprocesses (same shapes, same code).
_CACHE = os.path.join(tempfile.gettempdir(), 'aspp_resunet_test_jax_cache')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.2')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import pytest  # noqa: E402

from configs import test as test_config  # noqa: E402


@pytest.fixture(scope='session')
def data_root(tmp_path_factory):
  """A folder holding the tiny synthetic cohort and its prepared TFDS dataset."""
  return str(tmp_path_factory.mktemp('data'))


@pytest.fixture
def tiny_config(data_root):
  """configs/test.py pointed at the session's tiny cohort."""
  config = test_config.get_config()
  config.data.synthetic_dir = os.path.join(data_root, 'synthetic')
  config.data.prepared_dir = os.path.join(data_root, 'prepared')
  return config
