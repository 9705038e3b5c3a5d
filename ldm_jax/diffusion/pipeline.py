"""The text-to-image pipeline: txt2img, img2img and inpainting as one jitted function per shape.

One compiled function per (sampler, steps, mode, batch, image shape): tokenized prompts in,
text encoder, the denoising loop with classifier-free guidance inside its body, VAE decode,
images out. Prompts, seeds, guidance scale and img2img strength are arguments, so changing them
does not recompile. The batch is sharded over the mesh's `data` axis.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import sharding
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.diffusion import samplers
from ldm_jax.models import layers

P = jax.sharding.PartitionSpec
SAMPLERS = samplers.SAMPLERS


class StableDiffusion:
  """Samples from Stable Diffusion components (`ldm_jax.convert.load_diffusers` or our own).

  Attributes:
    compile_count: how many functions were compiled so far (a recompile guard for tests).
  """

  def __init__(self, components, mesh=None):
    """Places the parameters on the mesh (replicated) and prepares the tokenizer.

    Args:
      components: a `ldm_jax.convert.Components`.
      mesh: a `jax.sharding.Mesh` with a 'data' axis; default: all devices on 'data'.
    """
    if components.tokenizer is None:
      raise ValueError('these components have no tokenizer; sampling from prompts needs one')
    self.unet, unet_params = components.unet
    self.vae, vae_params = components.vae
    self.text_encoder, te_params = components.text_encoder
    self.tokenizer = components.tokenizer
    self.scheduler_config = dict(components.scheduler_config)
    self.mesh = mesh or sharding.make_mesh([('data', -1)])
    self.set_weights(unet_params, vae_params, te_params)
    self.vae_scale = self.vae.config.downsample_factor
    size = self.unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    self.default_size = (size[0] * self.vae_scale, size[1] * self.vae_scale)
    self.max_length = min(self.tokenizer.model_max_length,
                          self.text_encoder.config.max_position_embeddings)
    self.compile_count = 0
    self._compiled = {}
    self._plans = {}

  def set_weights(self, unet_params, vae_params, text_params):
    """Places new weights (same shapes) on the mesh, replicated; compiled functions are kept."""
    self.params = jax.device_put({'unet': unet_params, 'vae': vae_params, 'text': text_params},
                                 jax.sharding.NamedSharding(self.mesh, P()))

  def tokenize(self, texts):
    """(N, max_length) int32 ids, padded and truncated as diffusers does (with a warning)."""
    ids, truncated = tokenizer_lib.tokenize(self.tokenizer, list(texts), self.max_length)
    for text in np.asarray(list(texts), object)[truncated]:
      logging.warning('prompt longer than %d tokens, truncated: %r', self.max_length, text[:200])
    return ids

  def generate(self, prompts, *, negative_prompts=None, steps=50, sampler='ddim',
               guidance_scale=7.5, seed=0, height=None, width=None, latents=None,
               init_images=None, strength=None, masks=None, eta=0.0, guidance_rescale=0.0,
               clip_skip=None, output='uint8', progress=None):
    """Generates one image per prompt.

    Args:
      prompts: a string or a list of N strings.
      negative_prompts: None (the empty prompt), a string for all, or N strings.
      steps: number of inference steps.
      sampler: one of SAMPLERS.
      guidance_scale: classifier-free guidance weight; <= 1 skips the unconditional half.
      seed: the PRNG seed for the initial noise, the VAE posterior and stochastic samplers.
      height, width: image size, divisible by the VAE factor (8); default: the init images' or
        the latents' size, else the model's.
      latents: (N, h, w, C) initial noise (unscaled) instead of drawing it from `seed`.
      init_images: (N, H, W, 3) images for img2img/inpainting, float in [-1, 1] or uint8.
      strength: img2img/inpainting strength in (0, 1] (diffusers' rule; default 0.8 for
        img2img, 1.0 for inpainting).
      masks: (N, H, W) or (N, H, W, 1) in [0, 1], 1 where to repaint: inpainting.
      eta: DDIM's noise level.
      guidance_rescale: diffusers' guidance_rescale phi (0 = off).
      clip_skip: use the text encoder's layer -(clip_skip + 1), as diffusers' clip_skip.
      output: 'uint8' (N, H, W, 3) images, or 'float' in [0, 1].
      progress: optional callback(step, num_steps) called as the loop advances.

    Returns:
      np.ndarray of N images, NHWC.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if n == 0:
      raise ValueError('no prompts given')
    negative_prompts = self._negatives(negative_prompts, n)
    mode = 'txt2img' if init_images is None else ('img2img' if masks is None else 'inpaint')
    if masks is not None and init_images is None:
      raise ValueError('masks need init_images: inpainting repaints parts of given images')
    height, width = self._size(height, width, init_images, latents)
    strength = (1.0 if mode == 'inpaint' else 0.8) if strength is None else float(strength)
    if not 0 < strength <= 1:
      raise ValueError(f'strength must be in (0, 1], got {strength}')
    plan = self._plan(sampler, steps, eta)
    start = 0 if mode == 'txt2img' else samplers.strength_start(plan, strength)
    if start >= plan.num_steps:
      raise ValueError(f'strength {strength} with {steps} steps runs no step; raise either')

    batch = -(-n // self.mesh.shape['data']) * self.mesh.shape['data']  # pad to the devices
    pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch - n, axis=0)]) if batch > n else x
    key = jax.random.key(seed)
    shape = (batch, height // self.vae_scale, width // self.vae_scale,
             self.vae.config.latent_channels)
    if latents is None:
      noise = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    else:
      noise = pad(np.asarray(latents, np.float32).reshape((n,) + shape[1:]))
    images = masks_arr = None
    if mode != 'txt2img':
      images = pad(_to_unit_range(init_images, n, height, width))
    if mode == 'inpaint':
      masks_arr = pad(_mask_array(masks, n, height, width))
    args = dict(cond=pad(self.tokenize(prompts)), uncond=pad(self.tokenize(negative_prompts)),
                noise=noise, images=images, masks=masks_arr,
                start=np.int32(start), pure_noise=np.bool_(mode == 'inpaint' and strength == 1.0),
                guidance=np.float32(guidance_scale), rescale=np.float32(guidance_rescale), key=key)
    fn = self._function(plan, mode, guidance_scale > 1, guidance_rescale > 0, clip_skip,
                        progress is not None, batch, height, width)
    _PROGRESS.callback = progress
    try:
      out = np.asarray(fn(self.params, **args))[:n]
    finally:
      _PROGRESS.callback = None
    if output == 'float':
      return out
    return (out * 255).round().astype(np.uint8)

  def _negatives(self, negative_prompts, n):
    if negative_prompts is None:
      return [''] * n
    if isinstance(negative_prompts, str):
      return [negative_prompts] * n
    if len(negative_prompts) != n:
      raise ValueError(f'{len(negative_prompts)} negative prompts for {n} prompts: give one, or '
                       'one per prompt')
    return list(negative_prompts)

  def _size(self, height, width, init_images, latents):
    if height is None and width is None:  # the size of what was given, else the model's
      if init_images is not None:
        height, width = np.shape(init_images)[1:3]
      elif latents is not None:
        height, width = (d * self.vae_scale for d in np.shape(latents)[1:3])
    height = height or self.default_size[0]
    width = width or self.default_size[1]
    if height % self.vae_scale or width % self.vae_scale:
      raise ValueError(f'image size {height}x{width} is not divisible by {self.vae_scale} (the '
                       f'VAE downsampling factor); use e.g. {height // self.vae_scale * self.vae_scale}'
                       f'x{width // self.vae_scale * self.vae_scale}')
    return int(height), int(width)

  def _plan(self, sampler, steps, eta):
    key = (sampler, steps, eta)
    if key not in self._plans:
      self._plans[key] = samplers.make_plan(sampler, self.scheduler_config, steps, eta=eta)
    return self._plans[key]

  def _function(self, plan, mode, cfg, rescale, clip_skip, with_progress, batch, height, width):
    key = (id(plan), mode, cfg, rescale, clip_skip, with_progress, batch, height, width)
    if key not in self._compiled:
      data = jax.sharding.NamedSharding(self.mesh, P('data'))
      replicated = jax.sharding.NamedSharding(self.mesh, P())
      in_shardings = (replicated, dict(
          cond=data, uncond=data, noise=data, images=data if mode != 'txt2img' else None,
          masks=data if mode == 'inpaint' else None, start=replicated, pure_noise=replicated,
          guidance=replicated, rescale=replicated, key=replicated))
      body = functools.partial(self._generate, plan=plan, mode=mode, cfg=cfg, use_rescale=rescale,
                               clip_skip=clip_skip, with_progress=with_progress)
      self._compiled[key] = jax.jit(lambda params, kw: body(params, **kw),
                                    in_shardings=in_shardings, out_shardings=data)
    fn = self._compiled[key]
    return lambda params, **kw: fn(params, kw)

  def _encode_text(self, params, ids, clip_skip):
    out = self.text_encoder.apply({'params': params}, ids)
    if clip_skip is None:
      return out.last_hidden_state
    return self.text_encoder.apply({'params': params}, out.hidden_states[-(clip_skip + 1)],
                                   method=lambda m, h: m.final_layer_norm(h))

  def _encode_image(self, params, images, key):
    """A posterior sample of the VAE, scaled for the U-Net (diffusers' retrieve_latents)."""
    mean, logvar = self.vae.apply({'params': params}, images, method='encode')
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
    return z * self.vae.config.scaling_factor

  def _generate(self, params, cond, uncond, noise, images, masks, start, pure_noise, guidance,
                rescale, key, *, plan, mode, cfg, use_rescale, clip_skip, with_progress):
    """The traced body: text encoder -> initial latents -> denoising loop -> VAE decode."""
    self.compile_count += 1  # runs only while tracing
    context = self._encode_text(params['text'], cond, clip_skip)
    if cfg:  # one U-Net call on [unconditional, conditional]
      context = jnp.concatenate([self._encode_text(params['text'], uncond, clip_skip), context])
    k_image, k_masked, k_steps = (jax.random.fold_in(key, i) for i in (1, 2, 3))
    x = noise * plan.init_noise_sigma
    blend = None
    extra = None
    if mode != 'txt2img':
      image_latents = self._encode_image(params['vae'], images, k_image)
      noised = samplers.add_noise(plan, image_latents, noise, start)
      x = jnp.where(pure_noise, x, noised) if mode == 'inpaint' else noised
    if mode == 'inpaint':
      masks = (masks >= 0.5).astype(jnp.float32)  # binarised, as diffusers' mask processor does
      small = layers.resize_nearest(masks, *x.shape[1:3])  # (B, h, w, 1)
      if self.unet.config.in_channels > x.shape[-1]:  # the inpainting U-Net: 9 input channels
        masked = self._encode_image(params['vae'], images * (masks < 0.5), k_masked)
        extra = jnp.concatenate([small, masked], axis=-1)
      else:  # an ordinary U-Net: keep the unmasked region on the forward-diffused image
        blend = functools.partial(_blend, plan=plan, image_latents=image_latents, noise=noise,
                                  mask=small)

    def model_fn(x_in, t, i):
      del i
      if extra is not None:
        x_in = jnp.concatenate([x_in, extra], axis=-1)
      if cfg:
        x_in = jnp.concatenate([x_in, x_in])
      out = self.unet.apply({'params': params['unet']}, x_in, t, context).astype(jnp.float32)
      if not cfg:
        return out
      out_uncond, out_cond = jnp.split(out, 2)
      guided = out_uncond + guidance * (out_cond - out_uncond)
      if use_rescale:
        guided = _rescale_guidance(guided, out_cond, rescale)
      return guided

    progress = _PROGRESS if with_progress else None
    x = samplers.denoise(plan, model_fn, x, k_steps, start, blend, progress)
    images = self.vae.apply({'params': params['vae']}, x / self.vae.config.scaling_factor,
                            method='decode')
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)


def _blend(x, i, *, plan, image_latents, noise, mask):
  """Inpainting with an ordinary U-Net: outside the mask, the image noised to the next step."""
  nxt = jnp.minimum(i + 1, plan.num_steps - 1)
  proper = jnp.where(i + 1 < plan.num_steps, samplers.add_noise(plan, image_latents, noise, nxt),
                     image_latents)
  return (1 - mask) * proper + mask * x


def _rescale_guidance(guided, cond, phi):
  """diffusers' guidance_rescale (Lin et al. 2023, eq. 16): match the conditional output's std."""
  axes = tuple(range(1, guided.ndim))
  rescaled = guided * (jnp.std(cond, axis=axes, keepdims=True) /
                       jnp.std(guided, axis=axes, keepdims=True))
  return phi * rescaled + (1 - phi) * guided


def _to_unit_range(images, n, height, width):
  """Init images as float32 in [-1, 1], checked against the batch and the requested size."""
  images = np.asarray(images)
  if images.shape[:1] != (n,) or images.shape[1:] != (height, width, 3):
    raise ValueError(f'init_images has shape {images.shape}; expected ({n}, {height}, {width}, 3)')
  if images.dtype == np.uint8:
    return images.astype(np.float32) / 127.5 - 1.0
  return images.astype(np.float32)


def _mask_array(masks, n, height, width):
  masks = np.asarray(masks, np.float32)
  if masks.ndim == 3:
    masks = masks[..., None]
  if masks.shape != (n, height, width, 1):
    raise ValueError(f'masks has shape {masks.shape}; expected ({n}, {height}, {width}[, 1])')
  return masks


class _Progress:
  """Trampoline for `jax.debug.callback`: the compiled loop calls it, `generate` sets the target."""

  def __init__(self):
    self.callback = None
    self._last = None

  def __call__(self, i, n):
    i, n = int(i), int(n)
    if self.callback is not None and (i, n) != self._last:  # one call per step, not per device
      self._last = (i, n)
      self.callback(i, n)


_PROGRESS = _Progress()
