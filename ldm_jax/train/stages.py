"""The training stages: what is trained, what is frozen, and the loss of each.

A stage has `init_params(rng)` (the trainable tree, traced under jit), `frozen` (a tree of
fixed parameters), `loss(params, frozen, batch, keys, step) -> (loss, metrics)` and
`components(params, frozen)` (a `convert.Components` for previews, export and sampling).
"""

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp

from ldm_jax import checkpoint
from ldm_jax import convert
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import precompute
from ldm_jax.diffusion import schedules
from ldm_jax.models import build
from ldm_jax.models import discriminator
from ldm_jax.models import image_encoder
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import vae as vae_lib
from ldm_jax.train import losses


def scheduler_config(diffusion):
  """The diffusers scheduler_config.json our models ship with (SD's conventions)."""
  return {'_class_name': 'DDIMScheduler', 'num_train_timesteps': diffusion.num_train_timesteps,
          'beta_start': diffusion.beta_start, 'beta_end': diffusion.beta_end,
          'beta_schedule': diffusion.beta_schedule, 'prediction_type': diffusion.prediction_type,
          'rescale_betas_zero_snr': diffusion.rescale_betas_zero_snr, 'steps_offset': 1,
          'clip_sample': False, 'set_alpha_to_one': False, 'timestep_spacing': 'leading'}


def _normal(keys, shape):
  return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


def _split(keys, n):
  return [jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(n)]


def _params_from_workdir(workdir, name):
  """The EMA parameters of network `name` from one of our training runs."""
  step, state = checkpoint.read_checkpoint(workdir)
  logging.info('%s: EMA parameters of step %d of %s', name, step, workdir)
  return state['ema_params'][name]


def _vae_of_run(workdir, vae):
  """The VAE module of a vae-stage run: its exported config (with the measured scaling factor)."""
  path = os.path.join(workdir, 'export', 'vae', 'config.json')
  if not os.path.isfile(path):
    logging.warning('%s has no exported VAE config (the run has not finished): using '
                    'model.vae and its scaling_factor %.5f', workdir, vae.config.scaling_factor)
    return vae
  with open(path) as f:
    exported = vae_lib.VAEConfig.from_diffusers(
        json.load(f), dtype=vae.config.dtype, param_dtype=vae.config.param_dtype,
        attention_impl=vae.config.attention_impl)
  logging.info('VAE of %s: scaling factor %.5f', workdir, exported.scaling_factor)
  return vae_lib.AutoencoderKL(exported)


class LDMStage:
  """The latent diffusion U-Net (and, optionally, the text encoder trained jointly)."""
  name = 'ldm'

  def __init__(self, config, tokenizer):
    self.config, self.tokenizer = config, tokenizer
    nets = build.networks_from_config(config.model)
    self.unet, self.vae, self.text_encoder = nets['unet'], nets['vae'], nets['text_encoder']
    self.init = None
    if config.init:  # fine-tuning: the networks are the folder's, as they were trained
      self.init = convert.load_diffusers(config.init, dtype=jnp.dtype(config.model.dtype),
                                         param_dtype=jnp.dtype(config.model.param_dtype))
      self.unet, self.vae, self.text_encoder = (self.init.unet[0], self.init.vae[0],
                                                self.init.text_encoder[0])
    elif config.vae_workdir:
      self.vae = _vae_of_run(config.vae_workdir, self.vae)
    # The noise schedule: the init folder's when fine-tuning (its prediction type included).
    self.scheduler_config = (dict(self.init.scheduler_config) if self.init is not None
                             else scheduler_config(config.diffusion))
    self.schedule_config = schedules.ScheduleConfig.from_diffusers(self.scheduler_config)
    self.schedule = schedules.Schedule.create(self.schedule_config)
    self.train_text = bool(config.text_encoder.trainable)
    latent = self.vae.config.latent_channels
    if (self.unet.config.in_channels not in (latent, 2 * latent + 1)
        or self.unet.config.out_channels != latent):
      raise ValueError(f'the U-Net takes {self.unet.config.in_channels} and gives '
                       f'{self.unet.config.out_channels} channels but the VAE has {latent} latent '
                       f'channels: set model.unet.in_channels/out_channels={latent}')
    self.frozen = self._load_frozen()

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

  def precompute(self, data_config, directory):
    """Encodes the training data once with the frozen VAE (and frozen text encoder) into
    `directory`, kept for a resumed run; returns the data config that reads it."""
    if jax.process_count() > 1:
      raise ValueError('precompute_latents runs in one process: encode the data first with '
                       'ldm_jax.data.precompute on one host, then train with data.precomputed')
    text = None if self.train_text else (self.text_encoder, self.frozen['text_encoder'])
    return precompute.for_training(data_config, self.tokenizer, (self.vae, self.frozen['vae']),
                                   text, directory)

  def _load_frozen(self):
    c = self.config
    frozen = {}
    init = self.init
    if init is not None:
      frozen['vae'] = init.vae[1]
    elif c.vae_workdir:
      frozen['vae'] = _params_from_workdir(c.vae_workdir, 'vae')
    elif c.allow_random_vae:
      logging.warning('ldm stage with a RANDOM frozen VAE (allow_random_vae): smoke runs only')
      frozen['vae'] = build.random_params(self.vae, 0)
    else:
      raise ValueError('the ldm stage needs a trained VAE: set --config.vae_workdir=<a vae-stage '
                       'workdir> or --config.init=<a diffusers folder>')
    if not self.train_text:
      if init is not None:
        frozen['text_encoder'] = init.text_encoder[1]
      elif c.text_encoder.workdir:
        params = dict(_params_from_workdir(c.text_encoder.workdir, 'text_encoder'))
        params.pop('text_projection', None)  # the clip stage's; the U-Net uses the states
        frozen['text_encoder'] = params
      else:
        raise ValueError('a frozen text encoder needs weights: --config.init=<diffusers folder> or '
                         '--config.text_encoder.workdir=<a clip-stage workdir>, or train it '
                         'jointly with --config.text_encoder.trainable=True')
    self.initial = {'unet': init.unet[1]} if init is not None else None
    if init is not None and self.train_text:
      self.initial['text_encoder'] = init.text_encoder[1]
    return frozen

  def init_params(self, rng):
    k_unet, k_text = jax.random.split(rng)
    params = {'unet': build.init_params(self.unet, k_unet)}
    if self.train_text:
      params['text_encoder'] = build.init_params(self.text_encoder, k_text)
    return params

  def _text(self, params, frozen):
    return params['text_encoder'] if self.train_text else frozen['text_encoder']

  def loss(self, params, frozen, batch, keys, step):
    del step
    d = self.config.diffusion
    prediction_type = self.schedule_config.prediction_type
    k_post, k_t, k_noise, k_offset = _split(keys, 4)
    if 'moments' in batch:  # precomputed
      mean, logvar = jnp.split(batch['moments'].astype(jnp.float32), 2, axis=-1)
    else:
      mean, logvar = jax.lax.stop_gradient(
          self.vae.apply({'params': frozen['vae']}, batch['image'], method='encode'))
    latents = mean + jnp.exp(0.5 * logvar) * _normal(k_post, mean.shape[1:])
    latents = latents * self.vae.config.scaling_factor
    if 'context' in batch and not self.train_text:  # precomputed; dropped captions get ''
      context = jnp.where(batch['drop'][:, None, None], self.empty_context, batch['context'])
    else:
      context = self.text_encoder.apply({'params': self._text(params, frozen)},
                                        batch['input_ids']).last_hidden_state
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.schedule.num_train_timesteps))(k_t)
    noise = _normal(k_noise, latents.shape[1:])
    if d.noise_offset:  # per-example, per-channel offset (Guttenberg's noise offset)
      noise = noise + d.noise_offset * _normal(k_offset, (1, 1, latents.shape[-1]))
    x_t = schedules.q_sample(self.schedule, latents, noise, t)
    target = schedules.training_target(prediction_type, latents, noise, self.schedule, t)
    pred = self.unet.apply({'params': params['unet']}, x_t, t, context)
    weights = None
    if d.min_snr_gamma:
      weights = losses.min_snr_weights(self.schedule.snr(t), d.min_snr_gamma, prediction_type)
    loss = losses.diffusion_mse(pred, target, weights)
    return loss, {'mse': losses.diffusion_mse(pred, target)}

  def components(self, params, frozen):
    return convert.Components(
        unet=(self.unet, params['unet']), vae=(self.vae, frozen['vae']),
        text_encoder=(self.text_encoder, self._text(params, frozen)), tokenizer=self.tokenizer,
        scheduler_config=self.scheduler_config)


class VAEStage:
  """The KL autoencoder: reconstruction + KL, and an optional patch-GAN with adaptive weight."""
  name = 'vae'

  def __init__(self, config, tokenizer=None):
    del tokenizer
    self.config = config
    self.vae = build.networks_from_config(config.model)['vae']
    gan = config.vae_loss.gan
    self.disc = None
    if gan.enabled:
      self.disc = discriminator.NLayerDiscriminator(
          getattr(discriminator.DiscriminatorConfig, gan.preset)())
    self.frozen = {}
    self.initial = None
    if config.init:
      self.initial = {'vae': convert.load_diffusers(config.init).vae[1]}
      if self.disc is not None:
        self.initial['disc'] = self.disc.init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']

  def init_params(self, rng):
    k_vae, k_disc = jax.random.split(rng)
    params = {'vae': build.init_params(self.vae, k_vae)}
    if self.disc is not None:
      params['disc'] = self.disc.init(k_disc, jnp.zeros((1, 32, 32, 3)))['params']
    return params

  def loss(self, params, frozen, batch, keys, step):
    del frozen
    v = self.config.vae_loss
    images = batch['image']
    mean, logvar = self.vae.apply({'params': params['vae']}, images, method='encode')
    z = mean + jnp.exp(0.5 * logvar) * _normal(keys, mean.shape[1:])
    decode = lambda p: self.vae.apply({'params': p}, z, method='decode')
    rec = decode(params['vae'])
    rec_loss = losses.reconstruction(images, rec, v.kind)
    kl = losses.kl_divergence(mean, logvar)
    loss = rec_loss + v.kl_weight * kl
    metrics = {'reconstruction': rec_loss, 'kl': kl}
    if self.disc is None:
      return loss, metrics
    gan = v.gan
    disc = lambda p, x: self.disc.apply({'params': p}, x)
    frozen_disc = jax.lax.stop_gradient(params['disc'])
    g_adv = losses.generator_adv_loss(disc(frozen_disc, rec))
    # The adaptive weight balances the two losses' gradients at the decoder's last layer.
    frozen_vae = jax.lax.stop_gradient(params['vae'])
    with_kernel = lambda k: losses.replace_leaf(frozen_vae, losses.DECODER_LAST_LAYER, k)
    rec_norm, gan_norm = losses.last_layer_grad_norms(
        (lambda k: losses.reconstruction(images, decode(with_kernel(k)), v.kind),
         lambda k: losses.generator_adv_loss(disc(frozen_disc, decode(with_kernel(k))))),
        params['vae']['decoder']['conv_out']['kernel'])
    d_weight = losses.adaptive_gan_weight(rec_norm, gan_norm) * gan.weight
    on = losses.adopt_weight(1.0, step, gan.start_step)
    d_loss = losses.hinge_d_loss(disc(params['disc'], images),
                                 disc(params['disc'], jax.lax.stop_gradient(rec)))
    loss = loss + on * (d_weight * g_adv + d_loss)
    return loss, metrics | {'g_adv': g_adv, 'd_loss': d_loss, 'd_weight': d_weight}

  def components(self, params, frozen):
    del frozen
    return {'vae': (self.vae, params['vae'])}


class CLIPStage:
  """Contrastive image-text pretraining of the text encoder with a small ViT image tower."""
  name = 'clip'

  def __init__(self, config, tokenizer=None):
    self.config, self.tokenizer = config, tokenizer
    te = build.networks_from_config(config.model)['text_encoder']
    self.text_encoder = text_encoder_lib.CLIPTextModel(
        dataclasses.replace(te.config, with_projection=True,
                            projection_dim=config.clip.projection_dim))
    image_config = getattr(image_encoder.ImageEncoderConfig, config.clip.image_preset)(
        image_size=config.data.resolution, projection_dim=config.clip.projection_dim)
    self.image_encoder = image_encoder.ViTImageEncoder(image_config)
    self.frozen = {}
    self.initial = None

  def init_params(self, rng):
    k_text, k_image = jax.random.split(rng)
    size = self.image_encoder.config.image_size
    return {'text_encoder': build.init_params(self.text_encoder, k_text),
            'image_encoder': self.image_encoder.init(
                k_image, jnp.zeros((1, size, size, 3)))['params'],
            'logit_scale': jnp.asarray(losses.CLIP_INIT_LOGIT_SCALE, jnp.float32)}

  def loss(self, params, frozen, batch, keys, step):
    del frozen, keys, step
    image_embeds = self.image_encoder.apply({'params': params['image_encoder']}, batch['image'])
    text = self.text_encoder.apply({'params': params['text_encoder']}, batch['input_ids'])
    return losses.clip_contrastive(image_embeds, text.text_embeds, params['logit_scale'])

  def components(self, params, frozen):
    del frozen
    return {'text_encoder': (self.text_encoder, params['text_encoder'])}


STAGES = {'ldm': LDMStage, 'vae': VAEStage, 'clip': CLIPStage}


def build_stage(config, tokenizer):
  if config.stage not in STAGES:
    raise ValueError(f'config.stage={config.stage!r} is not one of {sorted(STAGES)}')
  return STAGES[config.stage](config, tokenizer)
