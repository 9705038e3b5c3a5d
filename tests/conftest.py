"""Test set-up: 8 simulated CPU devices (before JAX starts) and shared fixtures."""

import os
import tempfile

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never reach a hub
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_collective_call_terminate_timeout_seconds=60')
# A persistent compilation cache, shared with the train.py/sample.py subprocesses the tests
# start: identical computations compile once per suite run instead of once per call.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'ldm_jax_test_jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '1')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')


def pytest_sessionstart(session):
  """One torch thread for the PyTorch oracles: their tiny models gain nothing from more, and on
  a busy 2-core machine torch's intra-op threads wait on each other (20-50x slower calls)."""
  del session
  try:
    import torch  # pylint: disable=g-import-not-at-top  (the oracles are optional)
  except ImportError:
    return
  torch.set_num_threads(1)
