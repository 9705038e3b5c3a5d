"""CLIP score: how well generated images match their prompts, as torchmetrics and MLPerf report it.

Both take the cosine between a CLIP model's image embedding and its prompt's text embedding:

- torchmetrics' `CLIPScore` (and the papers that quote "CLIP score 31.7", MLPerf Inference SDXL
  among them): 100 x the mean cosine, clipped at 0: `max(100 * mean(cos), 0)`. torchmetrics
  clips the mean, not each image's score (its docstring writes the clip per image; the code
  clips the average, and so do we). `clip_score` returns this scale.
- MLPerf Training's Stable Diffusion benchmark (mlcommons/training stable_diffusion,
  `CLIPEncoder.get_clip_score`, OpenCLIP ViT-H/14 laion2b_s32b_b79k): the plain mean cosine,
  neither scaled nor clipped; its target is CLIP >= 0.15. `mean_cosine` returns that scale;
  for positive scores it is `clip_score / 100`.

Images are preprocessed as the model's source does on the host (PIL), then embedded by jitted
functions with the batch sharded over all devices.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax import sharding
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.convert import clip as convert_clip

P = jax.sharding.PartitionSpec
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {'nearest': 0, 'lanczos': 1, 'bilinear': 2, 'bicubic': 3, 'box': 4, 'hamming': 5}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """CLIPImageProcessor's settings (transformers' names), plus open_clip's crop rounding.

  `size` is the shortest edge to resize to (an int) or an exact (height, width).
  """
  do_resize: bool = True
  size: object = 224
  resample: int = 3  # PIL.Image.BICUBIC
  do_center_crop: bool = True
  crop_size: tuple = (224, 224)  # (height, width)
  do_rescale: bool = True
  rescale_factor: float = 1 / 255
  do_normalize: bool = True
  image_mean: tuple = OPENAI_CLIP_MEAN
  image_std: tuple = OPENAI_CLIP_STD
  # The crop's corner: transformers floors (size - crop) / 2; torchvision's CenterCrop, which
  # open_clip uses, rounds it half to even (one pixel further when size - crop is 3 mod 4).
  round_crop_offset: bool = False

  @classmethod
  def from_transformers(cls, raw):
    """From a `preprocessor_config.json` dict (both its old int and its new dict sizes)."""
    size = raw.get('size', 224)
    if isinstance(size, dict):
      size = size['shortest_edge'] if 'shortest_edge' in size else (size['height'], size['width'])
    crop = raw.get('crop_size', 224)
    crop = (crop['height'], crop['width']) if isinstance(crop, dict) else (crop, crop)
    kw = {k: raw[k] for k in ('do_resize', 'resample', 'do_center_crop', 'do_rescale',
                              'rescale_factor', 'do_normalize') if k in raw}
    kw |= {k: tuple(raw[k]) for k in ('image_mean', 'image_std') if k in raw}
    return cls(size=size, crop_size=crop, **kw)

  @classmethod
  def from_open_clip(cls, raw, image_size):
    """From open_clip's `preprocess_cfg` (open_clip_config.json): its eval transform."""
    mode = raw.get('resize_mode', 'shortest')
    if mode not in ('shortest', 'squash'):
      raise ValueError(f'open_clip resize_mode {mode!r} is not supported (shortest, squash)')
    size = raw.get('size', image_size)
    size = size if isinstance(size, int) else size[0]
    return cls(size=(size, size) if mode == 'squash' else size, crop_size=(size, size),
               resample=_PIL_RESAMPLE[raw.get('interpolation', 'bicubic')],
               image_mean=tuple(raw.get('mean', OPENAI_CLIP_MEAN)),
               image_std=tuple(raw.get('std', OPENAI_CLIP_STD)), round_crop_offset=True)

  @classmethod
  def for_model(cls, clip_model):
    """The settings a loaded `convert.clip.CLIPModel` came with, else CLIP's at its image size."""
    image_size = clip_model.vision[0].config.image_size
    if clip_model.kind == 'open_clip':
      return cls.from_open_clip(clip_model.preprocess or {}, image_size)
    if clip_model.preprocess is not None:
      return cls.from_transformers(clip_model.preprocess)
    return cls(size=image_size, crop_size=(image_size, image_size))


def _as_rgb(image):
  """A uint8 (H, W, 3|4|1) or (H, W) array or a PIL image -> a PIL RGB image."""
  if isinstance(image, Image.Image):
    return image.convert('RGB')
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (as saved PNGs and the sampler\'s output), got '
                     f'{image.dtype}: convert floats in [0, 1] with np.round(x * 255)')
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  return Image.fromarray(image).convert('RGB')


def _resize_size(height, width, size):
  if not isinstance(size, int):
    return tuple(size)
  if height <= width:  # the short side to `size`, the long one truncated as transformers does
    return size, int(size * width / height)
  return int(size * height / width), size


def _center_crop(x, crop, round_offset):
  (h, w), (ch, cw) = x.shape[:2], crop
  if h < ch or w < cw:
    raise ValueError(f'an image of {h}x{w} is smaller than the {ch}x{cw} crop after resizing')
  offset = (lambda d: int(round(d / 2))) if round_offset else (lambda d: d // 2)
  top, left = offset(h - ch), offset(w - cw)
  return x[top:top + ch, left:left + cw]


def preprocess(images, settings=Preprocess()):
  """Images -> the CLIP model's input, as CLIPImageProcessor (or open_clip's transform) makes it.

  Args:
    images: a sequence of uint8 (H, W, 3) arrays or PIL images (sizes may differ), or one uint8
      (N, H, W, 3) array.
    settings: a Preprocess (`Preprocess.for_model(clip_model)`).

  Returns:
    float32 (N, crop_h, crop_w, 3), NHWC.
  """
  s, out = settings, []
  for image in images:
    image = _as_rgb(image)
    if s.do_resize:
      h, w = _resize_size(image.height, image.width, s.size)
      if (h, w) != (image.height, image.width):
        image = image.resize((w, h), resample=s.resample)
    x = np.asarray(image)
    if s.do_center_crop:
      x = _center_crop(x, s.crop_size, s.round_crop_offset)
    x = x.astype(np.float64) * s.rescale_factor if s.do_rescale else x.astype(np.float64)
    if s.do_normalize:
      x = (x - np.asarray(s.image_mean)) / np.asarray(s.image_std)
    out.append(x.astype(np.float32))
  if not out:
    h, w = s.crop_size if s.do_center_crop else (0, 0)
    return np.zeros((0, h, w, 3), np.float32)
  return np.stack(out)


def cosine_similarity(image_embeds, text_embeds):
  """Row-wise cosine of (N, E) image and text embeddings, in float64: (N,)."""
  a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return np.sum(a * b, axis=-1)


def clip_score(cosines):
  """torchmetrics' CLIPScore from per-image cosines: max(100 * mean(cos), 0), in [0, 100]."""
  return max(100.0 * float(np.mean(cosines)), 0.0)


def mean_cosine(cosines):
  """MLPerf Training's SD CLIP metric from per-image cosines: their plain mean."""
  return float(np.mean(cosines))


class CLIPScorer:
  """Embeds images and prompts with a CLIP model: jitted, with the batch over all devices.

  On several hosts every process passes its own images and prompts, the same number on each;
  the embeddings and scores returned cover all processes' examples, in process order.

  Args:
    clip_model: a `convert.clip.CLIPModel` (`convert.clip.load_clip(path)`).
    tokenizer: the model's CLIP tokenizer (`ldm_jax.tokenizer.load_tokenizer(folder)`).
    settings: the image Preprocess (default: `Preprocess.for_model(clip_model)`).
    batch_size: examples per host per call of the jitted functions (rounded up to a multiple of
      this host's device count).
    mesh: the device mesh (default: all devices on one 'data' axis); the batch is split over its
      data-like axes and the weights replicated.
  """

  def __init__(self, clip_model, tokenizer, settings=None, batch_size=64, mesh=None):
    self.tokenizer = tokenizer
    self.settings = settings or Preprocess.for_model(clip_model)
    self.mesh = mesh or sharding.make_mesh((('data', -1),))
    local = jax.local_device_count()
    self.batch_size = max(local, math.ceil(batch_size / local) * local)
    (text, text_params), (vision, vision_params) = clip_model.text, clip_model.vision
    self.max_length = text.config.max_position_embeddings
    replicated = jax.sharding.NamedSharding(self.mesh, P())
    params = (text_params, vision_params)
    self._params = sharding.put_host_tree(params, jax.tree.map(lambda _: replicated, params))
    batch = sharding.batch_sharding(self.mesh)
    # (params, (inputs, valid)) -> (embeddings, valid), both gathered onto every device: each
    # host reads back all hosts' rows and drops the padding by the gathered mask.
    jit = lambda fn: jax.jit(lambda p, b: (fn(p, b[0]).astype(jnp.float32), b[1]),
                             in_shardings=(replicated, batch), out_shardings=replicated)
    self._embed_text = jit(lambda p, ids: text.apply({'params': p[0]}, ids).text_embeds)
    self._embed_images = jit(lambda p, x: vision.apply({'params': p[1]}, x).image_embeds)

  @classmethod
  def from_path(cls, path, tokenizer=None, model=None, dtype=jnp.float32, **kw):
    """A scorer for the CLIP model at `path` (see `convert.clip.load_clip`), with the tokenizer
    of the folder `tokenizer` (default: `path`'s own, or the folder beside an open_clip file)."""
    clip_model = convert_clip.load_clip(path, dtype=dtype, model=model)
    if tokenizer is None:
      tokenizer = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    return cls(clip_model, tokenizer_lib.load_tokenizer(tokenizer), **kw)

  def _run(self, fn, items, prepare):
    """`fn` over `prepare(chunk)` of each chunk of `items`, padded to the batch size; the valid
    rows of every process, stacked (only one chunk of inputs is ever held)."""
    out = []
    for start in range(0, max(len(items), 1), self.batch_size):
      rows = prepare(items[start:start + self.batch_size])
      valid = np.arange(self.batch_size) < len(rows)
      rows = np.concatenate([rows, np.zeros((self.batch_size - len(rows),) + rows.shape[1:],
                                            rows.dtype)])
      embeds, valid = fn(self._params, sharding.put_batch((rows, valid), self.mesh))
      out.append(np.asarray(embeds)[np.asarray(valid)])
    return np.concatenate(out)

  def text_embeds(self, prompts):
    """(N, E) float32 projected text embeddings (unnormalised) of the prompts."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    tokenize = lambda texts: tokenizer_lib.tokenize(self.tokenizer, texts, self.max_length)[0]
    return self._run(self._embed_text, prompts, tokenize)

  def image_embeds(self, images):
    """(N, E) float32 projected image embeddings (unnormalised); images as `preprocess` takes."""
    return self._run(self._embed_images, images, lambda chunk: preprocess(chunk, self.settings))

  def cosines(self, images, prompts):
    """(N,) cosine of each image with its prompt."""
    if len(images) != len(prompts):
      raise ValueError(f'{len(images)} images but {len(prompts)} prompts: one prompt per image')
    return cosine_similarity(self.image_embeds(images), self.text_embeds(prompts))

  def evaluate(self, images, prompts):
    """{'clip_score': torchmetrics' scale (0-100), 'clip_cosine': MLPerf's mean cosine, 'n'}."""
    cos = self.cosines(images, prompts)
    return {'clip_score': clip_score(cos), 'clip_cosine': mean_cosine(cos), 'n': len(cos)}

