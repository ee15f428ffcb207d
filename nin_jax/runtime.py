"""Process-level setup that must happen before JAX touches a device."""

from __future__ import annotations

import os
from typing import Optional

import jax
from absl import logging

# Environment variables by which JAX's cluster detection recognizes a
# multi-process job (SLURM, Open MPI, Cloud TPU pods, explicit coordinator).
_CLUSTER_HINTS = ('SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                  'TPU_WORKER_HOSTNAMES', 'JAX_COORDINATOR_ADDRESS')


def _multi_process_cluster() -> bool:
  if int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    return True
  if int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return True
  if len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    return True
  return bool(os.environ.get('JAX_COORDINATOR_ADDRESS'))


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> None:
  """Joins the JAX distributed runtime when asked or when a cluster is detected.

  With no arguments and no cluster this does nothing: a single process.
  """
  explicit = coordinator_address is not None
  if not explicit and not _multi_process_cluster():
    return
  if jax.config.jax_platforms in (None, '', 'cpu') and explicit:
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  logging.info('Joined distributed runtime: process %d of %d.',
               jax.process_index(), jax.process_count())
