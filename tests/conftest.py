"""Test set-up: 8 simulated CPU devices (before JAX starts) and shared fixtures."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # tests never reach a hub
os.environ.setdefault('XLA_FLAGS', '--xla_cpu_collective_call_terminate_timeout_seconds=60')

import jax  # pylint: disable=g-import-not-at-top

jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_default_matmul_precision', 'highest')
