"""Tokenizer tests: the real CLIP vocabulary built from PyPI, padding, truncation, caption BPE."""

import json
import random
import shutil
import unicodedata

import numpy as np
import pytest

from ldm_jax import tokenizer
from ldm_jax.tokenizer import __main__ as tokenizer_cli
from ldm_jax.tokenizer import build as tokenizer_build

CAT = [49406, 320, 1125, 539, 320, 2368, 49407]
ASTRONAUT = [49406, 550, 18376, 6765, 320, 4558, 525, 518, 3293, 256, 49407]
EOS_ID = 49407

SHAPE_CAPTIONS = [f'a {size} {color} {shape} {where}'
                  for size in ('small', 'large') for color in ('red', 'green', 'blue', 'yellow')
                  for shape in ('circle', 'square', 'triangle')
                  for where in ('on the left', 'on the right', 'in the middle')]
# Words with repeated letters and pairs that other words share stress the order of merges.
ODD_CAPTIONS = ['aaa aaaa aaaaa bookkeeper committee mississippi', 'ab cab abc bca cabcab',
                'Café naïve ZÜRICH 東京 москва']


@pytest.fixture(scope='session')
def clip_dir(tmp_path_factory):
  """NEEDS NETWORK: the real CLIP tokenizer, built once from the open-clip-torch wheel on PyPI.

  Without PyPI every test that uses it fails (not skips) with pip's own output, so a broken
  set-up cannot pass silently.
  """
  root = tmp_path_factory.mktemp('clip')
  try:
    return tokenizer_build.build_clip_tokenizer(root / 'tokenizer', wheel_dir=root / 'wheels')
  except RuntimeError as e:
    error = str(e)  # failed outside the except block, so pytest shows pip's output only once
  pytest.fail(f'building the CLIP tokenizer needs network access to PyPI:\n{error}', pytrace=False)


@pytest.fixture(scope='session')
def clip(clip_dir):
  return tokenizer.load_tokenizer(clip_dir)


def _varied_captions(n, seed=0):
  """`n` captions with mixed case, punctuation, numbers, contractions, unicode and long ones."""
  rng = random.Random(seed)
  words = ('a photo of the cat dog astronaut riding horse moon castle painting by greg portrait '
           'highly detailed 8k unreal engine trending on artstation sunset over mountains').split()
  extras = ["It's", "DON'T", "they'll", "we've", 'x-ray', 'e.g.', '3.14', '1,000', '2nd', '42%',
            '#hashtag', '@user', '(masterpiece)', '[best quality]', '{a|b}', '...', '!?', '—',
            'café', 'naïve', 'Zürich', 'ÉCOLE', 'straße', '東京', 'москва', 'Ελλάδα', '😀', '🐱‍👤',
            'ﬁne', '&amp;', 'C++', 'snake_case', 'CamelCase', 'ümlaut', 'İstanbul',
            '\t', '  ', '\n']
  captions = []
  for i in range(n):
    length = rng.choice([1, 3, 8, 15]) if i % 10 else rng.randint(60, 120)  # every 10th is long
    tokens = [rng.choice(extras) if rng.random() < 0.3 else rng.choice(words)
              for _ in range(length)]
    tokens = [t.upper() if rng.random() < 0.1 else t.title() if rng.random() < 0.1 else t
              for t in tokens]
    caption = ' '.join(tokens) + rng.choice(['', '.', '!', ' ,', '?!'])
    # transformers applies NFC first, instant-clip-tokenizer does not; compare on NFC text.
    captions.append(unicodedata.normalize('NFC', caption))
  return captions


def test_canonical_ids(clip):
  assert len(clip) == tokenizer_build.CLIP_VOCAB_SIZE
  assert clip('a photo of a cat')['input_ids'] == CAT
  assert clip('An astronaut riding a horse on the Moon!')['input_ids'] == ASTRONAUT


def test_build_is_cached(clip_dir):
  before = {p.name: p.stat().st_mtime_ns for p in clip_dir.iterdir()}
  assert tokenizer_build.build_clip_tokenizer(clip_dir) == clip_dir  # no download, no rewrite
  assert {p.name: p.stat().st_mtime_ns for p in clip_dir.iterdir()} == before


def test_pads_with_eos(clip):
  ids, truncated = tokenizer.tokenize(clip, ['a photo of a cat', 'An astronaut riding a horse '
                                             'on the Moon!'])
  assert ids.dtype == np.int32 and ids.shape == (2, 77) and truncated.dtype == bool
  np.testing.assert_array_equal(ids[0], CAT + [EOS_ID] * (77 - len(CAT)))
  np.testing.assert_array_equal(ids[1], ASTRONAUT + [EOS_ID] * (77 - len(ASTRONAUT)))
  assert not truncated.any()
  ids, truncated = tokenizer.tokenize(clip, [])
  assert ids.shape == (0, 77) and truncated.shape == (0,)


def test_truncates_long_prompt(clip):
  long = 'a photo of a cat ' * 30
  ids, truncated = tokenizer.tokenize(clip, [long, 'a cat', long[:-50]])
  np.testing.assert_array_equal(truncated, [True, False, True])
  assert ids[0, 0] == 49406 and ids[0, -1] == EOS_ID
  np.testing.assert_array_equal(ids[0, 1:76], ([320, 1125, 539, 320, 2368] * 15))
  exact = ' '.join(['cat'] * 75)  # 75 words + BOS + EOS fill 77 exactly: not truncated
  assert not tokenizer.tokenize(clip, exact)[1][0]
  assert tokenizer.tokenize(clip, exact + ' cat')[1][0]


def test_pads_with_the_folders_pad_token(clip_dir, tmp_path):
  sd2 = shutil.copytree(clip_dir, tmp_path / 'sd2')
  for name in ('special_tokens_map.json', 'tokenizer_config.json'):
    config = json.loads((sd2 / name).read_text())
    config['pad_token'] = '!'  # SD 2.x's tokenizer pads with "!" (id 0)
    config.pop('model_max_length', None)  # and a folder without it gets the default 77
    (sd2 / name).write_text(json.dumps(config))
  sd2_tokenizer = tokenizer.load_tokenizer(sd2)
  assert sd2_tokenizer.model_max_length == 77
  ids, _ = tokenizer.tokenize(sd2_tokenizer, 'a photo of a cat', max_length=12)
  np.testing.assert_array_equal(ids[0], CAT + [0] * 5)


def test_matches_transformers_padding_and_truncation(clip):
  captions = _varied_captions(200, seed=1)
  ids, truncated = tokenizer.tokenize(clip, captions)
  expected = clip(captions, padding='max_length', truncation=True, max_length=77,
                  return_tensors='np')['input_ids']
  np.testing.assert_array_equal(ids, expected)
  lengths = np.array([len(row) for row in clip(captions)['input_ids']])
  np.testing.assert_array_equal(truncated, lengths > 77)
  assert 5 < truncated.sum() < 100


def test_matches_instant_clip_tokenizer(clip):
  instant = pytest.importorskip('instant_clip_tokenizer')
  captions = _varied_captions(400)
  ids, truncated = tokenizer.tokenize(clip, captions)
  reference = instant.Tokenizer().tokenize_batch(captions, context_length=77)  # pads with 0
  for caption, row, ref in zip(captions, ids, reference):
    unpadded = row[:list(row).index(EOS_ID) + 1]
    ref = ref[:list(ref).index(EOS_ID) + 1]
    np.testing.assert_array_equal(unpadded, ref, err_msg=repr(caption))
  assert truncated.any() and not truncated.all()


def test_caption_tokenizer_one_token_per_word(tmp_path):
  captions = SHAPE_CAPTIONS + ODD_CAPTIONS + ['top-left, 3.5']
  caption_tokenizer = tokenizer.load_tokenizer(
      tokenizer_build.build_caption_tokenizer(captions, tmp_path))
  for word in ' '.join(SHAPE_CAPTIONS + ODD_CAPTIONS).lower().split():
    assert len(caption_tokenizer.tokenize(word)) == 1, (word, caption_tokenizer.tokenize(word))
  # Punctuation runs are words too; numbers split into digits, as in CLIP.
  assert caption_tokenizer.tokenize('top-left, 3.5') == ['top</w>', '-</w>', 'left</w>', ',</w>',
                                                         '3</w>', '.</w>', '5</w>']
  assert len(caption_tokenizer) < 700
  ids, truncated = tokenizer.tokenize(caption_tokenizer, SHAPE_CAPTIONS)
  assert not truncated.any()
  np.testing.assert_array_equal((ids != caption_tokenizer.eos_token_id).sum(1),
                                [1 + len(c.split()) for c in SHAPE_CAPTIONS])  # BOS + words
  for caption, row in zip(SHAPE_CAPTIONS, ids):
    assert caption_tokenizer.decode(row, skip_special_tokens=True) == caption


def test_caption_tokenizer_unknown_words(tmp_path):
  caption_tokenizer = tokenizer.load_tokenizer(
      tokenizer_build.build_caption_tokenizer(SHAPE_CAPTIONS, tmp_path))
  text = 'a purple hexagon beside a zebra 🦓'
  ids, _ = tokenizer.tokenize(caption_tokenizer, text)
  assert caption_tokenizer.unk_token_id not in ids[0, 1:list(ids[0]).index(
      caption_tokenizer.eos_token_id)]  # byte-level: no word is ever unknown
  assert caption_tokenizer.decode(ids[0], skip_special_tokens=True) == text
  assert len(caption_tokenizer.tokenize('hexagon')) > 1


def test_missing_tokenizer_files(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'holds no tokenizer.*build-clip --out'):
    tokenizer.load_tokenizer(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / 'absent')):
    tokenizer.load_tokenizer(tmp_path / 'absent')


def test_diffusers_folder_and_saved_tokenizer(tmp_path):
  build = tokenizer_build.build_caption_tokenizer(SHAPE_CAPTIONS, tmp_path / 'model' / 'tokenizer')
  from_root = tokenizer.load_tokenizer(tmp_path / 'model')  # a diffusers folder's tokenizer/
  from_root.save_pretrained(tmp_path / 'saved')  # transformers 5 writes only tokenizer.json
  for loaded in (tokenizer.load_tokenizer(build), tokenizer.load_tokenizer(tmp_path / 'saved')):
    np.testing.assert_array_equal(tokenizer.tokenize(loaded, SHAPE_CAPTIONS)[0],
                                  tokenizer.tokenize(from_root, SHAPE_CAPTIONS)[0])


def test_cli_build_is_cached(clip_dir, capsys):
  tokenizer_cli.main(['build-clip', '--out', str(clip_dir)])  # already built: no network
  assert '49408 tokens' in capsys.readouterr().out
