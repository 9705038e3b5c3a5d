"""A sampling run: checking a request, seeded batches of prompts, running them into files."""

import dataclasses
import math
import os
import sys
import time

import numpy as np

from ldm_jax import config_check
from ldm_jax.diffusion import pipeline
from ldm_jax.sampling import loras as loras_lib
from ldm_jax.sampling import outputs


@dataclasses.dataclass(frozen=True)
class Request:
  """One sampling run, whoever asks for it (sample.py's flags, a notebook, a test)."""
  prompts: tuple = ()
  negative_prompt: str = ''
  num_images: int = 1  # per prompt
  steps: int = 50
  sampler: str = 'ddim'
  guidance: float = 7.5
  seed: int = 0
  height: int | None = None  # None: the init image's size, else the model's native size
  width: int | None = None
  init_image: str | None = None  # a path; img2img (or inpainting with `mask`)
  strength: float | None = None  # None: pipeline.default_strength (0.8, or 1.0 with a mask)
  mask: str | None = None  # a path; white = repaint
  out_dir: str = 'samples'
  batch_size: int = 1  # images per generate call
  # SDXL's micro-conditioning (None: the pipeline's defaults, as diffusers').
  original_size: tuple | None = None  # (height, width)
  crops_coords_top_left: tuple | None = None  # (top, left)
  target_size: tuple | None = None  # (height, width)
  aesthetic_score: float | None = None  # the refiner's
  # LoRAs (`loras.Lora`s, or FILE[:SCALE] strings) the pipeline's weights hold: whoever builds
  # the pipeline merges them (sample.py: `loras.apply_loras`); the run checks and records them.
  loras: tuple = ()


# The Request fields passed on to generate only when set (SDXL's; others take none).
XL_FIELDS = ('original_size', 'crops_coords_top_left', 'target_size', 'aesthetic_score')


@dataclasses.dataclass(frozen=True)
class Batch:
  """One generate call: its prompts, the seed of its noise and the index of its first image."""
  prompts: tuple
  seed: int
  start: int
  num_real: int  # keep the first num_real images; the rest pad the last call to full size


def read_prompts(prompts=(), prompts_file=None):
  """The prompts given one by one, then those of `prompts_file` (one a line, blanks skipped)."""
  prompts = [p for p in prompts or ()]
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise ValueError(f'--prompts_file {prompts_file!r} does not exist (or is not a file)')
    with open(prompts_file, encoding='utf-8') as f:
      prompts += [line.strip() for line in f if line.strip()]
  return prompts  # `validate` says what to do when there are none


def parse_pair(value, flag):
  """'H,W' (a --original_size, --crops_coords_top_left or --target_size value) as two ints;
  None stays None."""
  if value is None:
    return None
  parts = [p.strip() for p in (value.split(',') if isinstance(value, str) else value)]
  try:
    if len(parts) == 2:
      return tuple(int(p) for p in parts)
  except ValueError:
    pass
  raise ValueError(f'--{flag} {value if isinstance(value, str) else ",".join(parts)} is not two '
                   'integers: give them as H,W (or TOP,LEFT), e.g. 1024,1024')


def validate(request, samplers, scale_factor=None, xl=None):
  """Raises ValueError listing every problem with `request`, each with its fix.

  The size and strength rules are the pipeline's (`pipeline.input_problems`), named by flag.

  Args:
    request: a Request.
    samplers: the sampler names the pipeline knows.
    scale_factor: the VAE's downsampling factor (`StableDiffusion.vae_scale`); None leaves
      --height/--width unchecked, for a check before the weights are loaded.
    xl: whether the model is SDXL (`StableDiffusion.is_xl`); False refuses the micro-
      conditioning flags, None (before the weights are loaded) leaves them unchecked.
  """
  r = request
  problems = []
  if not r.prompts:
    problems.append('no prompts: pass --prompt "a photo of ..." (repeatable) or --prompts_file '
                    'FILE (one prompt a line)')
  if r.sampler not in samplers:
    problems.append(f'unknown sampler {r.sampler!r}: choose one of {", ".join(samplers)}')
  for name in ('num_images', 'steps', 'batch_size'):
    if getattr(r, name) < 1:
      problems.append(f'--{name} is {getattr(r, name)}; it must be at least 1')
  sizes = {} if scale_factor is None else dict(height=r.height, width=r.width,
                                                scale_factor=scale_factor)
  problems += ['--' + p for p in pipeline.input_problems(strength=r.strength, **sizes)]
  if r.mask and not r.init_image:
    problems.append('--mask needs --init_image: the mask marks which pixels of it to repaint')
  if not r.guidance >= 0:  # NaN too
    problems.append(f'--guidance is {r.guidance}; it must be >= 0: values above 1 strengthen '
                    'classifier-free guidance (7.5 is SD\'s usual), 0 to 1 turn it off (as in '
                    'diffusers)')
  for flag, path in (('init_image', r.init_image), ('mask', r.mask)):
    if path and not os.path.isfile(path):
      problems.append(f'--{flag} {path!r} does not exist (or is not a file)')
  problems += _mask_problems(r)
  try:
    problems += loras_lib.problems(r.loras)
  except ValueError as e:  # a bad FILE:SCALE
    problems.append(str(e))
  problems += _strength_problems(r, xl)
  if xl is False:
    problems += [f'--{name} is SDXL\'s micro-conditioning; this model is not SDXL: drop it'
                 for name in XL_FIELDS if getattr(r, name) is not None]
  problem = config_check.folder_problem(r.out_dir, '--out')
  if problem:
    problems.append(problem)
  if problems:
    raise ValueError('bad sampling request:\n  ' + '\n  '.join(problems))


def _strength_problems(request, xl):
  """img2img that would run no step (diffusers' rule: int(steps * strength) steps), once the
  strength is known (given, or the model's default once `xl` is)."""
  r = request
  if not r.init_image or r.steps < 1 or (r.strength is None and xl is None):
    return []
  value = strength(r, bool(xl))
  if not 0 < value <= 1 or int(r.steps * value) >= 1:
    return []
  return [f'--strength {value} with --steps {r.steps} runs no denoising step (img2img runs '
          f'int(steps x strength)): raise --steps to {math.ceil(1 / value)} or --strength']


def _mask_problems(request):
  """A mask of another size than its init image (it would be stretched over it), or unreadable."""
  if not (request.mask and request.init_image and os.path.isfile(request.mask)
          and os.path.isfile(request.init_image)):
    return []
  try:
    image = outputs.pixel_size(request.init_image, 'init image')
    mask = outputs.pixel_size(request.mask, 'mask')
  except ValueError as e:
    return [str(e)]
  if mask == image:
    return []
  return [f'--mask {request.mask!r} is {mask[0]}x{mask[1]} but --init_image '
          f'{request.init_image!r} is {image[0]}x{image[1]}: it would be stretched over the '
          f'image; resize the mask to {image[0]}x{image[1]} (white = repaint)']


def plan_batches(request):
  """Expands prompts x num_images (prompt-major) into generate calls of equal size.

  Call b draws its noise from seed + b, so calls differ; the last call is padded with copies
  of its last prompt so every call has the same shape (one compilation), and the extra images
  are dropped.

  Args:
    request: a Request (validated).

  Returns:
    A list of Batch.
  """
  prompts = [p for p in request.prompts for _ in range(request.num_images)]
  size = min(request.batch_size, len(prompts))
  batches = []
  for b, start in enumerate(range(0, len(prompts), size)):
    chunk = prompts[start:start + size]
    padded = chunk + chunk[-1:] * (size - len(chunk))
    batches.append(Batch(tuple(padded), request.seed + b, start, len(chunk)))
  return batches


def conditioning(request, scale_factor):
  """The size and image arguments of generate: height/width, init image and mask arrays.

  Without --height/--width an init image sets the size (rounded down to multiples of the VAE's
  downsampling factor `scale_factor`); without either the pipeline picks the model's native size.

  Returns:
    A dict with `height`, `width` (ints or None), `init_image` (float32 (H, W, 3) in [-1, 1]
    or None) and `mask` (float32 (H, W, 1) in [0, 1] or None).
  """
  height, width, init_image, mask = request.height, request.width, None, None
  if request.init_image:
    native_h, native_w = outputs.image_size(request.init_image, scale_factor, 'init image')
    height, width = height or native_h, width or native_w
    init_image = outputs.load_image(request.init_image, height, width)
    if request.mask:
      mask = outputs.load_mask(request.mask, height, width)
  return {'height': height, 'width': width, 'init_image': init_image, 'mask': mask}


def strength(request, xl=False):
  """The img2img/inpainting strength: the request's, else the pipeline's default for the mode
  (and for SDXL, `xl`)."""
  if request.strength is not None:
    return request.strength
  return pipeline.default_strength(bool(request.mask), xl)


def generate_kwargs(request, batch, cond, progress=None, xl=False):
  """The keyword arguments of `StableDiffusion.generate` for one batch (`xl`: an SDXL model)."""
  n = len(batch.prompts)
  kw = dict(negative_prompts=[request.negative_prompt] * n if request.negative_prompt else None,
            steps=request.steps, sampler=request.sampler, guidance_scale=request.guidance,
            seed=batch.seed, height=cond['height'], width=cond['width'], progress=progress)
  if cond['init_image'] is not None:
    kw.update(init_images=np.repeat(cond['init_image'][None], n, axis=0),
              strength=strength(request, xl))
  if cond['mask'] is not None:
    kw['masks'] = np.repeat(cond['mask'][None], n, axis=0)
  kw.update({name: getattr(request, name) for name in XL_FIELDS
             if getattr(request, name) is not None})
  return kw


def records(request, batch, cond, xl=False):
  """One samples.jsonl record per kept image of `batch`."""
  common = {'negative_prompt': request.negative_prompt, 'seed': batch.seed,
            'sampler': request.sampler, 'steps': request.steps, 'guidance': request.guidance}
  if cond['height'] is not None:
    common['height'] = cond['height']
  if cond['width'] is not None:
    common['width'] = cond['width']
  if request.init_image:
    common.update(init_image=request.init_image, strength=strength(request, xl))
  if request.mask:
    common['mask'] = request.mask
  if request.loras:
    common['loras'] = [lora.record() for lora in loras_lib.parse_all(request.loras)]
  for name in XL_FIELDS:
    value = getattr(request, name)
    if value is not None:
      common[name] = list(value) if isinstance(value, tuple) else value
  # (seed, index_in_call, batch_size) pins down an image's noise: one call draws it for all.
  return [{'prompt': p, **common, 'index_in_call': k, 'batch_size': len(batch.prompts)}
          for k, p in enumerate(batch.prompts[:batch.num_real])]


def _duration(seconds):
  """12s, 3m05s, 1h02m."""
  seconds = int(math.ceil(seconds))
  if seconds < 60:
    return f'{seconds}s'
  if seconds < 3600:
    return f'{seconds // 60}m{seconds % 60:02d}s'
  return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'


def _step_counter(stream):
  """A progress callback redrawing `step i/n` in place; None off a terminal (no host calls)."""
  if not stream.isatty():
    return None

  def show(step, num_steps):  # the pipeline counts steps done, from 1
    stream.write(f'\r  step {step}/{num_steps}')
    stream.flush()
  return show


class _Throughput:
  """Images/s and ETA; the first call is left out once others finish (it compiles)."""

  def __init__(self, total):
    self.total, self.done, self._t0 = total, 0, time.perf_counter()
    self._after_first = None  # (time, images) when the first call finished

  def update(self, n):
    """Counts `n` more images; returns the progress line."""
    now = time.perf_counter()
    self.done += n
    if self._after_first is None:
      self._after_first = (now, self.done)
      rate = self.done / max(now - self._t0, 1e-9)
    else:
      t1, n1 = self._after_first
      rate = (self.done - n1) / max(now - t1, 1e-9)
    eta = (self.total - self.done) / rate if rate > 0 else float('inf')
    return (f'{self.done}/{self.total} images, {rate:.2f} images/s, '
            f'ETA {_duration(eta) if math.isfinite(eta) else "?"}')


def run(sd, request, log=print):
  """Generates every image of `request` with `sd` and writes them to `request.out_dir`.

  Args:
    sd: an object with StableDiffusion's `generate(prompts, *, ...) -> uint8 (N, H, W, 3)` and
      `vae_scale` (and `is_xl`, False when absent).
    request: a Request (call `validate` first).
    log: where progress lines go.

  Returns:
    The samples.jsonl records written, one per image.
  """
  batches = plan_batches(request)
  cond = conditioning(request, sd.vae_scale)
  total = sum(b.num_real for b in batches)
  log(f'sampling {total} images in {len(batches)} calls of {len(batches[0].prompts)} '
      f'({request.sampler}, {request.steps} steps, guidance {request.guidance}) '
      f'into {request.out_dir}')
  if request.loras:
    log('with LoRAs ' + ', '.join(f'{lora.path} at scale {lora.scale:g}'
                                  for lora in loras_lib.parse_all(request.loras)))
  if os.path.exists(os.path.join(request.out_dir, outputs.SAMPLES_JSONL)):
    log(f'{request.out_dir} holds an earlier run: its samples.jsonl and same-numbered PNGs are '
        'replaced')
  throughput, step_counter = _Throughput(total), _step_counter(sys.stdout)
  written, grid_images, xl = [], [], bool(getattr(sd, 'is_xl', False))
  for b, batch in enumerate(batches):
    images = np.asarray(sd.generate(list(batch.prompts),
                                    **generate_kwargs(request, batch, cond, step_counter, xl)))
    if images.shape[0] != len(batch.prompts):
      raise RuntimeError(f'generate returned {images.shape[0]} images for '
                         f'{len(batch.prompts)} prompts')
    images = images[:batch.num_real]
    written += outputs.write_samples(request.out_dir, images,
                                     records(request, batch, cond, xl), start=batch.start,
                                     grid=False)
    grid_images += list(images[:outputs.MAX_GRID_IMAGES - len(grid_images)])
    if step_counter:
      sys.stdout.write('\r' + ' ' * 24 + '\r')  # erase the step counter
    log(f'call {b + 1}/{len(batches)} (seed {batch.seed}): {throughput.update(batch.num_real)}')
  outputs.write_grid(request.out_dir, np.stack(grid_images))
  log(f'wrote {total} PNGs, {outputs.GRID_PNG} and {outputs.SAMPLES_JSONL} to {request.out_dir}')
  return written
