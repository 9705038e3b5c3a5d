"""Multi-host training: 2 processes x 2 CPU devices train like 1 process x 4 devices; when one
process dies the other stops, naming it, and the run resumes from its last checkpoint.

Every run is a subprocess with a timeout (a hung collective or a lost peer cannot stall the
suite); a failure prints the tails of every process's output.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ldm_jax import distributed
from ldm_jax import watchdog
from ldm_jax.data import builders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 420
HEARTBEAT_S = 10  # distributed.heartbeat_timeout_s of the 2-process runs

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
        self.config = config

      def __next__(self):
        parts = [next(h) for h in self.hosts]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

      @property
      def stats(self):
        return self.hosts[0].stats

      def get_state(self):
        return self.hosts[0].get_state()

      def set_state(self, state):  # both hosts have read as many records (no bad ones here)
        for host in self.hosts:
          host.set_state(state)

    pipeline.Loader = TwoHosts
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name='__main__')
''')


# Process 1 dies as if its host were lost (SIGKILL) when its input thread takes the batch of step
# 4, once the step-2 checkpoint is written: process 0 is then in step 3's or 4's collectives,
# waiting for it.
_DIES_AT_STEP_4 = textwrap.dedent('''
    import os, runpy, signal, sys, time
    from ldm_jax.data import pipeline

    checkpoint, taken, take = sys.argv[1], [], pipeline.Loader.__next__

    def dying_next(self):
      taken.append(1)
      if len(taken) == 4:
        for _ in range(600):  # the step-2 save is asynchronous
          if os.path.isdir(checkpoint):
            break
          time.sleep(0.2)
        print(f'process 1: SIGKILL at {time.time()}', flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return take(self)

    pipeline.Loader.__next__ = dying_next
    sys.argv = sys.argv[2:]
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


def _two_processes(data_dir, workdir, num_steps, process_1_dies=False):
  """Both processes' outputs; with `process_1_dies`, process 1 runs _DIES_AT_STEP_4."""
  address = f'127.0.0.1:{_free_port()}'
  procs = []
  try:
    for i in range(2):
      dies = ['-c', _DIES_AT_STEP_4, os.path.join(workdir, 'checkpoints', '2')] if (
          process_1_dies and i == 1) else []
      procs.append(_launch(
          [sys.executable, *dies, *_train_args(data_dir, workdir, num_steps),
           f'--config.distributed.coordinator_address={address}',
           '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
           '--config.distributed.initialization_timeout=120',
           f'--config.distributed.heartbeat_timeout_s={HEARTBEAT_S}'], devices=2))
    return _wait_for_loss(procs) if process_1_dies else _wait(procs)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def _wait_for_loss(procs):
  """Process 0's output, process 1's, and how long process 0 ran after process 1's death."""
  outputs = []
  try:
    for proc in procs:  # process 0 first: it writes more than a pipe holds
      outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outputs = [p.communicate()[0] for p in procs]
    pytest.fail(f'process 0 did not stop after process 1 died:\n{outputs[0][-3000:]}')
  stopped = time.time()
  died = [float(line.split()[-1]) for line in outputs[1].splitlines()
          if line.startswith('process 1: SIGKILL at ')]
  assert died, f'process 1 did not die as planned:\n{outputs[1][-3000:]}'
  assert procs[1].returncode == -9
  assert procs[0].returncode == distributed.LOST_PROCESS_EXIT, outputs[0][-3000:]
  return outputs[0], outputs[1], stopped - died[0]


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
  # Process 1 dies after the step-2 checkpoint: process 0 stops by itself, naming it ...
  out, _, seconds = _two_processes(data_dir, multi, 4, process_1_dies=True)
  assert 'step 2/4' in out  # only process 0 prints progress
  assert seconds < HEARTBEAT_S + 30, seconds  # not JAX's 100 s of missed heartbeats
  assert 'process 1 of 2 stopped answering' in out, out[-3000:]
  assert 'resume from the newest checkpoint (step 2 in ' in out, out[-3000:]
  out = _two_processes(data_dir, multi, 4)  # ... and restarting both resumes it to step 4
  assert 'step 3/4' in out[0] and 'step 2/4' not in out[0] and 'step 2/4' not in out[1]
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


class _FakeClient:
  """The coordination service's key-value store, in memory."""

  def __init__(self):
    self.values = {}

  def key_value_set(self, key, value, allow_overwrite=False):
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_dir_get(self, prefix):
    return [(k, v) for k, v in self.values.items() if k.startswith(prefix)]


def _watchdog(monkeypatch, me, count):
  exits = []
  monkeypatch.setattr(watchdog.Watchdog, '_exit', lambda self: exits.append(self.exit_code))
  dog = watchdog.Watchdog(_FakeClient(), timeout_s=10)
  dog.me, dog.count = me, count
  dog.interval_s = 0.01  # process 0 waits 2 intervals for the others to read why it stops
  return dog, exits


def _key(process):
  return f'ldm_jax/alive/{process}'


def test_watchdog_names_a_silent_process_and_not_a_finished_one(monkeypatch, caplog, tmp_path):
  dog, exits = _watchdog(monkeypatch, 0, 3)
  for name in ('2', '4', '6.orbax-checkpoint-tmp-1'):  # step 6 is not written yet
    os.makedirs(tmp_path / name)
  dog.checkpoints = str(tmp_path)
  dog._check({_key(1): '1', _key(2): '1'}, now=0)
  dog._check({_key(1): '2', _key(2): 'done'}, now=5)  # process 2 finished: its silence is fine
  dog._check({_key(1): '2', _key(2): 'done'}, now=14)
  assert dog.exit_code is None and not exits
  dog._check({_key(1): '2', _key(2): 'done'}, now=16)
  assert exits == [distributed.LOST_PROCESS_EXIT]
  assert (f'process 1 of 3 stopped answering (no heartbeat for 11 s): stopping process 0 of 3. '
          f'Restart all of them (the same command) to resume from the newest checkpoint (step 4 '
          f'in {tmp_path})') in caplog.text
  assert dog.client.values[_key(0)].startswith('lost: process 1 of 3 stopped answering')


def test_watchdog_stops_at_a_failed_process_and_exits_once_the_others_know(monkeypatch, caplog):
  dog, exits = _watchdog(monkeypatch, 1, 3)
  dog._check({_key(0): '1', _key(2): 'failed: ValueError: a bad record'}, now=0)
  assert 'process 2 of 3 failed (ValueError: a bad record): stopping process 1 of 3' in caplog.text
  assert not exits  # process 0 has not read it yet
  dog._check({_key(0): 'lost: process 2 of 3 failed (ValueError: a bad record)',
                   _key(2): 'failed: ValueError: a bad record'}, now=1)
  assert exits == [distributed.LOST_PROCESS_EXIT]


def test_watchdog_tells_the_others_of_a_failure_and_exits_after_them(monkeypatch):
  dog, exits = _watchdog(monkeypatch, 0, 2)
  monkeypatch.setattr(distributed, '_watchdog', dog)  # what initialize sets
  distributed.report_failure(ValueError('a bad record\nin shard 7'))
  assert dog.client.values[_key(0)] == 'failed: ValueError: a bad record'
  dog._check({_key(1): '5'}, now=0)
  assert not exits  # this process's own error handling and logging come first
  dog._deadline = 100
  dog._exiting.set()  # at its exit
  dog._check({_key(1): 'lost: process 0 of 2 failed (ValueError: a bad record)'}, now=1)
  assert exits == [1]
