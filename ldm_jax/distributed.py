"""Multi-host start-up (`jax.distributed.initialize` from config) and helpers for process 0's work.

JAX's multi-controller runtime: every host runs the same program on its own devices, and jitted
steps over a global mesh communicate by themselves. One process (the default) needs nothing.
"""

import logging

import jax
import numpy as np


def initialize(distributed):
  """Joins the other processes of a multi-host run; a no-op for one process.

  Must run before anything touches a JAX backend (`jax.devices()`, the first computation).

  Args:
    distributed: the config's `distributed` group. With `coordinator_address` set, its
      `num_processes` and `process_id` say who this process is (every host passes the same
      address, its own id). With `auto`, JAX finds them itself: TPU pods, SLURM (`srun`), Open
      MPI (`mpirun`), or the JAX_COORDINATOR_ADDRESS environment variable. Otherwise nothing.
  """
  explicit = bool(distributed.coordinator_address) and distributed.num_processes > 1
  if not (explicit or distributed.auto) or jax.distributed.is_initialized():
    return
  # Host collectives for the CPU backend (tests, CPU clusters); GPUs and TPUs have their own.
  jax.config.update('jax_cpu_collectives_implementation', distributed.cpu_collectives)
  if explicit:
    jax.distributed.initialize(distributed.coordinator_address, distributed.num_processes,
                               distributed.process_id,
                               initialization_timeout=distributed.initialization_timeout)
  else:
    jax.distributed.initialize(initialization_timeout=distributed.initialization_timeout)
  logging.info('process %d of %d: %d local devices of %d', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name, timeout_s=1800):
  """Waits until every process gets here, through the coordination service (no device work).

  Before the first collectives of a program: the CPU backend's host collectives (gloo) give up
  after 30 s waiting for a peer, less than one host's compile can outlast another's.
  """
  if jax.process_count() > 1:
    # pylint: disable-next=g-import-not-at-top  (the client has no public accessor)
    from jax._src import distributed as jax_distributed
    jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def is_main():
  """True on the process that logs and writes previews and exports (process 0)."""
  return jax.process_index() == 0


def to_host(tree):
  """A tree of (possibly cross-host sharded) arrays as numpy arrays on every host.

  A collective when there are several processes: every process must call it. With one process
  the arrays stay on their devices (whoever uses them next moves them).
  """
  if jax.process_count() == 1:
    return tree
  # One program replicates every leaf (multihost_utils.process_allgather compiles one per leaf).
  replicated = jax.tree.map(
      lambda x: jax.sharding.NamedSharding(x.sharding.mesh, jax.sharding.PartitionSpec()), tree)
  return jax.tree.map(np.asarray, jax.jit(lambda t: t, out_shardings=replicated)(tree))
