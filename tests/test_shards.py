"""Shards read in place: webdataset tars and parquet files against a tfds folder build of the same
images; exact resume, host partitions, bad samples, record sizes, the index cache, the errors for
bad names, and train.py's loop trained and resumed from shards.

One small dataset, made here: 40 images of mixed aspect ratios (JPEG and PNG, 24-64 px), two of
them corrupt, one an EXIF-rotated JPEG, one sample without a caption, plus one sample without an
image (webdataset: only .txt and .json members; parquet: a null image, as img2dataset writes a
failed download).
"""

import io
import json
import logging
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm_jax import checkpoint
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import shards
from ldm_jax.data import sources
from ldm_jax.data import webdataset
from ldm_jax.tokenizer import build as tokenizer_build
from ldm_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configs
# test_train's shapes build (a module-scoped fixture: built once here too) and tiny configs.
import test_train  # pylint: disable=wrong-import-position
from test_train import data_dir  # pylint: disable=unused-import,wrong-import-position

N = 40
CORRUPT = (7, 23)  # bytes that do not decode
NO_CAPTION = 12
ROTATED = 9  # a JPEG stored turned a quarter, with EXIF orientation 6 to turn it back
SIZES = ((32, 48), (64, 32), (48, 48), (40, 24), (24, 56))  # (width, height)
WDS, PARQUET = 'webdataset:shards/{00000..00002}.tar', 'parquet:parquet/*.parquet'


def _image(i, rng):
  w, h = SIZES[i % len(SIZES)]
  yy, xx = np.mgrid[0:h, 0:w]
  pixels = np.stack([(xx * (3 + i % 4) + yy * (i % 5) + 40 * c + 9 * i) % 256
                     for c in range(3)], -1)
  buf = io.BytesIO()
  fmt = 'PNG' if i % 4 == 0 else 'JPEG'
  img = Image.fromarray((pixels + rng.integers(0, 8, pixels.shape)).clip(0, 255).astype(np.uint8))
  if i == ROTATED:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the decode turns it 270 degrees, back to w x h
    img.transpose(Image.Transpose.ROTATE_90).save(buf, fmt, exif=exif)
  else:
    img.save(buf, fmt)
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


def _size(i):
  """The (width, height) record `i` decodes to; (-1, -1) for a corrupt one."""
  return (-1, -1) if i in CORRUPT else SIZES[i % len(SIZES)]


def _no_headers(*args):
  raise AssertionError(f'an image header was read: {args!r:.60}')


@pytest.mark.parametrize('name', [WDS, PARQUET])
def test_record_sizes_are_indexed_from_the_headers(data, name, monkeypatch):
  """Mixed aspect ratios, the EXIF-rotated JPEG as decoded, (-1, -1) for the corrupt ones; read
  once, then from the cached index."""
  data_dir, _ = data
  source = sources.data_source(name, 'train', data_dir)
  sizes = source.sizes()
  assert sizes.dtype == np.int32 and sizes.shape == (N, 2)
  records = [int(source[i]['file_name'].split(':')[1]) for i in range(N)]
  assert [tuple(map(int, s)) for s in sizes] == [_size(i) for i in records]
  assert tuple(sizes[records.index(ROTATED)]) == SIZES[ROTATED % len(SIZES)]
  assert source.stats['unknown_size'] == len(CORRUPT)
  monkeypatch.setattr(shards, 'image_size', _no_headers)
  monkeypatch.setattr(shards, 'image_size_at', _no_headers)
  np.testing.assert_array_equal(sources.data_source(name, 'train', data_dir).sizes(), sizes)


def test_parquet_sizes_come_from_img2dataset_columns(data, tmp_path, monkeypatch):
  """img2dataset's width and height are taken without reading the images; a null one (written
  with --disable_all_reencoding) from the header; a file with a 'width' but not img2dataset's
  other size columns from the headers."""
  data_dir, _ = data
  table = pq.read_table(os.path.join(data_dir, 'parquet', '00000.parquet'))
  keys = [int(k) if k.isdigit() else None for k in table.column('key').to_pylist()]
  columns = {c: pa.array([None if i is None or (i == 3 and c in ('width', 'height'))
                          else 10 * SIZES[i % len(SIZES)][c.endswith('height')] for i in keys],
                         pa.int32())
             for c in ('width', 'height', 'original_width', 'original_height')}
  for c, values in columns.items():
    table = table.append_column(c, values)
  pq.write_table(table, str(tmp_path / 'sized.parquet'), row_group_size=16)
  headers = []
  real = shards.image_size
  monkeypatch.setattr(shards, 'image_size', lambda data: headers.append(data) or real(data))
  source = sources.data_source(f'parquet:{tmp_path}/sized.parquet', 'train', data_dir)
  records = [int(source[i]['file_name'].split(':')[1]) for i in range(N)]
  want = [_size(i) if i == 3 else tuple(10 * v for v in SIZES[i % len(SIZES)]) for i in records]
  assert [tuple(map(int, s)) for s in source.sizes()] == want
  assert len(headers) == 1  # the row with a null width and height
  pq.write_table(table.drop_columns(['original_width', 'original_height']),
                 str(tmp_path / 'other.parquet'))
  other = sources.data_source(f'parquet:{tmp_path}/other.parquet', 'train', data_dir)
  assert [tuple(map(int, s)) for s in other.sizes()] == [_size(i) for i in records]


def test_image_size_reads_on_when_the_header_is_longer_than_its_first_bytes():
  buf, exif = io.BytesIO(), Image.Exif()
  exif[0x0112] = 8  # a quarter turn the other way: width and height swap
  Image.new('RGB', (40, 24)).save(buf, 'JPEG', exif=exif,
                                  icc_profile=bytes(3 * shards.HEADER_BYTES))  # past the first
  data, reads = buf.getvalue(), []
  read = lambda n: reads.append(n) or data[:n]
  assert shards.image_size_at(read, len(data)) == (24, 40)
  assert reads == [shards.HEADER_BYTES, len(data)]
  assert shards.image_size_at(read, 40) == shards.UNKNOWN_SIZE == shards.image_size(b'GIF89a')


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


@pytest.fixture(scope='module')
def shapes_shards(data_dir):  # pylint: disable=redefined-outer-name
  """test_train's shapes build with its train records also as webdataset tars and a parquet
  file (lossless PNGs): (data_dir, {kind: data.name})."""
  source = sources.data_source(test_train.small_config(data_dir).data.name, 'train', data_dir)
  samples = []
  for i in range(len(source)):
    buf = io.BytesIO()
    Image.fromarray(source[i]['image']).save(buf, 'PNG')
    samples.append((f'{i:09d}', 'png', buf.getvalue(), source[i]['caption'].decode()))
  _write_tars(os.path.join(data_dir, 'shapes_tars'), samples)
  _write_parquet(os.path.join(data_dir, 'shapes_parquet'), samples)
  return data_dir, {'webdataset': 'webdataset:shapes_tars/*.tar',
                    'parquet': 'parquet:shapes_parquet/*.parquet'}


# The vae stage's step compiled once for the module: every run below has the same config but
# its data name, so the same batch shapes and shardings (Run.compiled is keyed by the shapes).
_COMPILED_STEPS = {}


def _setup(config, workdir):
  run = loop.setup(config, workdir)
  run.compiled = _COMPILED_STEPS
  return run


def _position_after(run, steps):
  """An uninterrupted loader's position after `steps` batches (the run's data config)."""
  tok = tokenizer_lib.load_tokenizer(os.path.join(run.workdir, 'tokenizer'))
  loader = pipeline.Loader(run.loader.config, tok)
  for _ in range(steps):
    next(loader)
  return loader.get_state()


@pytest.mark.parametrize('kind', ['webdataset', 'parquet'])
def test_the_training_loop_trains_from_shards_and_resumes(shapes_shards, kind, tmp_path,
                                                         monkeypatch):
  """The vae stage (it trains from images, so the shard reader feeds every step) runs 2 steps,
  then a second run to step 3 resumes at the checkpoint's data position: its position and data
  stats at step 3 are an uninterrupted loader's."""
  monkeypatch.setattr(loop.export, 'export', lambda *args: None)  # test_train's, 1 s a run
  data_dir, names = shapes_shards
  config = test_train.small_config(data_dir, 'vae', num_steps=2, ckpt_every=2)
  config.data.name = names[kind]
  batch = config.data.batch_size
  first = _setup(config, str(tmp_path))
  assert loop.run(first) == 2
  step, position = checkpoint.read_checkpoint(str(tmp_path), 'data')
  assert step == 2 and position == _position_after(first, 2)
  assert position['stats']['ok'] == 2 * batch
  config.num_steps = 3
  resumed = _setup(config, str(tmp_path))
  assert resumed.loader.get_state() == position  # the data position restored
  assert loop.run(resumed) == 3
  step, position = checkpoint.read_checkpoint(str(tmp_path), 'data')
  assert step == 3 and position == _position_after(resumed, 3)
  metrics = [m for m in map(json.loads, open(tmp_path / 'metrics.jsonl')) if 'loss' in m]
  assert [m['step'] for m in metrics] == [1, 2, 3]
  assert metrics[-1]['data']['ok'] == 3 * batch  # counted across the resume
