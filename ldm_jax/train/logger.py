"""Training logs: metrics.jsonl, TensorBoard event files and a progress line with steps/s and ETA.

A resumed run replays the steps after its checkpoint: their rows from the interrupted run are
removed from metrics.jsonl and purged from TensorBoard, so that each step is recorded once.
"""

import json
import logging
import os
import time

import jax


class Logger:
  """Writes one JSON line and TensorBoard scalars per logged step (process 0 only).

  Args:
    workdir: where metrics.jsonl and tensorboard/ go.
    num_steps: the run's length (for the ETA).
    enabled: False on processes other than 0.
    start_step: the step the run starts from (a resumed checkpoint's): rows of later steps, from
      an interrupted run, are dropped.
  """

  def __init__(self, workdir, num_steps, enabled=True, start_step=0):
    self.num_steps, self.enabled = num_steps, enabled
    self._file = self._tb = None
    if enabled:
      path = os.path.join(workdir, 'metrics.jsonl')
      _drop_rows_after(path, start_step)
      self._file = open(path, 'a')
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        # purge_step: TensorBoard discards the earlier events from this step on.
        self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'),
                                              purge_step=start_step + 1)
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

  def log_eval(self, step, values, grid):
    """An evaluation's metrics as their own metrics.jsonl row ({'step', 'eval/...'}) and
    TensorBoard scalars, with the sample grid as a TensorBoard image."""
    if not self.enabled:
      return
    self._file.write(json.dumps({'step': step, **values}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(k, v, step)
      self._tb.add_image('eval/samples', grid, step, dataformats='HWC')

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


def _drop_rows_after(path, step):
  """Rewrites metrics.jsonl without the rows after `step` (and an unfinished last line)."""
  if not os.path.isfile(path):
    return
  kept, dropped, lines = [], [], 0
  with open(path) as f:
    for line in f:
      lines += 1
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # the interrupted run died while writing it
        continue
      (kept if row.get('step', 0) <= step else dropped).append(row)
  if len(kept) == lines:
    return
  if dropped:
    logging.warning('steps %d-%d are replayed from the checkpoint of step %d: their %d rows '
                    'logged by the interrupted run are replaced in %s', dropped[0]['step'],
                    dropped[-1]['step'], step, len(dropped), path)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(row) + '\n' for row in kept)
  os.replace(tmp, path)
