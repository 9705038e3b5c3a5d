"""The text-to-image pipeline: txt2img, img2img and inpainting as one jitted function per shape.

One compiled function per (sampler, steps, mode, batch, image shape): tokenized prompts in,
text encoder, the denoising loop with classifier-free guidance inside its body, VAE decode,
images out. Prompts, seeds, guidance scale and img2img strength are arguments, so changing them
does not recompile. The batch is sharded over the mesh's `data` axis. `generate` checks and
prepares its inputs on the host (`_prepare`), then runs the compiled function (`_run`).
"""

import dataclasses
import functools
import itertools
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import sharding
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.diffusion import samplers
from ldm_jax.models import layers
from ldm_jax.models import vae as vae_lib

P = jax.sharding.PartitionSpec
SAMPLERS = samplers.SAMPLERS


def default_strength(masked):
  """diffusers' default img2img/inpainting strength: 1.0 with a mask (inpainting), else 0.8."""
  return 1.0 if masked else 0.8


def input_problems(height=None, width=None, strength=None, scale_factor=8):
  """Every problem with an image size or strength, each message starting with the argument's name.

  Args:
    height, width: image size in pixels, or None (not checked).
    strength: img2img/inpainting strength, or None (not checked).
    scale_factor: the VAE's downsampling factor.

  Returns:
    A list of messages, empty when all is well.
  """
  f, problems = scale_factor, []
  for name, size in (('height', height), ('width', width)):
    if size is not None and (size < f or size % f):
      problems.append(f'{name} {size} is not a positive multiple of {f} (the VAE downsamples by '
                      f'{f}): try {max(f, size // f * f)}')
  if strength is not None and not 0 < strength <= 1:
    problems.append(f'strength {strength} is outside (0, 1]: 1 repaints fully, small values stay '
                    'close to the init image')
  return problems


@dataclasses.dataclass(frozen=True)
class _Static:
  """What a compiled function is specialised on (its cache key; the plan counts by identity)."""
  plan: samplers.Plan
  mode: str  # 'txt2img', 'img2img' or 'inpaint'
  cfg: bool  # classifier-free guidance: the U-Net also runs on the negative prompts
  use_rescale: bool  # guidance_rescale > 0
  clip_skip: int | None
  with_progress: bool
  batch: int  # the number of prompts, padded to a multiple of the mesh's data axis
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class _Call:
  """One prepared `generate` call: the compiled function's key and its host inputs."""
  n: int  # images asked for; the rest of the batch is padding
  static: _Static
  args: dict  # the compiled function's traced arguments, except the progress token


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
    self._tokens = itertools.count()  # one per call: the compiled loop reports progress with it
    self._progress = {}  # token -> _Progress of a call in flight

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
      height, width: image size, a multiple of the VAE's downsampling factor `vae_scale`;
        default: the init images' or the latents' size, else the model's.
      latents: (N, h, w, C) initial noise (unscaled) instead of drawing it from `seed`.
      init_images: (N, H, W, 3) images for img2img/inpainting, float in [-1, 1] or uint8.
      strength: img2img/inpainting strength in (0, 1] (diffusers' rule; default
        `default_strength`: 0.8 for img2img, 1.0 for inpainting).
      masks: (N, H, W) or (N, H, W, 1) in [0, 1], 1 where to repaint: inpainting.
      eta: DDIM's noise level.
      guidance_rescale: diffusers' guidance_rescale phi (0 = off).
      clip_skip: use the text encoder's layer -(clip_skip + 1), as diffusers' clip_skip.
      output: 'uint8' (N, H, W, 3) images, or 'float' in [0, 1].
      progress: optional callback(step, num_steps), called once per step of this call.

    Returns:
      np.ndarray of N images, NHWC.
    """
    call = self._prepare(
        prompts, negative_prompts, sampler=sampler, steps=steps, eta=eta, height=height,
        width=width, strength=strength, init_images=init_images, masks=masks, latents=latents,
        seed=seed, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        clip_skip=clip_skip, with_progress=progress is not None)
    out = self._run(call, progress)
    if output == 'float':
      return out
    return (out * 255).round().astype(np.uint8)

  def _prepare(self, prompts, negative_prompts, *, sampler, steps, eta, height, width, strength,
               init_images, masks, latents, seed, guidance_scale, guidance_rescale, clip_skip,
               with_progress):
    """Checks the arguments, then builds the host inputs and the static key of one call."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError('no prompts given')
    negative_prompts = self._negatives(negative_prompts, len(prompts))
    if masks is not None and init_images is None:
      raise ValueError('masks need init_images: inpainting repaints parts of given images')
    mode = 'txt2img' if init_images is None else ('img2img' if masks is None else 'inpaint')
    height, width = self._size(height, width, init_images, latents)
    strength = default_strength(masks is not None) if strength is None else float(strength)
    problems = input_problems(height, width, strength, self.vae_scale)
    if problems:
      raise ValueError('; '.join(problems))
    plan = self._plan(sampler, steps, eta)
    start = 0 if mode == 'txt2img' else samplers.strength_start(plan, strength)
    if start >= plan.num_steps:
      raise ValueError(f'strength {strength} with {steps} steps runs no step; raise either')
    data = self.mesh.shape['data']
    static = _Static(plan, mode, cfg=guidance_scale > 1, use_rescale=guidance_rescale > 0,
                     clip_skip=clip_skip, with_progress=with_progress,
                     batch=-(-len(prompts) // data) * data, height=height, width=width)
    key = jax.random.key(seed)
    args = self._arrays(static, prompts, negative_prompts, init_images, masks, latents, key)
    args.update(start=np.int32(start), pure_noise=np.bool_(mode == 'inpaint' and strength == 1),
                guidance=np.float32(guidance_scale), rescale=np.float32(guidance_rescale),
                key=key)
    return _Call(len(prompts), static, args)

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
    """The requested size, else the size of what was given, else the model's."""
    if height is None and width is None:
      if init_images is not None:
        height, width = np.shape(init_images)[1:3]
      elif latents is not None:
        height, width = (d * self.vae_scale for d in np.shape(latents)[1:3])
    height = self.default_size[0] if height is None else height
    width = self.default_size[1] if width is None else width
    return int(height), int(width)

  def _arrays(self, static, prompts, negative_prompts, init_images, masks, latents, key):
    """The batch-sized inputs, padded to `static.batch`: images, masks, noise and token ids."""
    n, pad = len(prompts), functools.partial(_pad, batch=static.batch)
    images = masks_arr = None
    if static.mode != 'txt2img':
      images = pad(_to_unit_range(init_images, n, static.height, static.width))
    if static.mode == 'inpaint':
      masks_arr = pad(_mask_array(masks, n, static.height, static.width))
    shape = (static.batch, static.height // self.vae_scale, static.width // self.vae_scale,
             self.vae.config.latent_channels)
    if latents is None:
      noise = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    else:
      noise = pad(np.asarray(latents, np.float32).reshape((n,) + shape[1:]))
    return dict(cond=pad(self.tokenize(prompts)), uncond=pad(self.tokenize(negative_prompts)),
                noise=noise, images=images, masks=masks_arr)

  def _run(self, call, progress):
    """Runs the compiled function of `call`, reporting to `progress` under a fresh token."""
    fn = self._function(call.static)
    token = next(self._tokens) % 2 ** 31
    if progress is not None:
      self._progress[token] = _Progress(progress)
    try:
      out = fn(self.params, dict(call.args, token=np.int32(token)))
      out = np.asarray(out)[:call.n]
      if progress is not None:
        jax.effects_barrier()  # every step's callback has run before the token is dropped
    finally:
      self._progress.pop(token, None)
    return out

  def _on_step(self, i, n, token):
    """The compiled loop's host callback: forwards step i of n to the call that owns `token`."""
    target = self._progress.get(int(token))
    if target is not None:
      target(int(i), int(n))

  def _plan(self, sampler, steps, eta):
    key = (sampler, steps, eta)
    if key not in self._plans:
      self._plans[key] = samplers.make_plan(sampler, self.scheduler_config, steps, eta=eta)
    return self._plans[key]

  def _function(self, static):
    """The jitted `_generate` for `static`, compiled on first use."""
    if static not in self._compiled:
      data = jax.sharding.NamedSharding(self.mesh, P('data'))
      replicated = jax.sharding.NamedSharding(self.mesh, P())
      in_shardings = (replicated, dict(
          cond=data, uncond=data, noise=data, images=data if static.mode != 'txt2img' else None,
          masks=data if static.mode == 'inpaint' else None, start=replicated,
          pure_noise=replicated, guidance=replicated, rescale=replicated, key=replicated,
          token=replicated))
      self._compiled[static] = jax.jit(functools.partial(self._generate, static=static),
                                       in_shardings=in_shardings, out_shardings=data)
    return self._compiled[static]

  def _encode_text(self, params, ids, clip_skip):
    out = self.text_encoder.apply({'params': params}, ids)
    if clip_skip is None:
      return out.last_hidden_state
    return self.text_encoder.apply({'params': params}, out.hidden_states[-(clip_skip + 1)],
                                   method=lambda m, h: m.final_layer_norm(h))

  def _encode_image(self, params, images, key):
    """A posterior sample of the VAE, scaled for the U-Net (diffusers' retrieve_latents)."""
    mean, logvar = self.vae.apply({'params': params}, images, method='encode')
    z = vae_lib.sample_posterior(mean, logvar, jax.random.normal(key, mean.shape, jnp.float32))
    return z * self.vae.config.scaling_factor

  def _generate(self, params, args, *, static):
    """The traced body: text encoder -> initial latents -> denoising loop -> VAE decode."""
    self.compile_count += 1  # runs only while tracing
    context = self._encode_text(params['text'], args['cond'], static.clip_skip)
    if static.cfg:  # one U-Net call on [unconditional, conditional]
      uncond = self._encode_text(params['text'], args['uncond'], static.clip_skip)
      context = jnp.concatenate([uncond, context])
    k_image, k_masked, k_steps = (jax.random.fold_in(args['key'], i) for i in (1, 2, 3))
    x, extra, blend = self._initial_latents(params['vae'], args, static, k_image, k_masked)
    model_fn = functools.partial(self._guided_unet, params['unet'], context, extra, args, static)
    progress = self._on_step if static.with_progress else None
    x = samplers.denoise(static.plan, model_fn, x, k_steps, args['start'], blend, progress,
                         (args['token'],))
    images = self.vae.apply({'params': params['vae']}, x / self.vae.config.scaling_factor,
                            method='decode')
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def _initial_latents(self, vae_params, args, static, k_image, k_masked):
    """The loop's first latents, and inpainting's extra U-Net channels or latent blending."""
    plan, noise = static.plan, args['noise']
    x = noise * plan.init_noise_sigma
    if static.mode == 'txt2img':
      return x, None, None
    image_latents = self._encode_image(vae_params, args['images'], k_image)
    noised = samplers.add_noise(plan, image_latents, noise, args['start'])
    if static.mode == 'img2img':
      return noised, None, None
    x = jnp.where(args['pure_noise'], x, noised)
    masks = (args['masks'] >= 0.5).astype(jnp.float32)  # binarised, as diffusers' processor does
    small = layers.resize_nearest(masks, *x.shape[1:3])  # (B, h, w, 1)
    if self.unet.config.in_channels > x.shape[-1]:  # the inpainting U-Net: 9 input channels
      masked = self._encode_image(vae_params, args['images'] * (masks < 0.5), k_masked)
      return x, jnp.concatenate([small, masked], axis=-1), None
    # An ordinary U-Net: keep the unmasked region on the forward-diffused image.
    return x, None, functools.partial(_blend, plan=plan, image_latents=image_latents,
                                      noise=noise, mask=small)

  def _guided_unet(self, params, context, extra, args, static, x_in, t, i):
    """The denoising loop's model: the U-Net with classifier-free guidance."""
    del i
    if extra is not None:
      x_in = jnp.concatenate([x_in, extra], axis=-1)
    if static.cfg:
      x_in = jnp.concatenate([x_in, x_in])
    out = self.unet.apply({'params': params}, x_in, t, context).astype(jnp.float32)
    if not static.cfg:
      return out
    out_uncond, out_cond = jnp.split(out, 2)
    guided = out_uncond + args['guidance'] * (out_cond - out_uncond)
    if static.use_rescale:
      guided = _rescale_guidance(guided, out_cond, args['rescale'])
    return guided


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


def _pad(x, batch):
  """Repeats the last example up to `batch` rows (the batch is split over the devices)."""
  if batch > len(x):
    return np.concatenate([x, np.repeat(x[-1:], batch - len(x), axis=0)])
  return x


class _Progress:
  """One call's progress callback, called once per step although every device reports each step."""

  def __init__(self, callback):
    self._callback = callback
    self._done = 0
    self._lock = threading.Lock()  # devices may report from several threads

  def __call__(self, i, n):
    with self._lock:  # held while calling back: steps are reported in order
      if i > self._done:
        self._done = i
        self._callback(i, n)
