"""SDXL's conditioning: both text encoders' penultimate states, the pooled embedding, time ids.

`XLText` holds SDXL's text encoders (the base has CLIP-L and OpenCLIP-bigG, the refiner only
bigG) and encodes prompts as diffusers' StableDiffusionXL pipelines do: each encoder's
`hidden_states[-2]` (no final LayerNorm) concatenated into the U-Net's context, and the second
encoder's projected `text_embeds` as the pooled embedding. `time_ids` builds the micro-
conditioning (original size, crop offsets, target size or aesthetic score) on the host: the
compiled function takes it as a traced input, so new sizes and scores do not recompile.
"""

import dataclasses
import logging

import jax.numpy as jnp
import numpy as np

from ldm_jax import tokenizer as tokenizer_lib

AESTHETIC_IDS = 5  # original h, w, crop top, left, aesthetic score (the refiner)
SIZE_IDS = 6  # original h, w, crop top, left, target h, w (the base)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """SDXL's micro-conditioning arguments, with diffusers' names and defaults.

  Sizes are (height, width) and offsets (top, left), in pixels; None sizes default to the
  generated image's size. The negative_* values condition the unconditional half of
  classifier-free guidance; `aesthetic_score`s only matter to a refiner
  (requires_aesthetics_score).
  """
  original_size: tuple | None = None
  crops_coords_top_left: tuple = (0, 0)
  target_size: tuple | None = None
  negative_original_size: tuple | None = None
  negative_crops_coords_top_left: tuple = (0, 0)
  negative_target_size: tuple | None = None
  aesthetic_score: float = 6.0
  negative_aesthetic_score: float = 2.5

  def problems(self):
    """Every argument that is not a pair of non-negative integers (None sizes are fine)."""
    out = []
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if not f.name.endswith('score') and value is not None and not _is_pair(value):
        out.append(f'{f.name} {value!r} is not a pair of non-negative integers: '
                   f'{"(top, left)" if "crops" in f.name else "(height, width)"} in pixels')
    return out

  def is_default(self):
    """Whether every argument is diffusers' default (what a model without SDXL's added
    conditioning takes)."""
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if (value is None) != (f.default is None) or (
          value is not None and not np.array_equal(value, f.default)):
        return False
    return True


def _is_pair(value):
  try:
    pair = np.asarray(value, np.float64)
  except (TypeError, ValueError):
    return False
  return pair.shape == (2,) and bool(np.all((pair >= 0) & (pair == np.round(pair))))


def time_ids(sizes, height, width, mode, aesthetics):
  """The (conditional, unconditional) time ids, as diffusers' SDXL pipelines build them.

  Args:
    sizes: a Sizes.
    height, width: the generated image's size in pixels (the default original/target size).
    mode: 'txt2img', 'img2img' or 'inpaint' (diffusers' pipelines differ in the negative ids).
    aesthetics: the refiner's layout (requires_aesthetics_score): the aesthetic score replaces
      the target size.

  Returns:
    Two float32 arrays of K ids (K = SIZE_IDS, or AESTHETIC_IDS with `aesthetics`).
  """
  s = sizes
  pair = lambda v, default: tuple(int(x) for x in (default if v is None else v))
  original, target = pair(s.original_size, (height, width)), pair(s.target_size, (height, width))
  crops = pair(s.crops_coords_top_left, (0, 0))
  negative_crops = pair(s.negative_crops_coords_top_left, (0, 0))
  cond = original + crops + target
  if mode == 'txt2img' and not aesthetics:
    # StableDiffusionXLPipeline: the negative ids only when both negative sizes are given.
    if s.negative_original_size is None or s.negative_target_size is None:
      return np.float32(cond), np.float32(cond)
    uncond = pair(s.negative_original_size, ()) + negative_crops + pair(s.negative_target_size, ())
    return np.float32(cond), np.float32(uncond)
  negative_original = pair(s.negative_original_size, original)
  negative_target = pair(s.negative_target_size, target)
  if aesthetics:
    return (np.float32(original + crops + (s.aesthetic_score,)),
            np.float32(negative_original + negative_crops + (s.negative_aesthetic_score,)))
  # The Img2Img and Inpaint pipelines pair the negative sizes with the *positive* crop offsets.
  return np.float32(cond), np.float32(negative_original + crops + negative_target)


class XLText:
  """SDXL's text encoders and options: token ids on the host, context and pooled in jit.

  Attributes:
    encoders: ((params key, module, tokenizer, max_length), ...): 'text' (CLIP-L, absent from
      the refiner) then 'text_2' (OpenCLIP-bigG with projection).
    force_zeros: model_index.json's force_zeros_for_empty_prompt (diffusers' default True):
      without negative prompts the unconditional context and pooled embedding are zeros.
    aesthetics: requires_aesthetics_score (the refiner's time ids).
  """

  def __init__(self, components, unet_config):
    """Takes the encoders of `components` and checks them against the U-Net's widths.

    Raises:
      ValueError: no second encoder, a missing tokenizer, or widths the U-Net does not take.
    """
    if components.text_encoder_2 is None or components.tokenizer_2 is None:
      raise ValueError('this SDXL U-Net (text_time conditioning) needs text_encoder_2 and '
                       'tokenizer_2 (its pooled embedding): load the whole SDXL folder')
    pairs = [('text', components.text_encoder, components.tokenizer),
             ('text_2', components.text_encoder_2, components.tokenizer_2)]
    if components.text_encoder is not None and components.tokenizer is None:
      raise ValueError('these components have text_encoder but no tokenizer; sampling from '
                       'prompts needs one')
    self.encoders = tuple(
        (key, enc[0], tok, min(tok.model_max_length, enc[0].config.max_position_embeddings))
        for key, enc, tok in pairs if enc is not None)
    options = dict(components.options or {})
    self.force_zeros = bool(options.get('force_zeros_for_empty_prompt', True))
    self.aesthetics = bool(options.get('requires_aesthetics_score', False))
    self.num_ids = AESTHETIC_IDS if self.aesthetics else SIZE_IDS
    _check_widths(self, unet_config)

  def token_ids(self, texts):
    """{params key: (N, max_length) int32 ids} for every encoder, as diffusers tokenizes."""
    out = {}
    for key, _, tok, max_length in self.encoders:
      ids, truncated = tokenizer_lib.tokenize(tok, list(texts), max_length)
      for text in np.asarray(list(texts), object)[truncated]:
        logging.warning('prompt longer than %d tokens, truncated: %r', max_length, text[:200])
      out[key] = ids
    return out

  def encode(self, params, ids, clip_skip):
    """(context (B, L, sum of widths), pooled (B, P)) from `token_ids` (call inside jit).

    clip_skip k takes hidden_states[-(k + 2)] (diffusers: SDXL always counts from the
    penultimate layer).
    """
    layer = -2 if clip_skip is None else -(clip_skip + 2)
    states, pooled = [], None
    for key, module, _, _ in self.encoders:
      out = module.apply({'params': params[key]}, ids[key])
      states.append(out.hidden_states[layer])
      pooled = out.text_embeds  # only the last encoder's (diffusers' rule)
    return jnp.concatenate(states, axis=-1), pooled


def _check_widths(text, unet_config):
  """The context and added-embedding widths the U-Net expects, with diffusers' hints."""
  c = unet_config
  width = sum(module.config.hidden_size for _, module, _, _ in text.encoders)
  if width != c.cross_attention_dim:
    raise ValueError(f'the text encoders give a {width}-wide context but the U-Net attends to '
                     f'{c.cross_attention_dim}: these components do not belong together')
  pooled = text.encoders[-1][1].config
  if not pooled.with_projection:
    raise ValueError('text_encoder_2 has no text_projection (CLIPTextModelWithProjection): '
                     'SDXL needs its pooled text_embeds')
  passed = c.addition_time_embed_dim * text.num_ids + pooled.projection_dim
  expected = c.projection_class_embeddings_input_dim
  if passed == expected:
    return
  hint = 'check unet/config.json and text_encoder_2/config.json'
  if expected - passed == c.addition_time_embed_dim:
    hint = 'set requires_aesthetics_score true in model_index.json (a refiner)'
  elif passed - expected == c.addition_time_embed_dim:
    hint = 'set requires_aesthetics_score false in model_index.json (not a refiner)'
  raise ValueError(f'the U-Net takes a {expected}-wide added embedding but {text.num_ids} time '
                   f'ids x {c.addition_time_embed_dim} + pooled {pooled.projection_dim} give '
                   f'{passed}: {hint}')
