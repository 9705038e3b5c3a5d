"""The text-to-image pipeline: txt2img, img2img and inpainting as one jitted function per shape.

One compiled function per (sampler, steps, mode, batch, image shape): tokenized prompts in,
text encoder, the denoising loop with classifier-free guidance inside its body, VAE decode,
images out. Prompts, seeds, guidance scale and img2img strength are arguments, so changing them
does not recompile. The batch is sharded over the mesh's `data` axis. `generate` checks and
prepares its inputs on the host (`_prepare`), then runs the compiled function (`_run`).

SDXL components (base or refiner) go through the same function with SDXL's conditioning
(`conditioning.XLText`: both encoders, the pooled embedding, size/crop/aesthetic time ids, all
traced), and the base -> refiner hand-off: the base stops at `denoising_end` and returns its
latents (`output='latent'`), the refiner starts at `denoising_start` from them
(`init_images=latents`); `base_and_refiner` does both.
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
from ldm_jax.diffusion import conditioning
from ldm_jax.diffusion import samplers
from ldm_jax.models import layers
from ldm_jax.models import vae as vae_lib

P = jax.sharding.PartitionSpec
SAMPLERS = samplers.SAMPLERS
OUTPUTS = ('uint8', 'float', 'latent')
# The compiled function's inputs split over the batch; the others are replicated.
_BATCHED = ('cond', 'uncond', 'noise', 'images', 'masks', 'time_ids', 'neg_time_ids')


def default_strength(masked, xl=False):
  """diffusers' default img2img/inpainting strength: 1.0 with a mask (inpainting), else 0.8;
  its SDXL pipelines' (`xl`): 0.9999 with a mask, else 0.3."""
  if xl:
    return 0.9999 if masked else 0.3
  return 1.0 if masked else 0.8


def base_and_refiner(base, refiner, prompts, *, high_noise_frac=0.8, output='uint8', **kwargs):
  """SDXL's ensemble of experts: the base denoises the noisiest `high_noise_frac` of the
  schedule, the refiner the rest from the base's latents (diffusers' denoising_end /
  denoising_start hand-off between StableDiffusionXLPipeline and its Img2Img pipeline).

  Args:
    base, refiner: StableDiffusion instances of an SDXL base and refiner.
    prompts: as `StableDiffusion.generate`.
    high_noise_frac: where the refiner takes over, in (0, 1).
    output: the refiner's output ('uint8', 'float' or 'latent').
    **kwargs: `generate` arguments for both (steps, sampler, seed, guidance_scale, ...).

  Returns:
    The refiner's images.
  """
  latents = base.generate(prompts, denoising_end=high_noise_frac, output='latent', **kwargs)
  return refiner.generate(prompts, init_images=latents, denoising_start=high_noise_frac,
                          output=output, **kwargs)


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
  latent_input: bool = False  # init_images are latents (a refiner after a base's latents)
  latent_output: bool = False  # output='latent': no VAE decode


@dataclasses.dataclass(frozen=True)
class _Call:
  """One prepared `generate` call: the compiled function's key and its host inputs."""
  n: int  # images asked for; the rest of the batch is padding
  static: _Static
  args: dict  # the compiled function's traced arguments, except the progress token


class StableDiffusion:
  """Samples from Stable Diffusion components (`ldm_jax.convert.load_diffusers` or our own).

  SD 1.x/2.x, and SDXL base and refiner (`is_xl`: a U-Net with text_time conditioning).

  Attributes:
    compile_count: how many functions were compiled so far (a recompile guard for tests).
  """

  def __init__(self, components, mesh=None):
    """Places the parameters on the mesh (replicated) and prepares the tokenizer(s).

    Args:
      components: a `ldm_jax.convert.Components`.
      mesh: a `jax.sharding.Mesh` with a 'data' axis; default: all devices on 'data'.
    """
    self.unet, unet_params = components.unet
    self.vae, vae_params = components.vae
    self.is_xl = bool(getattr(self.unet.config, 'is_xl', False))
    self.tokenizer = components.tokenizer
    if self.is_xl:
      self.xl_text = conditioning.XLText(components, self.unet.config)
      text_params = (components.text_encoder and components.text_encoder[1],
                     components.text_encoder_2[1])
    else:
      if components.tokenizer is None:
        raise ValueError('these components have no tokenizer; sampling from prompts needs one')
      self.text_encoder, te_params = components.text_encoder
      text_params = (te_params,)
      self.max_length = min(self.tokenizer.model_max_length,
                            self.text_encoder.config.max_position_embeddings)
    self.scheduler_config = dict(components.scheduler_config)
    self.mesh = mesh or sharding.make_mesh([('data', -1)])
    self.set_weights(unet_params, vae_params, *text_params)
    self.vae_scale = self.vae.config.downsample_factor
    size = self.unet.config.sample_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    self.default_size = (size[0] * self.vae_scale, size[1] * self.vae_scale)
    self.compile_count = 0
    self._compiled = {}
    self._plans = {}
    self._tokens = itertools.count()  # one per call: the compiled loop reports progress with it
    self._progress = {}  # token -> _Progress of a call in flight

  def set_weights(self, unet_params, vae_params, text_params, text_2_params=None):
    """Places new weights (same shapes) on the mesh, replicated; compiled functions are kept.

    SDXL: `text_params` are the first encoder's (None for a refiner), `text_2_params` the
    second's.
    """
    params = {'unet': unet_params, 'vae': vae_params, 'text': text_params}
    if self.is_xl:
      params['text_2'] = text_2_params
    self.params = jax.device_put(params, jax.sharding.NamedSharding(self.mesh, P()))

  def tokenize(self, texts):
    """(N, max_length) int32 ids, padded and truncated as diffusers does (with a warning).

    SDXL: {'text': ids, 'text_2': ids}, one entry per text encoder."""
    if self.is_xl:
      return self.xl_text.token_ids(texts)
    ids, truncated = tokenizer_lib.tokenize(self.tokenizer, list(texts), self.max_length)
    for text in np.asarray(list(texts), object)[truncated]:
      logging.warning('prompt longer than %d tokens, truncated: %r', self.max_length, text[:200])
    return ids

  def generate(self, prompts, *, negative_prompts=None, steps=50, sampler='ddim',
               guidance_scale=7.5, seed=0, height=None, width=None, latents=None,
               init_images=None, strength=None, masks=None, eta=0.0, guidance_rescale=0.0,
               clip_skip=None, original_size=None, crops_coords_top_left=(0, 0),
               target_size=None, negative_original_size=None,
               negative_crops_coords_top_left=(0, 0), negative_target_size=None,
               aesthetic_score=6.0, negative_aesthetic_score=2.5, denoising_start=None,
               denoising_end=None, output='uint8', progress=None):
    """Generates one image per prompt.

    Args:
      prompts: a string or a list of N strings.
      negative_prompts: None (the empty prompt; SDXL's force_zeros_for_empty_prompt: zeros), a
        string for all, or N strings.
      steps, sampler, eta: inference steps, one of SAMPLERS, DDIM's noise level.
      guidance_scale: classifier-free guidance weight; <= 1 skips the unconditional half.
      seed: the PRNG seed for the initial noise, the VAE posterior and stochastic samplers.
      height, width: image size, a multiple of the VAE's downsampling factor `vae_scale`;
        default: the init images' or the latents' size, else the model's.
      latents: (N, h, w, C) initial noise (unscaled) instead of drawing it from `seed`.
      init_images: (N, H, W, 3) images for img2img/inpainting, float in [-1, 1] or uint8; or
        (N, h, w, C) latents (as `output='latent'` returns them: a refiner's input).
      strength: img2img/inpainting strength in (0, 1] (default `default_strength`).
      masks: (N, H, W) or (N, H, W, 1) in [0, 1], 1 where to repaint: inpainting.
      guidance_rescale: diffusers' guidance_rescale phi (0 = off).
      clip_skip: use the text encoder's layer -(clip_skip + 1) (SDXL: -(clip_skip + 2)), as
        diffusers' clip_skip, for the negative prompts too.
      original_size, crops_coords_top_left, target_size, negative_*, aesthetic_score,
        negative_aesthetic_score: SDXL's micro-conditioning, as diffusers' (`conditioning.Sizes`).
      denoising_start, denoising_end: in (0, 1): start (img2img, inpainting: strength is
        ignored) or stop at that fraction of the schedule, as diffusers' SDXL pipelines.
      output: 'uint8' (N, H, W, 3) images, 'float' in [0, 1], or 'latent': (N, h, w, C) float32
        latents, scaled for the U-Net.
      progress: optional callback(step, num_steps), called once per step of this call.

    Returns:
      np.ndarray of N images (or latents), NHWC.
    """
    sizes = conditioning.Sizes(original_size, crops_coords_top_left, target_size,
                               negative_original_size, negative_crops_coords_top_left,
                               negative_target_size, aesthetic_score, negative_aesthetic_score)
    call = self._prepare(
        prompts, negative_prompts, sampler=sampler, steps=steps, eta=eta, height=height,
        width=width, strength=strength, init_images=init_images, masks=masks, latents=latents,
        seed=seed, guidance_scale=guidance_scale, guidance_rescale=guidance_rescale,
        clip_skip=clip_skip, sizes=sizes, denoising=(denoising_start, denoising_end),
        output=output, with_progress=progress is not None)
    out = self._run(call, progress)
    if output != 'uint8':
      return out
    return (out * 255).round().astype(np.uint8)

  def _prepare(self, prompts, negative_prompts, *, sampler, steps, eta, height, width, strength,
               init_images, masks, latents, seed, guidance_scale, guidance_rescale, clip_skip,
               sizes, denoising, output, with_progress):
    """Checks the arguments, then builds the host inputs and the static key of one call."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
      raise ValueError('no prompts given')
    zero_uncond = self.is_xl and negative_prompts is None and self.xl_text.force_zeros
    negative_prompts = self._negatives(negative_prompts, len(prompts))
    mode, latent_input = self._mode(init_images, masks)
    height, width = self._size(height, width, init_images, latents, latent_input)
    if strength is None:
      strength = default_strength(masks is not None, self.is_xl)
    strength = float(strength)
    self._check(height, width, strength, sizes, denoising, output)
    plan = self._plan(sampler, steps, eta)
    if denoising[0] is not None and mode == 'txt2img':
      raise ValueError('denoising_start needs init_images: the latents of a run with '
                       "denoising_end and output='latent' (or images)")
    start, end = samplers.step_range(plan, None if mode == 'txt2img' else strength, *denoising)
    data = self.mesh.shape['data']
    static = _Static(plan, mode, cfg=guidance_scale > 1, use_rescale=guidance_rescale > 0,
                     clip_skip=clip_skip, with_progress=with_progress,
                     batch=-(-len(prompts) // data) * data, height=height, width=width,
                     latent_input=latent_input, latent_output=output == 'latent')
    key = jax.random.key(seed)
    args = self._arrays(static, prompts, negative_prompts, init_images, masks, latents, key)
    if self.is_xl:
      cond, uncond = conditioning.time_ids(sizes, height, width, mode, self.xl_text.aesthetics)
      args.update(time_ids=np.tile(cond, (static.batch, 1)),
                  neg_time_ids=np.tile(uncond, (static.batch, 1)),
                  zero_uncond=np.bool_(zero_uncond))
    fresh = denoising[0] is None  # denoising_start continues from the given latents as they are
    args.update(start=np.int32(start), end=np.int32(end), add_noise=np.bool_(fresh),
                pure_noise=np.bool_(mode == 'inpaint' and strength == 1 and fresh),
                guidance=np.float32(guidance_scale), rescale=np.float32(guidance_rescale),
                key=key)
    return _Call(len(prompts), static, args)

  def _check(self, height, width, strength, sizes, denoising, output):
    """Raises ValueError naming every problem with the size, strength and SDXL arguments."""
    problems = input_problems(height, width, strength, self.vae_scale)
    problems += sizes.problems()
    if not self.is_xl and not sizes.is_default():
      problems.append('original_size, crops_coords_top_left, target_size, aesthetic_score and '
                      'their negative_* are SDXL\'s micro-conditioning; this U-Net has none')
    for name, value in zip(('denoising_start', 'denoising_end'), denoising):
      if value is not None and not 0 < value < 1:
        problems.append(f'{name} {value} is outside (0, 1): the fraction of the noise schedule '
                        'where the refiner takes over (0.8 is usual)')
    if None not in denoising and denoising[0] >= denoising[1]:
      problems.append(f'denoising_start {denoising[0]} is not below denoising_end {denoising[1]}')
    if output not in OUTPUTS:
      problems.append(f'output {output!r} is not one of {OUTPUTS}')
    if problems:
      raise ValueError('; '.join(problems))

  def _negatives(self, negative_prompts, n):
    if negative_prompts is None:
      return [''] * n
    if isinstance(negative_prompts, str):
      return [negative_prompts] * n
    if len(negative_prompts) != n:
      raise ValueError(f'{len(negative_prompts)} negative prompts for {n} prompts: give one, or '
                       'one per prompt')
    return list(negative_prompts)

  def _mode(self, init_images, masks):
    """('txt2img' | 'img2img' | 'inpaint', whether init_images are latents)."""
    if masks is not None and init_images is None:
      raise ValueError('masks need init_images: inpainting repaints parts of given images')
    if init_images is None:
      return 'txt2img', False
    channels = self.vae.config.latent_channels
    latent_input = np.ndim(init_images) == 4 and channels != 3 and (
        np.shape(init_images)[-1] == channels)
    if latent_input and masks is not None and self.unet.config.in_channels > channels:
      raise ValueError('the inpainting U-Net encodes the masked image: give init_images as '
                       'images, not latents')
    return ('img2img' if masks is None else 'inpaint'), latent_input

  def _size(self, height, width, init_images, latents, latent_input=False):
    """The requested size, else the size of what was given, else the model's."""
    if height is None and width is None:
      if init_images is not None:
        height, width = np.shape(init_images)[1:3]
        if latent_input:
          height, width = height * self.vae_scale, width * self.vae_scale
      elif latents is not None:
        height, width = (d * self.vae_scale for d in np.shape(latents)[1:3])
    height = self.default_size[0] if height is None else height
    width = self.default_size[1] if width is None else width
    return int(height), int(width)

  def _arrays(self, static, prompts, negative_prompts, init_images, masks, latents, key):
    """The batch-sized inputs, padded to `static.batch`: images, masks, noise and token ids."""
    n, pad = len(prompts), functools.partial(_pad, batch=static.batch)
    images = masks_arr = None
    shape = (static.batch, static.height // self.vae_scale, static.width // self.vae_scale,
             self.vae.config.latent_channels)
    if static.latent_input:
      images = pad(_latent_array(init_images, (n,) + shape[1:]))
    elif static.mode != 'txt2img':
      images = pad(_to_unit_range(init_images, n, static.height, static.width))
    if static.mode == 'inpaint':
      masks_arr = pad(_mask_array(masks, n, static.height, static.width))
    if latents is None:
      noise = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.float32)
    else:
      noise = pad(np.asarray(latents, np.float32).reshape((n,) + shape[1:]))
    ids = lambda texts: jax.tree.map(pad, self.tokenize(texts))
    return dict(cond=ids(prompts), uncond=ids(negative_prompts), noise=noise, images=images,
                masks=masks_arr)

  def _run(self, call, progress):
    """Runs the compiled function of `call`, reporting to `progress` under a fresh token."""
    fn = self._function(call.static, call.args)
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

  def _function(self, static, args):
    """The jitted `_generate` for `static` (whose inputs are shaped like `args`), compiled on
    first use."""
    if static not in self._compiled:
      data = jax.sharding.NamedSharding(self.mesh, P('data'))
      replicated = jax.sharding.NamedSharding(self.mesh, P())
      in_shardings = {k: None if v is None else data if k in _BATCHED else replicated
                      for k, v in args.items()}
      in_shardings['token'] = replicated
      self._compiled[static] = jax.jit(functools.partial(self._generate, static=static),
                                       in_shardings=(replicated, in_shardings),
                                       out_shardings=data)
    return self._compiled[static]

  def _encode_text(self, params, ids, clip_skip):
    out = self.text_encoder.apply({'params': params}, ids)
    if clip_skip is None:
      return out.last_hidden_state
    return self.text_encoder.apply({'params': params}, out.hidden_states[-(clip_skip + 1)],
                                   method=lambda m, h: m.final_layer_norm(h))

  def _condition(self, params, args, static):
    """The U-Net's text conditioning, [unconditional, conditional] with CFG: (context, SDXL's
    added_cond_kwargs or None)."""
    if not self.is_xl:
      context = self._encode_text(params['text'], args['cond'], static.clip_skip)
      if static.cfg:  # one U-Net call on [unconditional, conditional]
        uncond = self._encode_text(params['text'], args['uncond'], static.clip_skip)
        context = jnp.concatenate([uncond, context])
      return context, None
    context, pooled = self.xl_text.encode(params, args['cond'], static.clip_skip)
    time_ids = args['time_ids']
    if static.cfg:
      uncond, uncond_pooled = self.xl_text.encode(params, args['uncond'], static.clip_skip)
      # force_zeros_for_empty_prompt: zeros, not the empty prompt's encoding.
      uncond, uncond_pooled = (jnp.where(args['zero_uncond'], jnp.zeros_like(u), u)
                               for u in (uncond, uncond_pooled))
      context = jnp.concatenate([uncond, context])
      pooled = jnp.concatenate([uncond_pooled, pooled])
      time_ids = jnp.concatenate([args['neg_time_ids'], time_ids])
    return context, {'text_embeds': pooled, 'time_ids': time_ids}

  def _vae(self, decode):
    """The VAE module to run: a float32 one where diffusers' SDXL pipelines upcast (its config's
    force_upcast: encoding in anything but float32, decoding in float16)."""
    config = self.vae.config
    dtype = jnp.dtype(config.dtype)
    if self.is_xl and config.force_upcast and (
        dtype == jnp.float16 if decode else dtype != jnp.float32):
      return type(self.vae)(dataclasses.replace(config, dtype=jnp.float32))
    return self.vae

  def _encode_image(self, params, images, key):
    """A posterior sample of the VAE, scaled for the U-Net (diffusers' retrieve_latents)."""
    mean, logvar = self._vae(False).apply({'params': params}, images, method='encode')
    z = vae_lib.sample_posterior(mean, logvar, jax.random.normal(key, mean.shape, jnp.float32))
    return z * self.vae.config.scaling_factor

  def _generate(self, params, args, *, static):
    """The traced body: text encoders -> initial latents -> denoising loop -> VAE decode."""
    self.compile_count += 1  # runs only while tracing
    cond = self._condition(params, args, static)
    k_image, k_masked, k_steps = (jax.random.fold_in(args['key'], i) for i in (1, 2, 3))
    x, extra, blend = self._initial_latents(params['vae'], args, static, k_image, k_masked)
    model_fn = functools.partial(self._guided_unet, params['unet'], cond, extra, args, static)
    progress = self._on_step if static.with_progress else None
    x = samplers.denoise(static.plan, model_fn, x, k_steps, args['start'], blend, progress,
                         (args['token'],), end=args['end'])
    if static.latent_output:
      return x
    images = self._vae(True).apply({'params': params['vae']}, x / self.vae.config.scaling_factor,
                                   method='decode')
    return jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)

  def _initial_latents(self, vae_params, args, static, k_image, k_masked):
    """The loop's first latents, and inpainting's extra U-Net channels or latent blending."""
    plan, noise = static.plan, args['noise']
    x = noise * plan.init_noise_sigma
    if static.mode == 'txt2img':
      return x, None, None
    image_latents = (args['images'] if static.latent_input else
                     self._encode_image(vae_params, args['images'], k_image))
    noised = jnp.where(args['add_noise'],
                       samplers.add_noise(plan, image_latents, noise, args['start']),
                       image_latents)
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
                                      noise=noise, mask=small, end=args['end'])

  def _guided_unet(self, params, cond, extra, args, static, x_in, t, i):
    """The denoising loop's model: the U-Net with classifier-free guidance."""
    del i
    context, added = cond
    if extra is not None:
      x_in = jnp.concatenate([x_in, extra], axis=-1)
    if static.cfg:
      x_in = jnp.concatenate([x_in, x_in])
    kwargs = {} if added is None else {'added_cond_kwargs': added}
    out = self.unet.apply({'params': params}, x_in, t, context, **kwargs).astype(jnp.float32)
    if not static.cfg:
      return out
    out_uncond, out_cond = jnp.split(out, 2)
    guided = out_uncond + args['guidance'] * (out_cond - out_uncond)
    if static.use_rescale:
      guided = _rescale_guidance(guided, out_cond, args['rescale'])
    return guided


def _blend(x, i, *, plan, image_latents, noise, mask, end):
  """Inpainting with an ordinary U-Net: outside the mask, the image noised to the next step (the
  image itself after the last step run)."""
  nxt = jnp.minimum(i + 1, plan.num_steps - 1)
  proper = jnp.where(i + 1 < end, samplers.add_noise(plan, image_latents, noise, nxt),
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


def _latent_array(latents, shape):
  """Latents given as init_images, float32, checked against the batch and the requested size."""
  latents = np.asarray(latents, np.float32)
  if latents.shape != shape:
    raise ValueError(f'init_images are latents of shape {latents.shape}; expected {shape} (the '
                     'requested size divided by the VAE\'s factor)')
  return latents


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
