"""Training logs: metrics.jsonl, TensorBoard event files and a progress line with steps/s and ETA."""

import json
import os
import time

import jax
import numpy as np


class Logger:
  """Writes one JSON line and TensorBoard scalars per logged step (process 0 only)."""

  def __init__(self, workdir, num_steps, enabled=True):
    self.num_steps, self.enabled = num_steps, enabled
    self._file = self._tb = None
    if enabled:
      self._file = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))
      except ImportError:  # pragma: no cover - tensorboardX is a dependency
        self._tb = None
    self._last_time, self._last_step = time.time(), None

  def log(self, step, metrics, batch_size, extra=None):
    """Logs device metrics (read back here) with rates since the previous call."""
    now = time.time()
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if self._last_step is not None and step > self._last_step:
      dt = (now - self._last_time) / (step - self._last_step)
      values.update(step_time_s=dt, steps_per_s=1 / dt, images_per_s=batch_size / dt)
    self._last_time, self._last_step = now, step
    record = {'step': step, **values, **(extra or {})}
    if self.enabled:
      self._file.write(json.dumps(record) + '\n')
      self._file.flush()
      if self._tb is not None:
        for k, v in record.items():
          if isinstance(v, (int, float)) and k != 'step':
            self._tb.add_scalar(k, v, step)
      print(self._progress_line(step, values), flush=True)
    return values

  def _progress_line(self, step, values):
    line = f'step {step}/{self.num_steps} loss {values.get("loss", float("nan")):.4f}'
    if 'steps_per_s' in values:
      eta = (self.num_steps - step) / values['steps_per_s']
      line += (f' | {values["steps_per_s"]:.2f} steps/s, {values["images_per_s"]:.1f} images/s'
               f' | ETA {int(eta // 60)}m{int(eta % 60):02d}s')
    return line

  def close(self):
    if self._file:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def finite(values):
  return all(np.isfinite(v) for v in values.values())
