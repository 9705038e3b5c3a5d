"""What a run produces besides checkpoints: preview grids, a diffusers export, sampling components."""

import dataclasses
import logging
import os

import jax
import numpy as np
from PIL import Image

from ldm_jax import convert
from ldm_jax import distributed
from ldm_jax import sharding
from ldm_jax.convert import diffusers as convert_diffusers
from ldm_jax.diffusion import outputs
from ldm_jax.diffusion import pipeline


class Previewer:
  """Writes `<workdir>/samples/step_XXXXXX.png` from the EMA parameters (process 0 only).

  With several processes, process 0 samples alone on its own devices from gathered weights:
  the sampling pipeline is single-host code.
  """

  def __init__(self, stage, config, workdir, mesh):
    self.stage, self.config = stage, config
    self.mesh = mesh if jax.process_count() == 1 else sharding.make_mesh([('data', -1)],
                                                                         jax.local_devices())
    self.folder = os.path.join(workdir, 'samples')
    self._sd = None
    self._images = None  # a few training images, for the vae stage's reconstructions
    self._reconstruct = None

  def preview(self, ema_params, frozen, step):
    """Every process calls this (the EMA weights are gathered); process 0 writes the grid."""
    ema_params, frozen = distributed.to_host(ema_params), host_frozen(self.stage, frozen)
    if not distributed.is_main():
      return
    os.makedirs(self.folder, exist_ok=True)
    if self.stage.name == 'ldm':
      grid = self._ldm(ema_params, frozen)
    elif self.stage.name == 'vae' and self._images is not None:
      grid = self._vae(ema_params)
    else:
      return
    path = os.path.join(self.folder, f'step_{step:06d}.png')
    Image.fromarray(grid).save(path)
    logging.info('preview: %s', path)

  def _ldm(self, ema_params, frozen):
    s = self.config.sample
    components = self.stage.components(ema_params, frozen)
    if self._sd is None:  # one pipeline: its compiled function is reused by every preview
      self._sd = pipeline.StableDiffusion(components, self.mesh)
    else:
      self._sd.set_weights(components.unet[1], components.vae[1], components.text_encoder[1])
    images = self._sd.generate(list(s.prompts), steps=s.steps, sampler=s.sampler,
                               guidance_scale=s.guidance, seed=0, height=self.config.data.resolution,
                               width=self.config.data.resolution)
    return outputs.make_grid(images)

  def _vae(self, ema_params):
    """Originals over their reconstructions (posterior means)."""
    vae, images = self.stage.vae, self._images
    if self._reconstruct is None:  # compiled once, reused by every preview
      self._reconstruct = jax.jit(lambda p, x: vae.apply({'params': p}, x)[0])
    rec = np.asarray(self._reconstruct(ema_params['vae'], images))
    to_u8 = lambda x: np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return outputs.make_grid(np.concatenate([to_u8(images), to_u8(rec)]), cols=len(images))

  def remember(self, host_batch):
    """Keeps a few training images to show the VAE's reconstructions of."""
    if self._images is None and 'image' in host_batch:
      self._images = np.asarray(host_batch['image'][:8])


def latent_scaling_factor(vae, params, batches):
  """1 / std of the posterior means over `batches`: the `scaling_factor` that gives the U-Net
  unit-variance latents (the LDM recipe's scale_by_std; SD 1.x/2.x's 0.18215 came from it)."""
  encode = jax.jit(lambda p, x: vae.apply({'params': p}, x, method='encode')[0])
  means = np.concatenate([np.asarray(encode(params, b['image'])).ravel() for b in batches])
  return float(1.0 / means.std())


def host_frozen(stage, frozen):
  """The frozen weights for process 0's previews and export: the placed ones with one process;
  with several, the host copy every process still holds (no gather: they never change)."""
  return frozen if jax.process_count() == 1 else stage.frozen


def export(stage, ema_params, frozen, path, loader=None):
  """A diffusers folder from the EMA parameters (ldm: the whole pipeline; vae: vae/ only).

  The vae stage also measures its latents' scaling factor on 8 batches of `loader` and writes
  it into vae/config.json, where the ldm stage reads it (`vae_workdir`).
  """
  if stage.name == 'ldm':
    convert.save_diffusers(stage.components(ema_params, frozen), path)
  elif stage.name == 'vae':
    vae = stage.vae
    if loader is not None:
      factor = latent_scaling_factor(vae, ema_params['vae'], [next(loader) for _ in range(8)])
      vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=factor))
      logging.info('latent scaling factor (1 / std of the latents): %.5f', factor)
    convert_diffusers.save_network(path, 'vae', vae, ema_params['vae'])
  else:
    return
  logging.info('exported the EMA weights to %s', path)


def components_from_workdir(workdir):
  """Sampling components from a workdir's latest checkpoint (EMA parameters).

  Rebuilds the ldm stage from the config saved in the checkpoint (the frozen VAE comes from
  where training took it), so the run's sources must still exist.
  """
  from ldm_jax.train import loop  # pylint: disable=g-import-not-at-top  (loop imports us)
  from ldm_jax.train import stages  # pylint: disable=g-import-not-at-top
  from ldm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  config = loop.config_from_checkpoint(workdir)
  if config.stage != 'ldm':
    raise ValueError(f'{workdir} trained the {config.stage!r} stage; sampling needs an ldm run')
  tok = loop.resolve_tokenizer(config, workdir)
  stage = stages.build_stage(config, tok)
  step, state = checkpoint.read_checkpoint(workdir)
  logging.info('sampling from step %d of %s (EMA parameters)', step, workdir)
  return stage.components(state['ema_params'], stage.frozen)
