"""What a run writes besides checkpoints: preview grids and the final export (each stage says
what they hold); process 0 writes, every process takes part in gathering the weights."""

import logging
import os

import jax
import numpy as np
from PIL import Image

from ldm_jax import distributed
from ldm_jax import sharding


class Previewer:
  """Writes `<workdir>/samples/step_XXXXXX.png` from the EMA parameters (process 0 only).

  With several processes, process 0 samples alone on its own devices from gathered weights:
  the sampling pipeline is single-host code.
  """

  def __init__(self, stage, workdir, mesh):
    self.stage = stage
    self.mesh = sampling_mesh(mesh)
    self.folder = os.path.join(workdir, 'samples')
    self._images = None  # a few training images, for stages that show what they make of them

  def remember(self, host_batch):
    """Keeps a few images of the first training batch (the vae stage shows its reconstructions)."""
    if self._images is None and 'image' in host_batch:
      self._images = np.asarray(host_batch['image'][:8])

  def preview(self, ema_params, frozen, step):
    """Every process calls this (the EMA weights are gathered); process 0 writes the grid."""
    ema_params, frozen = distributed.to_host(ema_params), host_frozen(self.stage, frozen)
    if not distributed.is_main():
      return
    grid = self.stage.preview(ema_params, frozen, self._images, self.mesh)
    if grid is None:
      return
    os.makedirs(self.folder, exist_ok=True)
    path = os.path.join(self.folder, f'step_{step:06d}.png')
    Image.fromarray(grid).save(path)
    logging.info('preview: %s', path)


def sampling_mesh(mesh):
  """Where process 0 samples previews and evaluations: the run's mesh with one process, else its
  own devices (the sampling pipeline is single-host code)."""
  return mesh if jax.process_count() == 1 else sharding.make_mesh([('data', -1)],
                                                                  jax.local_devices())


def host_frozen(stage, frozen):
  """The frozen weights for process 0's previews and export: the placed ones with one process;
  with several, the host copy every process still holds (no gather: they never change)."""
  return frozen if jax.process_count() == 1 else stage.frozen


def export(stage, state, frozen, workdir, loader):
  """The stage's export of the final EMA weights into `<workdir>/export` (every process calls)."""
  ema_params = distributed.to_host(state['ema_params'])  # every process takes part
  frozen = host_frozen(stage, frozen)
  if distributed.is_main():
    stage.export(jax.device_get(ema_params), jax.device_get(frozen),
                 os.path.join(workdir, 'export'), loader)
