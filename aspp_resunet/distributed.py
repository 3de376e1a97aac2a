"""Multi-process start-up: jax.distributed from flags, environment variables or the launcher."""

import os

from absl import flags
import jax

# Explicit settings (flags, else these environment variables); `--distributed=auto` instead lets
# jax.distributed detect the launcher (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes).
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
MODES = ('off', 'explicit', 'auto')


class DistributedError(RuntimeError):
  """The multi-process settings are incomplete or inconsistent (one-line message)."""


def define_flags():
  """The launch flags shared by train.py, eval.py and predict."""
  flags.DEFINE_enum('distributed', None, MODES,
                    "Multi-process mode; default: 'explicit' when a coordinator address is given "
                    "(flag or $JAX_COORDINATOR_ADDRESS), else 'off'.")
  flags.DEFINE_string('coordinator_address', None,
                      f'host:port of process 0 (default ${ENV_COORDINATOR}).')
  flags.DEFINE_integer('num_processes', None, f'Process count (default ${ENV_NUM_PROCESSES}).')
  flags.DEFINE_integer('process_id', None, f'This process, 0..n-1 (default ${ENV_PROCESS_ID}).')


def settings(mode=None, coordinator_address=None, num_processes=None, process_id=None,
             environ=None):
  """Resolves (mode, coordinator, count, id) from arguments, then the environment."""
  environ = os.environ if environ is None else environ
  coordinator_address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  if num_processes is None and environ.get(ENV_NUM_PROCESSES):
    num_processes = int(environ[ENV_NUM_PROCESSES])
  if process_id is None and environ.get(ENV_PROCESS_ID):
    process_id = int(environ[ENV_PROCESS_ID])
  if mode is None:
    mode = 'explicit' if coordinator_address else 'off'
  if mode not in MODES:
    raise DistributedError(f'distributed must be one of {MODES}, got {mode!r}')
  if mode == 'explicit':
    if not coordinator_address or num_processes is None or process_id is None:
      raise DistributedError(
          'multi-process launch needs --coordinator_address, --num_processes and --process_id '
          f'(or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, ${ENV_PROCESS_ID}); got '
          f'{coordinator_address!r}, {num_processes!r}, {process_id!r}')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f'process_id {process_id} is not in [0, {num_processes})')
  return mode, coordinator_address, num_processes, process_id


def initialize(mode=None, coordinator_address=None, num_processes=None, process_id=None):
  """Joins the process group (before any other JAX call) when launched as several processes.

  On the CPU backend the cross-process collectives go through gloo (TCP). Returns the number
  of processes (1 when off).
  """
  mode, coordinator_address, num_processes, process_id = settings(
      mode, coordinator_address, num_processes, process_id)
  if mode == 'off':
    return 1
  # Only the CPU backend's collectives use this (harmless on GPU/TPU hosts).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if mode == 'auto':
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  return jax.process_count()


def from_flags():
  """`initialize` with the values of `define_flags`' flags."""
  values = flags.FLAGS
  return initialize(values.distributed, values.coordinator_address, values.num_processes,
                    values.process_id)
