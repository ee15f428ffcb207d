"""Process-level setup that must happen before JAX touches a device.

`configure_cpu` splits each batch over virtual CPU devices when JAX will run
on the CPU only and the user has not chosen a device count: XLA's CPU
convolutions run faster per image on small per-device batches (cache), and the
devices' programs overlap on the cores. Results change only within float
tolerance (the batch mean is a sum over shards).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import pkgutil
from typing import Mapping, Optional, Sequence

import jax
import ml_collections
from absl import logging

from nin_jax.errors import check_count

# Virtual CPU devices to split a batch over when the user has not set a count
# (measured on 2 cores, CIFAR-10 NiN, batch 128; see README "Speed").
DEFAULT_CPU_DEVICES = 8
CPU_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


class QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax, tensorstore and fsspec's caches (gcsfs;
  warnings still show)."""

  def filter(self, record):
    return (record.levelno >= logging.logging.WARNING or
            not any(name in record.pathname for name in ('orbax', 'fsspec')))


def _multi_process_cluster() -> bool:
  """True when the environment shows a multi-process SLURM, Open MPI or
  TPU job, or names a JAX coordinator."""
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))


DISTRIBUTED_MODES = ('auto', 'on', 'off')


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               mode: str = 'auto') -> None:
  """Joins the JAX distributed runtime when asked or when a cluster is detected.

  `mode`: 'auto' joins when a coordinator is given or the environment shows a
  multi-process SLURM, Open MPI or TPU job; 'on' always joins (JAX then detects
  Cloud TPU pod slices, SLURM, Open MPI and Kubernetes by itself); 'off' never
  does. Without a cluster, 'auto' does nothing: a single process.
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f'--distributed={mode!r}: must be one of '
                     f'{DISTRIBUTED_MODES}.')
  explicit = coordinator_address is not None
  if mode == 'off' or (mode == 'auto' and not explicit and
                       not _multi_process_cluster()):
    return
  if jax.config.jax_platforms in (None, '', 'cpu') and explicit:
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info('Joined distributed runtime: process %d of %d.',
               jax.process_index(), jax.process_count())


def accelerator_plugins() -> list[str]:
  """Installed JAX GPU/TPU plugins, found without initializing any backend."""
  found = []
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top
    found += [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    pass
  found += [ep.name for ep in importlib.metadata.entry_points(
      group='jax_plugins')]
  if importlib.util.find_spec('libtpu') is not None:
    found.append('libtpu')
  return sorted(set(found))


def cpu_device_count_to_set(environ: Mapping[str, str],
                            jax_platforms: Optional[str],
                            num_cpu_devices: int,
                            plugins: Sequence[str],
                            batch_sizes: Sequence[int] = (),
                            target: int = DEFAULT_CPU_DEVICES
                            ) -> Optional[int]:
  """The virtual CPU device count to set, or None to leave JAX's default.

  None unless JAX will run on the CPU alone (`jax_platforms` is 'cpu', or it
  is unset and no accelerator plugin is installed) and the user chose no count
  (`XLA_FLAGS` has no `--xla_force_host_platform_device_count` and
  `jax_num_cpu_devices` is unset, -1). The count is the largest divisor of
  every batch size that is at most `target`.
  """
  if jax_platforms:
    if [p.strip() for p in jax_platforms.split(',')] != ['cpu']:
      return None
  elif plugins:
    return None
  if CPU_DEVICE_COUNT_FLAG in environ.get('XLA_FLAGS', ''):
    return None
  if num_cpu_devices >= 0:
    return None
  divisor = math.gcd(*batch_sizes) if batch_sizes else target
  count = max(n for n in range(1, min(target, divisor) + 1)
              if divisor % n == 0)
  return count if count > 1 else None


def configure_cpu(batch_sizes: Sequence[int] = (),
                  target: int = DEFAULT_CPU_DEVICES) -> Optional[int]:
  """Sets `jax_num_cpu_devices` for a CPU-only run; returns the count set.

  Must run before JAX initializes its backends (before any device is
  touched); afterwards, or in a multi-process job, it does nothing.
  `target` <= 0 means DEFAULT_CPU_DEVICES (config.runtime.cpu_devices = 0).
  """
  target = target if target > 0 else DEFAULT_CPU_DEVICES
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if xla_bridge.backends_are_initialized() or _multi_process_cluster():
    return None
  count = cpu_device_count_to_set(
      os.environ, jax.config.jax_platforms, jax.config.jax_num_cpu_devices,
      accelerator_plugins(), batch_sizes, target)
  if count is not None:
    jax.config.update('jax_num_cpu_devices', count)
    logging.info('CPU only: each batch is split over %d virtual CPU devices '
                 '(--config.runtime.cpu_devices=N caps it, 1 turns it off; '
                 'XLA_FLAGS=%s=N sets it).', count,
                 CPU_DEVICE_COUNT_FLAG)
  return count


def configure_cpu_for(c: ml_collections.ConfigDict) -> Optional[int]:
  """`configure_cpu` for a run of config `c`: its training and evaluation
  batches, at most config.runtime.cpu_devices devices."""
  return configure_cpu((c.train.batch_size, c.train.eval_batch_size),
                       c.runtime.cpu_devices)


def validate_config(r: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of config.runtime."""
  check_count('runtime.cpu_devices', r.cpu_devices, 'automatic')
