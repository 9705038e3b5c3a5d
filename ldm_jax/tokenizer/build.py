"""Builds CLIP-format BPE tokenizer folders offline: the real CLIP vocabulary, or a caption one.

`build_clip_tokenizer` writes the 49408-token CLIP BPE from the file in the open-clip-torch wheel
(fetched by `pip download`, never installed); `build_caption_tokenizer` a small vocabulary in which
every caption word is one token. Both folders load with `ldm_jax.tokenizer.load_tokenizer`.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

import transformers

BOS = '<|startoftext|>'
EOS = '<|endoftext|>'
CLIP_VOCAB_SIZE = 49408
OPEN_CLIP_WHEEL = 'open-clip-torch==3.3.0'  # a 1.5 MB py3-none-any wheel that ships the BPE file
_BPE_MEMBER = 'open_clip/bpe_simple_vocab_16e6.txt.gz'
_NUM_MERGES = CLIP_VOCAB_SIZE - 512 - 2  # 48894: lines[1:48895] of the BPE file, as CLIP reads it


def bytes_to_unicode():
  """CLIP's (and GPT-2's) map from the 256 byte values to printable unicode characters."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in printable]
  chars = printable + [256 + n for n in range(len(others))]
  return {b: chr(c) for b, c in zip(printable + others, chars)}


def _base_vocab():
  """The 512 byte-level tokens: 256 characters, then the same with `</w>`."""
  chars = list(bytes_to_unicode().values())
  return chars + [c + '</w>' for c in chars]


def _write_text(path, text):
  """Writes a file through a temporary name, so a crash never leaves a half-written one."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, path)


def _write_folder(out_dir, vocab, merges, pad_token=EOS, max_length=77):
  """Writes vocab.json, merges.txt and the config files of a CLIP tokenizer folder."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  special = {'bos_token': BOS, 'eos_token': EOS, 'unk_token': EOS, 'pad_token': pad_token}
  config = {**special, 'tokenizer_class': 'CLIPTokenizer', 'model_max_length': max_length,
            'do_lower_case': True, 'add_prefix_space': False, 'errors': 'replace'}
  _write_text(out / 'special_tokens_map.json', json.dumps(special, indent=2) + '\n')
  _write_text(out / 'tokenizer_config.json', json.dumps(config, indent=2) + '\n')
  _write_text(out / 'vocab.json', json.dumps({t: i for i, t in enumerate(vocab)},
                                             ensure_ascii=False))
  # merges.txt last: its presence (with vocab.json) marks a finished folder.
  _write_text(out / 'merges.txt', '#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  return out


def _download_wheel(wheel_dir):
  """The open-clip-torch wheel in `wheel_dir`, fetched by `pip download` (never installed)."""
  wheel_dir.mkdir(parents=True, exist_ok=True)
  name = OPEN_CLIP_WHEEL.replace('-', '_').replace('==', '-') + '-py3-none-any.whl'
  if not (wheel_dir / name).is_file():
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
           OPEN_CLIP_WHEEL, '-d', str(wheel_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode or not (wheel_dir / name).is_file():
      raise RuntimeError(
          f'`{" ".join(cmd)}` failed (exit {proc.returncode}); building the CLIP tokenizer needs '
          f'PyPI, or a wheel_dir that already holds {name}.\n{(proc.stdout + proc.stderr)[-2000:]}')
  return wheel_dir / name


def build_clip_tokenizer(out_dir, wheel_dir=None):
  """Builds the 49408-token CLIP tokenizer folder from the BPE file in the open-clip-torch wheel.

  Does nothing when `out_dir` already holds vocab.json and merges.txt.

  Args:
    out_dir: the folder to write (vocab.json, merges.txt, tokenizer_config.json,
      special_tokens_map.json).
    wheel_dir: where to keep the downloaded wheel (a temporary folder by default); a wheel
      already there is reused without network access.

  Returns:
    `out_dir` as a pathlib.Path, ready for `load_tokenizer`.
  """
  out = pathlib.Path(out_dir)
  if (out / 'vocab.json').is_file() and (out / 'merges.txt').is_file():
    return out
  with tempfile.TemporaryDirectory() as tmp:
    wheel = _download_wheel(pathlib.Path(wheel_dir or tmp))
    with zipfile.ZipFile(wheel) as zf:
      lines = gzip.decompress(zf.read(_BPE_MEMBER)).decode('utf-8').split('\n')
  merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]  # line 0 is a header
  vocab = _base_vocab() + [a + b for a, b in merges] + [BOS, EOS]
  if len(set(vocab)) != CLIP_VOCAB_SIZE or any(len(m) != 2 for m in merges):
    raise ValueError(f'{_BPE_MEMBER} in {wheel.name} gave {len(set(vocab))} distinct tokens, '
                     f'not {CLIP_VOCAB_SIZE}')
  return _write_folder(out, vocab, merges)


def _bpe(symbols, ranks):
  """CLIP's BPE: merges the lowest-ranked adjacent pair (every occurrence) until none applies."""
  while len(symbols) > 1:
    pairs = [p for p in zip(symbols, symbols[1:]) if p in ranks]
    if not pairs:
      break
    first, second = min(pairs, key=ranks.get)
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == (first, second):
        merged.append(first + second)
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def _caption_words(captions):
  """The distinct pre-tokens of `captions` (byte-level characters), split as CLIP splits them."""
  base = _base_vocab() + [BOS, EOS]
  backend = transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(base)}, merges=[])
  backend = backend.backend_tokenizer  # its normalizer lower-cases; the pre-tokenizer splits
  words = set()
  for caption in captions:
    normalized = backend.normalizer.normalize_str(caption)
    words.update(piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized))
  return sorted(words)


def build_caption_tokenizer(captions, out_dir, max_length=77):
  """Builds a small CLIP-format BPE tokenizer in which every caption word is one token.

  The vocabulary is the 512 byte-level tokens, the tokens that merges make on the way to each
  word of `captions` (lower-cased, split as CLIP splits), and the two special tokens. Words
  outside the captions still tokenize, in pieces down to single bytes.

  Args:
    captions: an iterable of strings.
    out_dir: the folder to write (overwritten).
    max_length: the model_max_length written to tokenizer_config.json.

  Returns:
    `out_dir` as a pathlib.Path, ready for `load_tokenizer`.
  """
  merges, ranks = [], {}
  for word in _caption_words(captions):
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    # A new merge ranks after all earlier ones, so it never changes how earlier words split.
    while len(parts := _bpe(symbols, ranks)) > 1:
      ranks[parts[0], parts[1]] = len(merges)
      merges.append((parts[0], parts[1]))
  merged = list(dict.fromkeys(a + b for a, b in merges))  # two merges can make the same token
  return _write_folder(out_dir, _base_vocab() + merged + [BOS, EOS], merges,
                       max_length=max_length)
