"""Shards read in place: webdataset tars and parquet files against a tfds folder build of the same
images; exact resume, host partitions, bad samples, the index cache and the errors for bad names.

One small dataset, made here: 40 images of mixed aspect ratios (JPEG and PNG, 24-64 px), two of
them corrupt, one sample without a caption, plus one sample without an image (webdataset: only
.txt and .json members; parquet: a null image, as img2dataset writes a failed download).
"""

import io
import json
import logging
import os
import pickle
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import shards
from ldm_jax.data import sources
from ldm_jax.data import webdataset
from ldm_jax.tokenizer import build as tokenizer_build

N = 40
CORRUPT = (7, 23)  # bytes that do not decode
NO_CAPTION = 12
SIZES = ((32, 48), (64, 32), (48, 48), (40, 24), (24, 56))  # (width, height)
WDS, PARQUET = 'webdataset:shards/{00000..00002}.tar', 'parquet:parquet/*.parquet'


def _image(i, rng):
  w, h = SIZES[i % len(SIZES)]
  yy, xx = np.mgrid[0:h, 0:w]
  pixels = np.stack([(xx * (3 + i % 4) + yy * (i % 5) + 40 * c + 9 * i) % 256
                     for c in range(3)], -1)
  buf = io.BytesIO()
  fmt = 'PNG' if i % 4 == 0 else 'JPEG'
  Image.fromarray((pixels + rng.integers(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8)).save(
      buf, fmt)
  data = buf.getvalue()
  if i in CORRUPT:
    data = data[:40] if i == CORRUPT[0] else b'not an image at all'
  return f'{i:09d}', fmt.lower().replace('jpeg', 'jpg'), data


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _write_tars(folder, samples):
  """Three shards as img2dataset writes them (.jpg/.png, .txt, .json per key); the second holds
  the sample without an image."""
  os.makedirs(folder)
  for s, part in enumerate((samples[:14], samples[14:28], samples[28:])):
    with tarfile.open(os.path.join(folder, f'{s:05d}.tar'), 'w') as tar:
      for key, ext, data, caption in part:
        if data is not None:
          _add(tar, f'{key}.{ext}', data)
        _add(tar, f'{key}.json', json.dumps({'key': key}).encode())
        if caption is not None:
          _add(tar, f'{key}.txt', caption.encode())


def _write_parquet(folder, samples):
  """img2dataset's parquet layout (key, jpg, caption, txt, status), 16-row row groups."""
  os.makedirs(folder)
  table = pa.table({
      'key': [s[0] for s in samples],
      'caption': [s[3] for s in samples],
      'status': ['success' if s[2] is not None else 'failed_to_download' for s in samples],
      'jpg': pa.array([s[2] for s in samples], pa.binary()),
      'txt': [s[3] or '' for s in samples]})
  pq.write_table(table, os.path.join(folder, '00000.parquet'), row_group_size=16)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """(data_dir, tfds folder dataset name): the same samples as tars, parquet and a folder."""
  root = tmp_path_factory.mktemp('shards')
  rng = np.random.default_rng(0)
  samples = []
  for i in range(N):
    key, ext, data = _image(i, rng)
    samples.append((key, ext, data, None if i == NO_CAPTION else f'a photo {i}'))
  samples.insert(20, ('no_image', None, None, 'only a caption'))
  _write_tars(str(root / 'shards'), samples)
  _write_parquet(str(root / 'parquet'), samples)
  (root / 'images').mkdir()
  for key, ext, data, caption in samples:
    if data is not None:
      (root / 'images' / f'{key}.{ext}').write_bytes(data)
      if caption is not None:
        (root / 'images' / f'{key}.txt').write_text(caption)
  name, _ = builders.build_folder(str(root / 'images'), str(root))
  return str(root), name


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  folder = tokenizer_build.build_caption_tokenizer(['a photo only caption'],
                                                   tmp_path_factory.mktemp('tok'))
  return tokenizer_lib.load_tokenizer(folder)


def _config(name, data_dir, **kw):
  return pipeline.LoaderConfig(name=name, data_dir=data_dir, **({
      'resolution': 16, 'batch_size': 4, 'max_length': 16} | kw))


def _by_caption(loader):
  """{caption: image} over one epoch of a loader made with keep_captions."""
  out = {}
  for batch in loader:
    out.update(zip(batch['caption'], batch['image']))
  return out


def test_webdataset_parquet_and_tfds_give_the_same_records(data, tok):
  data_dir, folder_name = data
  records = {n: list(sources.data_source(n, 'train', data_dir)) for n in (WDS, PARQUET)}
  assert [len(r) for r in records.values()] == [N, N]  # the sample without an image left out
  wds, par = records.values()
  assert wds[0]['file_name'] == '00000.tar:000000000'
  assert par[0]['file_name'] == '00000.parquet:000000000'
  assert [(r['image'], r['caption']) for r in wds] == [(r['image'], r['caption']) for r in par]
  assert wds[NO_CAPTION]['caption'] == b''  # the empty caption
  for source in map(sources.data_source, (WDS, PARQUET), ('train',) * 2, (data_dir,) * 2):
    source[3]  # files opened, a row group cached: what a grain worker process gets is unopened
    assert pickle.loads(pickle.dumps(source))[N - 1] == source[N - 1]
  config = dict(num_epochs=1, shuffle=False, crop='random', flip=True, caption_dropout=0.3)
  loaders = [pipeline.Loader(_config(n, data_dir, **config), tok, keep_captions=True)
             for n in (WDS, PARQUET)]
  batches = [list(loader) for loader in loaders]
  assert len(batches[0]) == len(batches[1]) == 9
  for a, b in zip(*batches):  # the same records in the same order: the same random crops too
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert loaders[0].stats == loaders[1].stats
  assert (loaders[0].stats['ok'], loaders[0].stats['skipped_bad_image']) == (N - 2, 2)
  named = pipeline.Loader(_config(PARQUET, data_dir, image_key='jpg', caption_key='txt', **config),
                          tok, keep_captions=True)  # the columns named by the data config
  for a, b in zip(batches[1], named):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  center = dict(num_epochs=1, shuffle=False, batch_size=1)
  ours = _by_caption(pipeline.Loader(_config(WDS, data_dir, **center), tok, keep_captions=True))
  theirs = _by_caption(pipeline.Loader(_config(folder_name, data_dir, **center), tok,
                                       keep_captions=True))
  assert len(theirs) == N - 3  # the folder build leaves out the corrupt and caption-less images
  assert set(ours) == set(theirs) | {''}
  for caption, image in theirs.items():
    np.testing.assert_array_equal(ours[caption], image)


def test_corrupt_members_are_counted_and_named_not_fatal(data, tok, caplog):
  data_dir, _ = data
  loader = pipeline.Loader(_config(WDS, data_dir, num_epochs=1, skip_empty_captions=True), tok)
  with caplog.at_level(logging.WARNING):
    assert sum(len(b['image']) for b in loader) == 36  # 40 - 2 corrupt - 1 caption-less, // 4
  stats = loader.stats
  assert (stats['ok'], stats['skipped_bad_image'], stats['skipped_empty_caption']) == (37, 2, 1)
  assert 'skipped an image that does not decode: 00000.tar:000000007' in caplog.text
  assert '00001.tar:000000023' in caplog.text


def _assert_same(got, want):
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize('workers,hosts', [(0, 1), (1, 1), (0, 2)])
def test_a_webdataset_loader_resumes_exactly(data, tok, workers, hosts):
  """Stopped after 4 batches and restored, a loader gives the uninterrupted one's batches (with 2
  hosts: host 1's). With workers=1 the stopped and the restored loaders decode in a grain worker
  process (a start costs about 3 s on 2 cores, so only those two start one) and match the
  main-process loader."""
  data_dir, _ = data
  config = _config(WDS, data_dir, crop='random', flip=True, caption_dropout=0.2, seed=3)
  make = lambda c: pipeline.Loader(c, tok, process_index=hosts - 1, process_count=hosts)
  uninterrupted = make(config)
  expected = [next(uninterrupted) for _ in range(14)]  # past an epoch (9.5 batches)
  config = pipeline.dataclasses.replace(config, worker_count=workers)
  interrupted = make(config)
  for want in expected[:4]:
    _assert_same(next(interrupted), want)
  state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
  del interrupted
  resumed = make(config)
  resumed.set_state(state)
  for want in expected[4:]:
    _assert_same(next(resumed), want)
  assert resumed.stats == uninterrupted.stats


@pytest.mark.parametrize('name', [WDS, PARQUET])
def test_two_hosts_partition_the_records(data, tok, name):
  data_dir, _ = data
  seen = []
  for index in range(2):
    loader = pipeline.Loader(_config(name, data_dir, batch_size=2, num_epochs=1), tok,
                             process_index=index, process_count=2, keep_captions=True)
    seen.append([c for batch in loader for c in batch['caption']])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted([''] + [f'a photo {i}' for i in range(N)
                                                     if i not in CORRUPT + (NO_CAPTION,)])


def test_the_index_is_cached_and_rebuilt_when_a_shard_changes(data, tmp_path, monkeypatch):
  data_dir, _ = data
  folder = tmp_path / 'copy'
  shutil.copytree(os.path.join(data_dir, 'shards'), folder, ignore=shutil.ignore_patterns('*.npz'))
  opened = []
  real_open = tarfile.open
  monkeypatch.setattr(tarfile, 'open', lambda path, *a, **k: opened.append(path) or real_open(
      path, *a, **k))
  name = f'webdataset:{folder}/*.tar'
  first = sources.data_source(name, 'train', data_dir)
  assert len(opened) == 3 and len(list(folder.glob('*' + shards.INDEX_SUFFIX))) == 3
  again = sources.data_source(name, 'train', data_dir)
  assert len(opened) == 3 and again[5] == first[5]  # read from the cache: no tar opened
  with tarfile.open(folder / '00002.tar', 'a') as tar:  # a shard grows: indexed again
    _add(tar, 'extra.png', _image(0, np.random.default_rng(1))[2])
  grown = sources.data_source(name, 'train', data_dir)
  assert len(opened) == 5 and len(grown) == N + 1 and grown[N]['file_name'] == '00002.tar:extra'
  # A read-only folder: the index goes to the user's cache directory instead.
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  monkeypatch.setattr(shards, '_writable', lambda d: not d.startswith(str(folder)) and (
      os.makedirs(d, exist_ok=True) or True))
  for index in folder.glob('*' + shards.INDEX_SUFFIX):
    index.unlink()
  sources.data_source(name, 'train', data_dir)
  assert len(list((tmp_path / 'cache' / 'ldm_jax' / 'index').glob('*00001.tar*'))) == 1
  assert not list(folder.glob('*' + shards.INDEX_SUFFIX))


def test_patterns():
  assert shards.expand_braces('/d/{00008..00011}.tar') == [f'/d/{i:05d}.tar'
                                                           for i in (8, 9, 10, 11)]
  assert shards.expand_braces('{a,b}/{1..2}.tar') == ['a/1.tar', 'a/2.tar', 'b/1.tar', 'b/2.tar']
  assert shards.expand_braces('{3..1}') == ['3', '2', '1']
  assert shards.split_name('webdataset:/d/*.tar') == ('webdataset', '/d/*.tar')
  assert shards.split_name('image_folder/x') is None
  assert webdataset.split_member('part/0001.seg.png') == ('part/0001', 'seg.png')
  assert webdataset.split_member('README') == (None, None)


def test_bad_shard_names_are_clear_errors(data, tmp_path):
  data_dir, _ = data
  message = sources.check_name('webdataset:laion/*.tar', data_dir)
  assert "'webdataset:laion/*.tar': no file matches the pattern" in message
  assert f'under data.data_dir {data_dir!r}' in message
  with pytest.raises(FileNotFoundError, match='no file matches the pattern'):
    sources.data_source('parquet:/nowhere/*.parquet', 'train', data_dir)
  message = sources.check_name('webdataset:shards/{00000..00004}.tar', data_dir)
  assert '2 of the shards it lists do not exist' in message and '00004.tar' in message
  assert 'use a glob (e.g. ' in message
  with pytest.raises(ValueError, match=r"no split 'holdout': shards have one split, 'train'"):
    sources.data_source(WDS, 'holdout', data_dir)
  # A truncated shard: named at the check and when indexed.
  whole = open(os.path.join(data_dir, 'shards', '00001.tar'), 'rb').read()
  (tmp_path / 'cut.tar').write_bytes(whole[:len(whole) // 2])
  message = sources.check_name(f'webdataset:{tmp_path}/cut.tar', data_dir)
  assert f'webdataset shard {tmp_path}/cut.tar is truncated or damaged' in message
  assert 'fetch it again, or leave it out' in message
  with pytest.raises(ValueError, match='cut.tar is truncated or damaged: '):
    sources.data_source(f'webdataset:{tmp_path}/cut.tar', 'train', data_dir)
  # A parquet file without the named columns: the columns it has.
  pq.write_table(pa.table({'url': ['u'], 'picture': [b'x'], 'text': ['t']}),
                 str(tmp_path / 'other.parquet'))
  message = sources.check_name(f'parquet:{tmp_path}/other.parquet', data_dir)
  assert "has no column 'image' (nor 'jpg') for data.image_key; its columns are ['url', " \
         "'picture', 'text']: set --config.data.image_key" in message
  assert sources.check_name(f'parquet:{tmp_path}/other.parquet', data_dir, image_key='picture',
                            caption_key='text') is None
  with pytest.raises(ValueError, match="has no column 'caption' \\(nor 'txt'\\)"):
    sources.data_source(f'parquet:{tmp_path}/other.parquet', 'train', data_dir,
                        image_key='picture')


def test_preflight_checks_shard_names(data, tmp_path):
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import preflight  # pylint: disable=g-import-not-at-top
  data_dir, _ = data
  config = shapes_config.get_config('ldm,runlocal')
  config.allow_random_vae = True
  config.data.data_dir, config.data.name = data_dir, WDS
  preflight.check(config, str(tmp_path / 'run'), num_devices=8)
  config.data.name, config.data.image_key = PARQUET, 'photo'
  with pytest.raises(preflight.ConfigError, match="no column 'photo' for data.image_key"):
    preflight.check(config, str(tmp_path / 'run'), num_devices=8)
  assert not os.path.exists(tmp_path / 'run')
