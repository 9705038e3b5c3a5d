"""Aspect-ratio buckets: the bucket sets, assignment, one bucket per batch on every host, exact
resume, bad records replaced and counted, and the size conditioning carried with each example.

One dataset, made here: 60 images of five aspect ratios (24-64 px) in two webdataset shards,
three of them corrupt, one an EXIF-rotated JPEG.
"""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import buckets
from ldm_jax.data import pipeline
from ldm_jax.tokenizer import build as tokenizer_build

N = 60
SIZES = ((32, 48), (64, 32), (48, 48), (56, 24), (24, 56))  # (width, height)
CORRUPT = (5, 17, 44)
ROTATED = 9  # a 32x48 JPEG stored as 48x32 with EXIF orientation 6 (turn a quarter)


def _image_bytes(i):
  w, h = SIZES[i % len(SIZES)]
  yy, xx = np.mgrid[0:h, 0:w]
  pixels = np.stack([(xx * 5 + yy * (1 + i % 7) + 50 * c + 3 * i) % 256 for c in range(3)], -1)
  img = Image.fromarray(pixels.astype(np.uint8))
  buf = io.BytesIO()
  if i == ROTATED:
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(buf, 'JPEG', exif=exif)
  else:
    img.save(buf, 'PNG')
  return buf.getvalue() if i not in CORRUPT else b'not an image'


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """Two webdataset shards (img2dataset's layout) read in place."""
  folder = tmp_path_factory.mktemp('shards')
  for shard in range(2):
    with tarfile.open(folder / f'{shard:05d}.tar', 'w') as tar:
      for i in range(shard * N // 2, (shard + 1) * N // 2):
        for ext, payload in (('jpg' if i == ROTATED else 'png', _image_bytes(i)),
                             ('txt', f'picture {i}'.encode())):
          info = tarfile.TarInfo(f'{i:09d}.{ext}')
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  return str(folder), 'webdataset:{00000..00001}.tar'


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  folder = tokenizer_build.build_caption_tokenizer(['picture'], tmp_path_factory.mktemp('tok'))
  return tokenizer_lib.load_tokenizer(folder)


def _config(data, **kw):
  data_dir, name = data
  kw = {'resolution': 32, 'batch_size': 4, 'buckets': 'auto', 'seed': 3} | kw
  return pipeline.LoaderConfig(name=name, data_dir=data_dir, **kw)


def test_bucket_sets():
  sd = buckets.parse('auto', 512)
  assert (512, 512) in sd and (256, 1024) in sd and (1024, 256) in sd
  assert all(w % 64 == 0 and h % 64 == 0 and 0.75 <= w * h / 512 ** 2 <= 1.0 for w, h in sd)
  xl = buckets.parse('sdxl', 1024)
  assert len(xl) == 41 and (1024, 1024) in xl and (2048, 512) in xl and (832, 1216) in xl
  assert buckets.parse('64x32, 32x64', 32) == ((32, 64), (64, 32))
  assert buckets.parse(None, 32) is None
  for bad, says in (('60x32', 'multiples of 8'), ('wide', 'not WxH'), (3, 'must be')):
    with pytest.raises(ValueError, match=says):
      buckets.parse(bad, 32)
  problems = pipeline.LoaderConfig.problems({'name': 'x', 'data_dir': 'd', 'buckets': '33x32'})
  assert len(problems) == 1 and 'multiples of 8' in problems[0]
  # Nearest aspect ratio in log space; an unknown size goes to the squarest bucket.
  chosen = buckets.assign([(100, 50), (50, 100), (60, 60), (-1, -1)],
                          ((64, 32), (32, 64), (48, 48)))
  np.testing.assert_array_equal(chosen, [0, 1, 2, 2])


def test_record_sizes_read_headers_with_exif(data):
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top
  data_dir, name = data
  source = sources.data_source(name, 'train', data_dir)
  sizes = buckets.record_sizes(source, name, data_dir)
  by_key = {source[i]['file_name'].split(':')[1]: tuple(sizes[i]) for i in range(len(source))}
  assert by_key[f'{ROTATED:09d}'] == SIZES[ROTATED % len(SIZES)]
  assert by_key[f'{CORRUPT[0]:09d}'] == (-1, -1)
  assert by_key[f'{1:09d}'] == SIZES[1]


def test_record_sizes_of_a_tfds_dataset_are_read_once_and_cached(tmp_path, monkeypatch):
  from ldm_jax.data import builders  # pylint: disable=g-import-not-at-top
  from ldm_jax.data import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  name = builders.build_shapes(str(tmp_path), image_size=16, num_train=12, num_holdout=4)
  source = sources.data_source(name, 'train', str(tmp_path))
  sizes = buckets.record_sizes(source, name, str(tmp_path))
  np.testing.assert_array_equal(sizes, np.full((12, 2), 16))
  assert len(os.listdir(tmp_path / 'cache' / 'ldm_jax' / 'index')) == 1
  monkeypatch.setattr(buckets, '_size', None)  # a second call reads the cache, not the images
  np.testing.assert_array_equal(buckets.record_sizes(source, name, str(tmp_path)), sizes)


def _batches(loader, n):
  return [next(loader) for _ in range(n)]


def test_every_batch_is_one_bucket_with_size_conditioning(data, tok):
  loader = pipeline.Loader(_config(data, crop='random', flip=True), tok, keep_captions=True)
  shapes = set()
  for batch in _batches(loader, 24):  # a few epochs: 13 batches of 4 per epoch here
    h, w = batch['image'].shape[1:3]
    shapes.add((w, h))
    assert (w, h) in loader.buckets
    for k, caption in enumerate(batch['caption']):
      i = int(caption.split()[-1])
      ow, oh = SIZES[i % len(SIZES)]
      np.testing.assert_array_equal(batch['original_size'][k], (oh, ow))
      top, left = batch['crop_top_left'][k]
      scale = max(w / ow, h / oh)  # the resized image covers the bucket
      assert 0 <= top <= round(oh * scale) - h and 0 <= left <= round(ow * scale) - w
  assert len(shapes) >= 4  # several buckets in use
  assert loader.stats['skipped_bad_image'] >= len(CORRUPT)  # replaced, counted


def test_bucketed_loader_resumes_exactly_with_workers(data, tok):
  config = _config(data, worker_count=1)
  loader = pipeline.Loader(config, tok)
  first = _batches(loader, 5)
  state = loader.get_state()
  rest = _batches(loader, 10)
  restored = pipeline.Loader(config, tok)
  restored.set_state(json.loads(json.dumps(state)))
  for a, b in zip(rest, _batches(restored, 10)):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert restored.stats == loader.stats
  assert first


def test_two_hosts_take_the_same_bucket_and_disjoint_records(data, tok):
  loader = lambda i, n: pipeline.Loader(_config(data, batch_size=4), tok, process_index=i,
                                        process_count=n, keep_captions=True)
  one, hosts = loader(0, 1), [loader(0, 2), loader(1, 2)]
  after = []  # host 1's batches after its position at step 5
  for step in range(16):  # into the second epoch (13 batches per epoch)
    whole, a, b = next(one), next(hosts[0]), next(hosts[1])
    assert a['image'].shape == b['image'].shape == (2,) + whole['image'].shape[1:]
    # The global batch is the two hosts' halves, in order: the plan depends on (seed, epoch) only.
    np.testing.assert_array_equal(np.concatenate([a['caption'], b['caption']]), whole['caption'])
    if step == 5:
      position = json.loads(json.dumps(hosts[1].get_state()))
    elif step > 5:
      after.append(b)
  restored = loader(1, 2)  # a host restarted from its own checkpointed position
  restored.set_state(position)
  for want in after:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_an_epoch_is_planned_from_the_seed_and_reshuffled(data, tok):
  plan = lambda seed: buckets.Plan(np.arange(40) % 3, 3, 4, 0, 1, seed, True)
  a, b = plan(0), plan(0)
  first = [int(a[k]['candidates'][0]) for k in range(a.per_epoch)]
  assert first == [int(b[k]['candidates'][0]) for k in range(b.per_epoch)]
  second = [int(a[a.per_epoch + k]['candidates'][0]) for k in range(a.per_epoch)]
  assert first != second and len(set(first)) == len(first) == 36  # 13, 13, 14 -> 3 + 3 + 3 batches
  with pytest.raises(ValueError, match='no aspect-ratio bucket holds a whole global batch'):
    buckets.Plan(np.arange(6) % 3, 3, 4, 0, 1, 0, True)


def test_the_loop_compiles_one_step_per_bucket_and_resumes(data, tmp_path, caplog, monkeypatch):
  """The vae stage trains from the shards with two buckets: two compiled steps; a second run
  resumes at the checkpoint's data position."""
  import sys  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import export  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import loop  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(export, 'export', lambda *args: None)  # test_train covers the export
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  data_dir, name = data
  c = shapes_config.get_config('vae,runlocal')
  c.data.update(name=name, data_dir=data_dir, buckets='32x32,48x24', batch_size=8)
  c.update(sample_every=0, num_steps=4, ckpt_every=4)
  caplog.set_level('INFO')
  r = loop.setup(c, str(tmp_path))
  loop.run(r)
  shapes = {dict(k)['image'] for k in r.compiled}
  widths = {s[2] for s in shapes}
  assert len(shapes) == 2 and all(s[1:] in ((32, 32, 3), (24, 48, 3)) for s in shapes)
  c.num_steps = 6
  again = loop.setup(c, str(tmp_path))
  assert again.loader.get_state()['grain'] == {'next_index': 4 * 8}  # the checkpoint's position
  again.compiled = r.compiled  # the same step for the same shapes: not compiled again
  loop.run(again)
  assert int(again.state['step']) == 6
  assert len(widths) == len(shapes)
