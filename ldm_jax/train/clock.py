"""Where the training loop's wall time goes: seconds per phase of the loop's own thread (waiting
for data, dispatching the step, waiting for the device, logging, checkpoints, previews), so that
a slow loop says what slows it (in its log rows, its last log line and bench/loop.py)."""

import collections
import contextlib
import time

# The loop's phases, in the order summaries print them.
PHASES = ('device', 'data', 'dispatch', 'log', 'checkpoint', 'preview', 'eval')
_WORDS = {'device': 'waiting for the device', 'data': 'waiting for data',
          'dispatch': 'dispatching the step', 'log': 'logging', 'checkpoint': 'checkpoints',
          'preview': 'previews', 'eval': 'evaluations', 'other': 'other'}


class Clock:
  """Adds up seconds per phase from `start()` on; `steps` counts the steps taken since."""

  def __init__(self):
    self.totals = collections.Counter()
    self.steps = 0
    self.wall_s = 0.0
    self.input_ms = {}  # the input thread's ms per batch: 'load', 'place' (set by the loop)
    self._t0 = None
    self._window = (0.0, collections.Counter(), 0)  # (time, totals, step) at the last window()

  def start(self, step):
    """Starts counting after `step` (the compiled first step: compilation is not the loop's
    cost)."""
    self.totals, self.steps, self.wall_s = collections.Counter(), 0, 0.0
    self._t0 = time.perf_counter()
    self._window = (self._t0, collections.Counter(), step)

  @property
  def started(self):
    return self._t0 is not None

  @contextlib.contextmanager
  def phase(self, name):
    t = time.perf_counter()
    try:
      yield
    finally:
      if self._t0 is not None:
        self.totals[name] += time.perf_counter() - t

  def stop(self):
    """Ends the count: `wall_s` is the time from `start()` to now."""
    if self._t0 is not None:
      self.wall_s = time.perf_counter() - self._t0

  def per_step_ms(self, totals=None, steps=None, wall_s=None):
    """Milliseconds per step of each phase, 'other' (the rest of the wall time) and 'wall'."""
    totals = self.totals if totals is None else totals
    steps = self.steps if steps is None else steps
    wall_s = self.wall_s if wall_s is None else wall_s
    if not steps:
      return {}
    out = {p: 1e3 * totals[p] / steps for p in PHASES}
    out['other'] = max(1e3 * wall_s / steps - sum(out.values()), 0.0)
    out['wall'] = 1e3 * wall_s / steps
    return out

  def window(self, step):
    """`per_step_ms` from the previous call's step to `step` (for log rows); {} before start."""
    t, totals, last = self._window
    if self._t0 is None or step <= last:
      return {}
    now = time.perf_counter()
    self._window = (now, collections.Counter(self.totals), step)
    return self.per_step_ms(self.totals - totals, step - last, now - t)

  def summary(self):
    """'per step 200.0 ms: waiting for the device 190.0, waiting for data 1.0, ...'."""
    ms = self.per_step_ms()
    if not ms:
      return 'no steps timed'
    parts = [f'{_WORDS[k]} {v:.1f}' for k, v in ms.items() if k != 'wall' and v >= 0.05]
    return f'per step {ms["wall"]:.1f} ms over {self.steps} steps: ' + ', '.join(parts)
