"""Textual inversion: learned token embeddings in and out (`learned_embeds.safetensors`).

diffusers' `pipe.load_textual_inversion(path, token=...)` reads `{token: (n, dim)}` (ours),
`{'emb_params': (n, dim)}` (kohya / A1111 safetensors) and, through the SDXL recipe,
`{'clip_l': (n, 768), 'clip_g': (n, 1280)}`. A vector count n > 1 becomes the tokens
`token, token_1, ..., token_{n-1}`, and prompts name only `token` (`expand_prompt` spells them out).
"""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from ldm_jax.convert import diffusers as diffusers_lib

WEIGHT_NAME = 'learned_embeds.safetensors'  # diffusers' TEXT_INVERSION_NAME_SAFE
SDXL_KEYS = ('clip_l', 'clip_g')  # text_encoder, text_encoder_2


def save_textual_inversion(path, token, embeddings):
  """Writes learned embeddings as diffusers loads them.

  Args:
    path: a .safetensors file, or a folder (then `learned_embeds.safetensors` inside).
    token: the placeholder token, e.g. '<my-cat>' (the file's key).
    embeddings: (n, dim) for SD 1.x/2.x, or {'clip_l': (n, 768), 'clip_g': (n, 1280)} for SDXL.

  Returns:
    The path written.
  """
  if isinstance(embeddings, dict):
    if set(embeddings) != set(SDXL_KEYS):
      raise ValueError('SDXL embeddings are {"clip_l": ..., "clip_g": ...}, got '
                       f'{sorted(embeddings)}')
    state = {k: _rows(v) for k, v in embeddings.items()}
  else:
    state = {token: _rows(embeddings)}
  if not path.endswith('.safetensors'):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  diffusers_lib.save_safetensors(state, path, {'format': 'pt', 'token': token})
  return path


def _rows(x):
  x = np.asarray(x, np.float32)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2:
    raise ValueError(f'embeddings are (num_vectors, dim), got {x.shape}')
  return np.ascontiguousarray(x)


def load_textual_inversion(path, token=None):
  """Reads a textual inversion file (ours, diffusers', kohya's or an SDXL one).

  Args:
    path: the .safetensors file or a folder holding learned_embeds.safetensors.
    token: the token to use (needed when the file does not name one: 'emb_params', SDXL).

  Returns:
    (token, embeddings): (n, dim) float32, or {'clip_l': ..., 'clip_g': ...} for SDXL.
  """
  if os.path.isdir(path):
    path = os.path.join(path, WEIGHT_NAME)
  if not path.endswith('.safetensors'):
    raise ValueError(f'{path}: ldm_jax reads embeddings from .safetensors only (never unpickles '
                     '.pt/.bin); convert it once where torch is installed')
  state = st_numpy.load_file(path)
  if set(state) == set(SDXL_KEYS):
    return _need_token(token, path), {k: _rows(v) for k, v in state.items()}
  if len(state) != 1:
    raise ValueError(f'{path} holds {sorted(state)}; a textual inversion file holds one '
                     '{token: (n, dim)} entry (or clip_l and clip_g for SDXL)')
  (name, value), = state.items()
  if name in ('emb_params', '*'):
    name = _need_token(token, path)
  return token or name, _rows(value)


def _need_token(token, path):
  if token is None:
    raise ValueError(f'{path} does not name its token: pass token="<...>"')
  return token


def vector_tokens(token, n):
  """The tokens of an n-vector embedding, as diffusers names them."""
  return [token] + [f'{token}_{i}' for i in range(1, n)]


def expand_prompt(prompt, token, n):
  """'a <tok> cat' -> 'a <tok> <tok>_1 ... cat' for an n-vector token (diffusers' spelling)."""
  return prompt.replace(token, ' '.join(vector_tokens(token, n)))


@dataclasses.dataclass(frozen=True)
class AddedTokens:
  token: str
  ids: tuple  # the new tokens' ids, one per vector


def add_tokens(tokenizer, text_encoder, token, embeddings):
  """Adds a textual inversion to a tokenizer and a text encoder, as diffusers does.

  Args:
    tokenizer: a transformers CLIPTokenizer (modified in place: `add_tokens`).
    text_encoder: (CLIPTextModel, params).
    token: the placeholder token; it must be new to the tokenizer.
    embeddings: (n, dim).

  Returns:
    ((module, params) with the embedding table extended, AddedTokens).
  """
  module, params = text_encoder
  rows = jnp.asarray(_rows(embeddings))
  tokens = vector_tokens(token, rows.shape[0])
  taken = [t for t in tokens if t in tokenizer.get_vocab()]
  if taken:
    raise ValueError(f'tokens {taken} are already in the tokenizer: choose another token')
  table = params['embeddings']['token_embedding']['embedding']
  if table.shape[0] != len(tokenizer):
    raise ValueError(f'the embedding table has {table.shape[0]} rows but the tokenizer '
                     f'{len(tokenizer)} tokens: new tokens would get the wrong ids')
  tokenizer.add_tokens(tokens)
  ids = tuple(tokenizer.convert_tokens_to_ids(t) for t in tokens)
  params = extend_embeddings(params, rows)
  config = dataclasses.replace(module.config, vocab_size=params['embeddings'][
      'token_embedding']['embedding'].shape[0])
  return (module.clone(config=config), params), AddedTokens(token, ids)


def extend_embeddings(params, rows):
  """The text encoder params with `rows` appended to the token embedding table: jittable and
  differentiable w.r.t. `rows` (textual inversion trains only them)."""
  table = params['embeddings']['token_embedding']['embedding']
  table = jnp.concatenate([table, jnp.asarray(rows, table.dtype)], axis=0)
  emb = dict(params['embeddings'], token_embedding={'embedding': table})
  return dict(params, embeddings=emb)
