"""CLIP BPE tokenizers at run time: load a folder from disk, tokenize to fixed-length ids.

Building a vocabulary (the real CLIP one from PyPI, or a small one from captions) is in
`ldm_jax.tokenizer.build`; the command line (`python -m ldm_jax.tokenizer build-clip --out DIR`)
in `ldm_jax.tokenizer.__main__`.
"""

import hashlib
import json
import pathlib

import numpy as np
import transformers

_HUGE_LENGTH = 10**6  # transformers' "no limit" is int(1e30), which overflows inside tokenizers
_BUILD_HINT = ('build one with `python -m ldm_jax.tokenizer build-clip --out DIR` (the real CLIP '
               'vocabulary) or ldm_jax.tokenizer.build.build_caption_tokenizer(captions, DIR)')


def _has_tokenizer_files(folder):
  """Whether `folder` holds vocab.json + merges.txt or a tokenizer.json."""
  return ((folder / 'vocab.json').is_file() and (folder / 'merges.txt').is_file()
          or (folder / 'tokenizer.json').is_file())


def load_tokenizer(folder, max_length=77):
  """Loads a CLIP tokenizer folder from disk (never from a hub).

  Args:
    folder: a tokenizer folder (vocab.json + merges.txt, or tokenizer.json, plus the usual config
      files), or a diffusers model folder with a `tokenizer/` inside.
    max_length: the model_max_length to set when the folder gives none (or a huge one).

  Returns:
    A `transformers.CLIPTokenizer`.

  Raises:
    FileNotFoundError: the folder holds no tokenizer files.
  """
  folder = pathlib.Path(folder)
  if not _has_tokenizer_files(folder) and _has_tokenizer_files(folder / 'tokenizer'):
    folder = folder / 'tokenizer'
  if not _has_tokenizer_files(folder):
    raise FileNotFoundError(f'{folder} holds no tokenizer (it needs vocab.json and merges.txt, '
                            f'or tokenizer.json); {_BUILD_HINT}')
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
  if len(tokenizer) <= 3:  # transformers 5 silently builds a 3-token vocab from unread files
    raise ValueError(f'{folder} loaded as a {len(tokenizer)}-token vocabulary; {_BUILD_HINT}')
  if not tokenizer.model_max_length or tokenizer.model_max_length > _HUGE_LENGTH:
    tokenizer.model_max_length = max_length
  return tokenizer


def tokenize(tokenizer, texts, max_length=77):
  """Token ids padded or truncated to `max_length`, as diffusers pipelines make them.

  A text longer than `max_length` keeps its first `max_length - 1` tokens and its closing EOS;
  shorter ones are padded with the tokenizer's pad token (EOS for SD 1.x, "!" for SD 2.x).

  Args:
    tokenizer: a tokenizer from `load_tokenizer`.
    texts: a string or a sequence of strings.
    max_length: the length of every row (77 for Stable Diffusion).

  Returns:
    (ids, truncated): int32 (N, max_length) and bool (N,), True where a text was cut.
  """
  texts = [texts] if isinstance(texts, str) else list(texts)
  if tokenizer.pad_token_id is None or max_length < 2:
    raise ValueError(f'tokenize needs a pad token and max_length >= 2, got pad '
                     f'{tokenizer.pad_token!r} and max_length {max_length}')
  if not texts:  # transformers 5 raises IndexError on an empty batch
    return np.zeros((0, max_length), np.int32), np.zeros(0, bool)
  # One untruncated pass gives both the ids and which texts were too long; verbose=False keeps
  # transformers from warning about sequences longer than model_max_length.
  rows = tokenizer(texts, padding=False, truncation=False, verbose=False)['input_ids']
  ids = np.full((len(texts), max_length), tokenizer.pad_token_id, np.int32)
  truncated = np.zeros(len(texts), bool)
  for i, row in enumerate(rows):
    if len(row) > max_length:
      row, truncated[i] = row[:max_length - 1] + row[-1:], True
    ids[i, :len(row)] = row
  return ids, truncated


def digest(tokenizer):
  """A digest of the vocabulary, merges and pad token ('none' without a tokenizer): equal
  digests tokenize alike (precomputed token ids are reused only under the same one)."""
  if tokenizer is None:
    return 'none'
  ranks = getattr(tokenizer, 'bpe_ranks', {})
  text = json.dumps([sorted(tokenizer.get_vocab().items()), sorted(ranks, key=ranks.get),
                     str(tokenizer.pad_token)])
  return hashlib.sha256(text.encode()).hexdigest()
