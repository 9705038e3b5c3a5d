"""Multi-host start-up (`jax.distributed.initialize` from config), a watchdog that stops the run
when a process is lost, and helpers for process 0's work.

JAX's multi-controller runtime: every host runs the same program on its own devices, and jitted
steps over a global mesh communicate by themselves. One process (the default) needs nothing.
"""

import logging

import jax
import numpy as np

from ldm_jax import watchdog as watchdog_lib

LOST_PROCESS_EXIT = watchdog_lib.LOST_PROCESS_EXIT
_watchdog = None  # this process's watchdog_lib.Watchdog, with several processes


def initialize(distributed):
  """Joins the other processes of a multi-host run; a no-op for one process.

  Must run before anything touches a JAX backend (`jax.devices()`, the first computation). With
  several processes, starts the watchdog: when a process stops answering for
  `heartbeat_timeout_s` (killed, its host lost) or fails with an exception, every other process
  logs which one and why, and exits with LOST_PROCESS_EXIT instead of waiting in a collective.

  Args:
    distributed: the config's `distributed` group. With `coordinator_address` set, its
      `num_processes` and `process_id` say who this process is (every host passes the same
      address, its own id). With `auto`, JAX finds them itself: TPU pods, SLURM (`srun`), Open
      MPI (`mpirun`), or the JAX_COORDINATOR_ADDRESS environment variable. Otherwise nothing.
  """
  global _watchdog
  explicit = bool(distributed.coordinator_address) and distributed.num_processes > 1
  if not (explicit or distributed.auto) or jax.distributed.is_initialized():
    return
  if distributed.heartbeat_timeout_s < 5:  # a busy host can miss a beat or two
    raise ValueError(f'distributed.heartbeat_timeout_s={distributed.heartbeat_timeout_s} is too '
                     'short: a busy process would count as lost; use 5 s or more (default 60)')
  # Host collectives for the CPU backend (tests, CPU clusters); GPUs and TPUs have their own.
  jax.config.update('jax_cpu_collectives_implementation', distributed.cpu_collectives)
  # JAX's own heartbeats are the backstop, twice as patient as the watchdog: when they run out,
  # JAX aborts every survivor (SIGABRT) with 'The following tasks are unhealthy', task ids only.
  timeouts = dict(initialization_timeout=distributed.initialization_timeout,
                  heartbeat_timeout_seconds=int(2 * distributed.heartbeat_timeout_s))
  if explicit:
    jax.distributed.initialize(distributed.coordinator_address, distributed.num_processes,
                               distributed.process_id, **timeouts)
  else:
    jax.distributed.initialize(**timeouts)
  logging.info('process %d of %d: %d local devices of %d', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    _watchdog = watchdog_lib.Watchdog(_client(), distributed.heartbeat_timeout_s)
    _watchdog.start()


def report_failure(error):
  """Tells the other processes that this one is stopping on `error` (an exception or a message).

  They stop too, naming this process and the error, instead of waiting for it in a collective;
  this process exits (code 1) once they have, when it reaches its own exit. Uncaught exceptions
  are reported by themselves; call this where an error becomes a `sys.exit`. A no-op with one
  process.
  """
  if _watchdog is not None:
    _watchdog.fail(error)


def note_checkpoints(directory):
  """Names `directory` (its newest step) in the message of a process stopping for a lost one."""
  if _watchdog is not None:
    _watchdog.checkpoints = directory


def _client():
  # pylint: disable-next=g-import-not-at-top  (the client has no public accessor)
  from jax._src import distributed as jax_distributed
  return jax_distributed.global_state.client


def barrier(name, timeout_s=1800):
  """Waits until every process gets here, through the coordination service (no device work).

  Before the first collectives of a program: the CPU backend's host collectives (gloo) give up
  after 30 s waiting for a peer, less than one host's compile can outlast another's.
  """
  if jax.process_count() > 1:
    _client().wait_at_barrier(name, timeout_s * 1000)


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
