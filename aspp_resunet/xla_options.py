"""XLA compiler options of the model's programs, by backend, compute dtype and CPU."""

import functools

import jax
import jax.numpy as jnp

# Vector width (bits) that XLA:CPU's generated loops prefer in the programs of a bfloat16 model
# on a CPU with AVX-512 (XLA's default is 256). Those loops build the bfloat16 column matrices,
# sum the products' float32 partial outputs and round them back (the products themselves run in
# YNNPACK, untouched). A/B in worker processes, both orders (issue 6 note, session 21): demo
# bfloat16 step 0.1313 -> 0.1277, 0.1425 -> 0.1346, 0.1351 -> 0.1306 and 0.1009 -> 0.1015 s;
# 96^3 bfloat16 step 22.88 -> 21.61 and 21.52 -> 21.23 s, peak RSS even; bfloat16 inference
# with the paper model even (17.99 vs 17.97 s). Float32 programs keep the default: demo float32
# step even (0.1566 vs 0.1580 s), paper-model inference 28.11 -> 30.17 s (slower in each of 3
# pairs).
BFLOAT16_CPU_VECTOR_WIDTH = 512
CPU_INFO_FILE = '/proc/cpuinfo'


@functools.cache
def _cpu_flags(cpu_info_file):
  """The feature flags this (Linux) host's CPU reports; none where that is unknown."""
  try:
    with open(cpu_info_file) as stream:
      return frozenset(flag for line in stream if line.startswith('flags')
                       for flag in line.split(':', 1)[-1].split())
  except OSError:
    return frozenset()


def cpu_has(flag, cpu_info_file=CPU_INFO_FILE):
  """Whether the host CPU reports `flag` in /proc/cpuinfo; False where unknown."""
  return flag in _cpu_flags(cpu_info_file)


def cpu_has_avx512(cpu_info_file=CPU_INFO_FILE):
  """Whether the host CPU reports AVX-512 (avx512f)."""
  return cpu_has('avx512f', cpu_info_file)


def cpu_has_amx(cpu_info_file=CPU_INFO_FILE):
  """Whether the host CPU reports AMX tile products in bfloat16 (amx_bf16), which YNNPACK's
  bfloat16 matrix products use (2048^2 matmul 1330-1600 GFLOP/s on such a 2-core machine,
  float32 280)."""
  return cpu_has('amx_bf16', cpu_info_file)


def options(dtype, backend=None, cpu_info_file=CPU_INFO_FILE):
  """`compiler_options` for `jax.jit` of a program of a model computing in `dtype`.

  Args:
    dtype: the model's compute dtype (`config.model.dtype`).
    backend: the platform compiled for (default: jax's default backend).
    cpu_info_file: where the host CPU's features are read (tests).
  Returns:
    A dict of XLA options, or None for XLA's defaults.
  """
  backend = backend or jax.default_backend()
  if (backend == 'cpu' and jnp.dtype(dtype) == jnp.bfloat16
      and cpu_has_avx512(cpu_info_file)):
    return {'xla_cpu_prefer_vector_width': BFLOAT16_CPU_VECTOR_WIDTH}
  return None
