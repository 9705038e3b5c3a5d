"""The ldm stage: the latent diffusion U-Net's noise-prediction loss (and, optionally, the text
encoder trained jointly) over a frozen VAE."""

import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import convert
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax import weights
from ldm_jax.data import precompute
from ldm_jax.diffusion import pipeline
from ldm_jax.diffusion import schedules
from ldm_jax.models import build
from ldm_jax.models import vae as vae_lib
from ldm_jax.sampling import outputs
from ldm_jax.train import losses
from ldm_jax.train.stages import base


class LDMStage(base.Stage):
  """The latent diffusion U-Net (and, optionally, the text encoder trained jointly)."""
  name = 'ldm'
  samples = True

  def __init__(self, config, tokenizer):
    super().__init__(config)
    self.tokenizer = tokenizer
    self.train_text = bool(config.text_encoder.trainable)
    w = weights.ldm_weights(config, self.train_text)
    self.unet, self.vae, self.text_encoder = w.unet, w.vae, w.text_encoder
    self.frozen, self.pretrained = w.frozen, w.pretrained
    # The noise schedule: the init folder's when fine-tuning (its prediction type included).
    self.scheduler_config = w.scheduler_config
    self.schedule_config = schedules.ScheduleConfig.from_diffusers(self.scheduler_config)
    self.schedule = schedules.Schedule.create(self.schedule_config)
    latent = self.vae.config.latent_channels
    if (self.unet.config.in_channels not in (latent, 2 * latent + 1)
        or self.unet.config.out_channels != latent):
      raise ValueError(f'the U-Net takes {self.unet.config.in_channels} and gives '
                       f'{self.unet.config.out_channels} channels but the VAE has {latent} latent '
                       f'channels: set model.unet.in_channels/out_channels={latent}')
    self._pipeline = None  # the previews' sampler, compiled once

  @functools.cached_property
  def empty_context(self):
    """A frozen encoder's states of '' (precomputed states of dropped captions become these),
    computed on first use (only runs from precomputed text states need them). First use is while
    the loss is traced: evaluated eagerly, so that a concrete array, not a tracer, is kept."""
    with jax.ensure_compile_time_eval():
      return self.encode_empty_caption()

  def encode_empty_caption(self):
    """The frozen text encoder's states of '': precomputed states of dropped captions become it."""
    ids, _ = tokenizer_lib.tokenize(self.tokenizer, '', self.config.data.max_length)
    return self.text_encoder.apply({'params': self.frozen['text_encoder']}, ids).last_hidden_state

  def training_data(self, data_config, workdir):
    """With `precompute_latents`, the data encoded once into `<workdir>/precomputed`."""
    if not self.config.precompute_latents:
      return data_config
    return self.precompute(data_config, os.path.join(workdir, 'precomputed'))

  def precompute(self, data_config, directory):
    """Encodes the training data once with the frozen VAE (and frozen text encoder) into
    `directory`, kept for a resumed run; returns the data config that reads it."""
    if jax.process_count() > 1:
      raise ValueError('precompute_latents runs in one process: encode the data first with '
                       '`python -m ldm_jax.data precompute` (all hosts), then train with '
                       'data.precomputed=True')
    text = None if self.train_text else (self.text_encoder, self.frozen['text_encoder'])
    return precompute.for_training(data_config, self.tokenizer, (self.vae, self.frozen['vae']),
                                   text, directory)

  def init_params(self, rng):
    k_unet, k_text = jax.random.split(rng)
    params = {'unet': build.init_params(self.unet, k_unet)}
    if self.train_text:
      params['text_encoder'] = build.init_params(self.text_encoder, k_text)
    return params

  def _text(self, params, frozen):
    return params['text_encoder'] if self.train_text else frozen['text_encoder']

  def _latents(self, frozen, batch, keys):
    """Scaled posterior samples of the batch's images (or of their precomputed moments)."""
    if 'moments' in batch:
      mean, logvar = jnp.split(batch['moments'].astype(jnp.float32), 2, axis=-1)
    else:
      mean, logvar = jax.lax.stop_gradient(
          self.vae.apply({'params': frozen['vae']}, batch['image'], method='encode'))
    latents = vae_lib.sample_posterior(mean, logvar, base.normal(keys, mean.shape[1:]))
    return latents * self.vae.config.scaling_factor

  def _context(self, params, frozen, batch):
    """The text encoder's states of the captions; precomputed ones with '' for dropped captions."""
    if 'context' in batch and not self.train_text:
      return jnp.where(batch['drop'][:, None, None], self.empty_context, batch['context'])
    return self.text_encoder.apply({'params': self._text(params, frozen)},
                                   batch['input_ids']).last_hidden_state

  def loss(self, params, frozen, batch, keys, step):
    del step
    d = self.config.diffusion
    prediction_type = self.schedule_config.prediction_type
    k_post, k_t, k_noise, k_offset = base.split_keys(keys, 4)
    latents = self._latents(frozen, batch, k_post)
    context = self._context(params, frozen, batch)
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.schedule.num_train_timesteps))(k_t)
    noise = base.normal(k_noise, latents.shape[1:])
    if d.noise_offset:  # per-example, per-channel offset (Guttenberg's noise offset)
      noise = noise + d.noise_offset * base.normal(k_offset, (1, 1, latents.shape[-1]))
    x_t = schedules.q_sample(self.schedule, latents, noise, t)
    target = schedules.training_target(prediction_type, latents, noise, self.schedule, t)
    pred = self.unet.apply({'params': params['unet']}, x_t, t, context)
    weights_t = None
    if d.min_snr_gamma:
      weights_t = losses.min_snr_weights(self.schedule.snr(t), d.min_snr_gamma, prediction_type)
    loss = losses.diffusion_mse(pred, target, weights_t)
    return loss, {'mse': losses.diffusion_mse(pred, target)}

  def components(self, params, frozen):
    """The trained pipeline's networks as `convert.Components` (previews, export)."""
    return convert.Components(
        unet=(self.unet, params['unet']), vae=(self.vae, frozen['vae']),
        text_encoder=(self.text_encoder, self._text(params, frozen)), tokenizer=self.tokenizer,
        scheduler_config=self.scheduler_config)

  def preview(self, ema_params, frozen, images, mesh):
    """The config's `sample.prompts`, sampled from the EMA weights."""
    del images
    s = self.config.sample
    size = self.config.data.resolution
    samples = self._sampler(ema_params, frozen, mesh).generate(
        list(s.prompts), steps=s.steps, sampler=s.sampler, guidance_scale=s.guidance, seed=0,
        height=size, width=size)
    return outputs.make_grid(samples)

  def sample(self, ema_params, frozen, prompts, mesh, settings):
    """uint8 images of `prompts` from the EMA weights, `settings.batch_size` at a time (the last
    batch padded: one compiled function), seeded `settings.seed` + batch index."""
    sampler, size, n = self._sampler(ema_params, frozen, mesh), self.config.data.resolution, \
        settings.batch_size
    out = []
    for k, start in enumerate(range(0, len(prompts), n)):
      chunk = list(prompts[start:start + n])
      images = sampler.generate(chunk + chunk[-1:] * (n - len(chunk)), steps=settings.steps,
                                sampler=settings.sampler, guidance_scale=settings.guidance,
                                seed=settings.seed + k, height=size, width=size)
      out.append(images[:len(chunk)])
    return np.concatenate(out)

  def _sampler(self, ema_params, frozen, mesh):
    """The sampling pipeline with these weights: one for the run, so that its compiled
    functions are reused by every preview and evaluation."""
    components = self.components(ema_params, frozen)
    if self._pipeline is None:
      self._pipeline = pipeline.StableDiffusion(components, mesh)
    else:
      self._pipeline.set_weights(components.unet[1], components.vae[1],
                                 components.text_encoder[1])
    return self._pipeline

  def export(self, ema_params, frozen, path, loader):
    """The whole pipeline as a diffusers folder."""
    del loader
    convert.save_diffusers(self.components(ema_params, frozen), path)
    logging.info('exported the EMA weights to %s', path)
