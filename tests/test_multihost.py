"""Multi-host training: 2 processes x 2 CPU devices train like 1 process x 4 devices, and resume.

Every run is a subprocess with a timeout (a hung collective or a lost peer cannot stall the
suite); a failure prints the tails of every process's output.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ldm_jax.data import builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420

# One process playing both hosts: each batch is host 0's shard then host 1's, which is what the
# 2-process run's global batch is (process 0's devices hold its first half).
_REFERENCE = textwrap.dedent('''
    import runpy, sys
    import numpy as np
    from ldm_jax.data import pipeline
    Loader = pipeline.Loader

    class TwoHosts:
      def __init__(self, config, tokenizer=None, **kwargs):
        self.hosts = [Loader(config, tokenizer, i, 2, **kwargs) for i in range(2)]

      def __next__(self):
        parts = [next(h) for h in self.hosts]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

      @property
      def stats(self):
        return self.hosts[0].stats

      def get_state(self):
        return self.hosts[0].get_state()

    pipeline.Loader = TwoHosts
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(devices),
              JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo', PYTHONPATH=ROOT)


def _train_args(data_dir, workdir, num_steps):
  return [os.path.join(ROOT, 'train.py'), '--config', os.path.join(ROOT, 'configs', 'tiny.py'),
          '--workdir', workdir, f'--config.data.data_dir={data_dir}',
          "--config.mesh=(('data', 1), ('fsdp', 4))",  # parameters split over both hosts
          f'--config.num_steps={num_steps}', '--config.ckpt_every=2', '--config.log_every=1']


def _wait(procs):
  """Waits for all; on a timeout or an error kills the rest and fails with every output tail."""
  outputs, failed = [], False
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      out, _ = proc.communicate()
      failed = True
    outputs.append(out)
    failed = failed or proc.returncode != 0
  if failed:
    tails = '\n'.join(f'--- process {i} (rc {p.returncode}) ---\n{o[-3000:]}'
                      for i, (p, o) in enumerate(zip(procs, outputs)))
    pytest.fail(f'a training process failed or timed out:\n{tails}')
  return outputs


def _launch(args, devices, **kw):
  return subprocess.Popen(args, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, cwd=ROOT, **kw)


def _two_processes(data_dir, workdir, num_steps):
  address = f'127.0.0.1:{_free_port()}'
  procs = []
  try:
    for i in range(2):
      procs.append(_launch(
          [sys.executable, *_train_args(data_dir, workdir, num_steps),
           f'--config.distributed.coordinator_address={address}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
           '--config.distributed.initialization_timeout=120'], devices=2))
    return _wait(procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _state(workdir, step):
  from ldm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.read_checkpoint(workdir, step=step)[1]


def _max_diff(a, b):
  return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_two_processes_train_and_resume_like_one(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  builders.build_shapes(data_dir, image_size=32, num_train=64, num_holdout=16)
  reference, multi = str(tmp_path / 'one'), str(tmp_path / 'two')
  _wait([_launch([sys.executable, '-c', _REFERENCE, *_train_args(data_dir, reference, 4)],
                 devices=4)])
  out = _two_processes(data_dir, multi, 2)  # stops after its step-2 checkpoint ...
  assert 'step 2/2' in out[0] and 'step 2/2' not in out[1]  # only process 0 prints progress
  out = _two_processes(data_dir, multi, 4)  # ... and a second launch resumes it to step 4
  assert 'step 3/4' in out[0]
  for step in (2, 4):
    one, two = _state(reference, step), _state(multi, step)
    assert int(two['step']) == step
    assert _max_diff(one['params'], two['params']) <= 1e-6, step
    assert _max_diff(one['ema_params'], two['ema_params']) <= 1e-6, step
  data = os.listdir(os.path.join(multi, 'checkpoints', '4', 'data'))
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(data)  # each host's position
  lines = open(os.path.join(multi, 'metrics.jsonl')).read().splitlines()
  assert len(lines) == 4  # steps 1-4, written once (by process 0)
  assert os.path.isfile(os.path.join(multi, 'export', 'model_index.json'))
