"""The multi-process watchdog: when a process of a run is lost (killed, its host gone) or fails,
every other process says which one and why, and exits (LOST_PROCESS_EXIT) instead of waiting for
it in a collective. Started by `distributed.initialize` with several processes.
"""

import atexit
import logging
import os
import sys
import threading
import time

import jax

# A process of the run was lost (or failed): this one stopped too. EX_TEMPFAIL: restarting every
# process with the same command resumes from the newest checkpoint.
LOST_PROCESS_EXIT = 75
_KEY = 'ldm_jax/alive/'  # + process id, in the coordination service's key-value store


class Watchdog:
  """Stops this process, naming the lost one, when another process of the run is lost.

  Why not JAX's heartbeats alone: a survivor waits (in a collective, or in JAX's shutdown
  barrier after gloo's 'Connection reset by peer') until they time out, 100 s by default, then a
  C++ thread aborts it naming task ids only; their Python callback cannot be set (jaxlib 0.10.2:
  std::bad_cast). So a thread in every process writes a counter to the coordination service's
  key-value store every `interval_s` and reads everyone's: a counter unchanged for `timeout_s`
  is a lost process. A process's value is its counter while it runs, then 'done' (a clean exit:
  its silence is expected), 'failed: <error>' (an uncaught exception, or report_failure) or
  'lost: <reason>' (it stops for a lost process). A process that stops waits until the others
  have read why (process 0 a little longer: the service lives there; when process 0 itself dies,
  JAX aborts the others at once with 'Socket closed').
  """

  def __init__(self, client, timeout_s):
    self.client, self.timeout_s = client, timeout_s
    self.me, self.count = jax.process_index(), jax.process_count()
    self.interval_s = min(max(timeout_s / 10, 0.5), 10)
    self.checkpoints = None  # see note_checkpoints
    self.value = '0'  # what this process publishes: its counter, or why it stops
    self.exit_code = None  # once stopping: 1 (this process failed) or LOST_PROCESS_EXIT
    self._deadline = None  # once leaving: exit by then even if some process has not reacted
    self._seen = {}  # process -> (its value, when it last changed)
    self._lock = threading.Lock()
    self._done = threading.Event()  # a clean exit: stop watching
    self._exiting = threading.Event()  # a failed process has reached its exit
    self._thread = threading.Thread(target=self._run, name='ldm_jax_watchdog', daemon=True)

  def start(self):
    self._hook, sys.excepthook = sys.excepthook, self._excepthook
    atexit.register(self._at_exit)  # runs before JAX's clean-up (registered when jax imports)
    self._thread.start()
    logging.info('process %d of %d: a process silent for %s s or failing stops them all (exit '
                 'code %d)', self.me, self.count, self.timeout_s, LOST_PROCESS_EXIT)

  def _run(self):
    while not self._done.wait(self.interval_s):
      try:
        self._publish(str(int(self.value) + 1) if self.value.isdigit() else self.value)
        values = dict(self.client.key_value_dir_get(_KEY))
      except Exception as e:  # pylint: disable=broad-except  (the service is gone)
        self._stop(f'the coordination service in process 0 cannot be reached '
                   f'({str(e).strip().splitlines()[0]})')
        self._exit()
      self._check(values, time.monotonic())

  def _publish(self, value):
    self.value = value
    self.client.key_value_set(f'{_KEY}{self.me}', value, allow_overwrite=True)

  def _check(self, values, now):
    """Reads everyone's values: stops at a lost process; exits once the others have reacted."""
    settled = True  # every other process has stopped counting, or is lost
    listening = False  # some other process may still read this process's value
    for p in range(self.count):
      value = values.get(f'{_KEY}{p}') or ''
      if p == self.me:
        continue
      last, since = self._seen.get(p, (None, now))
      if value != last:
        self._seen[p], since = (value, now), now
      counting, silent = value == '' or value.isdigit(), now - since
      if counting and silent > self.timeout_s:  # the cause, even of this process's own failure
        self._stop(f'process {p} of {self.count} stopped answering (no heartbeat for '
                   f'{silent:.0f} s)')
      elif value.startswith('failed: ') and self.exit_code is None:
        self._stop(f'process {p} of {self.count} failed ({value[len("failed: "):]})')
      elif value.startswith('lost: ') and self.exit_code is None:
        self._stop(value[len('lost: '):])
      settled = settled and not (counting and silent <= self.timeout_s)
      listening = listening or not (value == 'done' or counting and silent > self.timeout_s)
    leaving = self.exit_code == LOST_PROCESS_EXIT or self._exiting.is_set()
    if leaving and (settled or now > self._deadline):
      if self.me == 0 and listening:  # the service lives here: let them read why it stops
        time.sleep(2 * self.interval_s)
      self._exit()

  def _stop(self, reason):
    """Logs why this process stops (once) and publishes it; `_check` exits."""
    with self._lock:
      if self.exit_code == LOST_PROCESS_EXIT:
        return
      self.exit_code, self._deadline = LOST_PROCESS_EXIT, self._later()
    logging.error('%s: stopping process %d of %d. Restart all of them (the same command) to '
                  'resume from the newest checkpoint%s', reason, self.me, self.count,
                  _newest_checkpoint(self.checkpoints))
    try:
      self._publish(f'lost: {reason}')
    except Exception:  # pylint: disable=broad-except  (the service is gone: nobody to tell)
      pass

  def _later(self):
    return time.monotonic() + self.timeout_s + 2 * self.interval_s

  def _exit(self):
    for handler in logging.getLogger().handlers:
      handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(self.exit_code)  # the main thread may be stuck in a collective: no clean-up

  def fail(self, error):
    """Publishes this process's failure (see report_failure)."""
    text = str(error).strip()
    if isinstance(error, BaseException):
      text = f'{type(error).__name__}: {text}' if text else type(error).__name__
    with self._lock:
      if self.exit_code is not None:
        return
      self.exit_code = 1
    try:
      self._publish(f'failed: {text.splitlines()[0] if text else "an error"}')
    except Exception:  # pylint: disable=broad-except  (the service is gone: nobody to tell)
      pass

  def _excepthook(self, kind, error, traceback):
    self._hook(kind, error, traceback)
    self.fail(error)

  def _at_exit(self):
    """A clean exit publishes 'done'; a failure waits for the thread to exit the process once the
    others have stopped (JAX's shutdown would wait for them in a barrier)."""
    if self.exit_code is not None:
      self._deadline = self._deadline or self._later()
      self._exiting.set()
      self._thread.join(timeout=2 * self.timeout_s)
      self._exit()
    self._done.set()
    self._thread.join(timeout=self.timeout_s)
    try:
      self._publish('done')
    except Exception:  # pylint: disable=broad-except  (the service is gone: nobody to tell)
      pass


def _newest_checkpoint(directory):
  """' (step N in <directory>)' for the message; orbax names a step's folder once it is written."""
  if directory is None:
    return ''
  try:
    steps = [int(name) for name in os.listdir(directory) if name.isdigit()]
  except OSError:
    steps = None
  if not steps:
    return f' in {directory}' if steps is None else f' (none in {directory} yet: it starts over)'
  return f' (step {max(steps)} in {directory})'
