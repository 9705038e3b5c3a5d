"""The vae stage: the KL autoencoder's reconstruction + KL loss, with an optional patch-GAN."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import weights
from ldm_jax.convert import diffusers as convert_diffusers
from ldm_jax.models import build
from ldm_jax.models import discriminator
from ldm_jax.models import vae as vae_lib
from ldm_jax.sampling import outputs
from ldm_jax.train import losses
from ldm_jax.train.stages import base


class VAEStage(base.Stage):
  """The KL autoencoder: reconstruction + KL, and an optional patch-GAN with adaptive weight."""
  name = 'vae'

  def __init__(self, config, tokenizer=None):
    del tokenizer
    super().__init__(config)
    self.vae = build.networks_from_config(config.model)['vae']
    gan = config.vae_loss.gan
    self.disc = None
    if gan.enabled:
      self.disc = discriminator.NLayerDiscriminator(
          getattr(discriminator.DiscriminatorConfig, gan.preset)())
    if config.init:
      self.pretrained = {'vae': weights.load_init(config).vae[1]}
      if self.disc is not None:
        self.pretrained['disc'] = self._init_disc(jax.random.key(0))
    self._reconstruct = None  # the previews' jitted reconstruction, compiled once

  def _init_disc(self, rng):
    return self.disc.init(rng, jnp.zeros((1, 32, 32, 3)))['params']

  def init_params(self, rng):
    k_vae, k_disc = jax.random.split(rng)
    params = {'vae': build.init_params(self.vae, k_vae)}
    if self.disc is not None:
      params['disc'] = self._init_disc(k_disc)
    return params

  def loss(self, params, frozen, batch, keys, step):
    del frozen
    v = self.config.vae_loss
    images = batch['image']
    mean, logvar = self.vae.apply({'params': params['vae']}, images, method='encode')
    z = vae_lib.sample_posterior(mean, logvar, base.normal(keys, mean.shape[1:]))
    decode = lambda p: self.vae.apply({'params': p}, z, method='decode')
    rec = decode(params['vae'])
    rec_loss = losses.reconstruction(images, rec, v.kind)
    kl = losses.kl_divergence(mean, logvar)
    loss = rec_loss + v.kl_weight * kl
    metrics = {'reconstruction': rec_loss, 'kl': kl}
    if self.disc is None:
      return loss, metrics
    gan_loss, gan_metrics = self._gan_loss(params, images, rec, decode, step)
    return loss + gan_loss, metrics | gan_metrics

  def _gan_loss(self, params, images, rec, decode, step):
    """The generator's adaptively weighted adversarial loss and the discriminator's hinge loss."""
    v = self.config.vae_loss
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
    d_weight = losses.adaptive_gan_weight(rec_norm, gan_norm) * v.gan.weight
    on = losses.adopt_weight(1.0, step, v.gan.start_step)
    d_loss = losses.hinge_d_loss(disc(params['disc'], images),
                                 disc(params['disc'], jax.lax.stop_gradient(rec)))
    return on * (d_weight * g_adv + d_loss), {'g_adv': g_adv, 'd_loss': d_loss,
                                              'd_weight': d_weight}

  def preview(self, ema_params, frozen, images, mesh):
    """Training images over their reconstructions (posterior means)."""
    del frozen, mesh
    if images is None:
      return None
    if self._reconstruct is None:  # compiled once, reused by every preview
      self._reconstruct = jax.jit(lambda p, x: self.vae.apply({'params': p}, x)[0])
    rec = np.asarray(self._reconstruct(ema_params['vae'], images))
    to_u8 = lambda x: np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8)
    return outputs.make_grid(np.concatenate([to_u8(images), to_u8(rec)]), cols=len(images))

  def export(self, ema_params, frozen, path, loader):
    """vae/ of a diffusers folder, with the scaling factor measured on 8 batches of `loader`
    written into vae/config.json (where the ldm stage reads it, `vae_workdir`)."""
    del frozen
    vae = self.vae
    if loader is not None:
      factor = latent_scaling_factor(vae, ema_params['vae'], [next(loader) for _ in range(8)])
      vae = vae.clone(config=dataclasses.replace(vae.config, scaling_factor=factor))
      logging.info('latent scaling factor (1 / std of the latents): %.5f', factor)
    convert_diffusers.save_network(path, 'vae', vae, ema_params['vae'])
    logging.info('exported the EMA weights to %s', path)


def latent_scaling_factor(vae, params, batches):
  """1 / std of the posterior means over `batches`: the `scaling_factor` that gives the U-Net
  unit-variance latents (the LDM recipe's scale_by_std; SD 1.x/2.x's 0.18215 came from it)."""
  encode = jax.jit(lambda p, x: vae.apply({'params': p}, x, method='encode')[0])
  means = np.concatenate([np.asarray(encode(params, b['image'])).ravel() for b in batches])
  return float(1.0 / means.std())
