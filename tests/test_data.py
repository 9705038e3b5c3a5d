"""Data: the shapes and folder builders, the grain loader (resume, host sharding, bad records)."""

import glob
import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.tokenizer import build as tokenizer_build
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import prefetch
from ldm_jax.data import shapes
from ldm_jax.data import sources
from ldm_jax.evaluation import shapes as shapes_eval


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  """A CLIP-format tokenizer over the shapes vocabulary (other words split into characters)."""
  words = list(shapes.COLOURS) + list(shapes.SHAPES) + ['a', 'on', 'background', 'image', 'word']
  folder = tokenizer_build.build_caption_tokenizer([' '.join(words)], tmp_path_factory.mktemp('tok'))
  return tokenizer_lib.load_tokenizer(folder)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, builders.build_shapes(data_dir, image_size=32, num_train=240, num_holdout=40)


def _config(name, data_dir, **kw):
  return pipeline.LoaderConfig(name=name, data_dir=data_dir, **({'batch_size': 4} | kw))


def test_shapes_build_is_deterministic(shapes_dir, tmp_path):
  data_dir, name = shapes_dir
  builders.build_shapes(str(tmp_path), image_size=32, num_train=240, num_holdout=40)
  version = str(builders.Shapes.VERSION)
  files = lambda d: sorted(glob.glob(os.path.join(d, name, version, '*.array_record*')))
  ours, again = files(data_dir), files(str(tmp_path))
  assert len(ours) >= 2 and [os.path.basename(f) for f in ours] == [os.path.basename(f) for f in again]
  for a, b in zip(ours, again):
    assert open(a, 'rb').read() == open(b, 'rb').read()


@pytest.mark.parametrize('split', ['train', 'holdout'])
def test_shapes_captions_match_pixels(shapes_dir, split):
  data_dir, name = shapes_dir
  src = sources.data_source(name, split, data_dir)
  checked = 0
  for record in src:
    colour, shape = record['colour'].decode(), record['shape'].decode()
    caption = record['caption'].decode()
    assert colour in caption and shape in caption
    assert shapes.is_holdout(colour, shape) == (split == 'holdout')
    if record['num_shapes'] == 1:
      assert shapes_eval.read_image(record['image']) == (colour, shape), caption
      checked += 1
  assert checked >= 30


def test_loader_resumes_exactly(shapes_dir, tok):
  data_dir, name = shapes_dir
  config = _config(name, data_dir, crop='random', flip=True, caption_dropout=0.2, seed=3)
  uninterrupted = pipeline.Loader(config, tok)
  expected = [next(uninterrupted) for _ in range(70)]  # past the end of an epoch (60 batches)
  interrupted = pipeline.Loader(config, tok)
  for _ in range(25):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # as a checkpoint stores it
  resumed = _assert_resumes(config, tok, state, expected[25:])
  assert resumed.stats == uninterrupted.stats


def _assert_resumes(config, tok, state, expected):
  """A Loader set to `state` gives the `expected` batches next; returns it."""
  resumed = pipeline.Loader(config, tok)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  return resumed


def test_prefetched_batches_resume_from_the_consumed_position(shapes_dir, tok):
  """The input thread runs ahead, but each batch carries the position after itself: resuming
  from the 25th batch's position (what a checkpoint of a state that consumed it saves) reads on
  exactly as the uninterrupted loader does, not from where the thread had got to."""
  data_dir, name = shapes_dir
  config = _config(name, data_dir, crop='random', flip=True, caption_dropout=0.2, seed=3)
  uninterrupted = pipeline.Loader(config, tok)
  expected = [next(uninterrupted) for _ in range(40)]
  placed = []
  with prefetch.Prefetcher(pipeline.Loader(config, tok), lambda b: placed.append(1) or 'on device',
                           depth=2) as feed:
    got = [next(feed) for _ in range(25)]
    deadline = time.time() + 30
    while feed.made < 27 and time.time() < deadline:  # two batches made ahead of the 25th
      time.sleep(0.01)
    assert feed.made >= 27 and len(placed) == feed.made
    loader = feed._loader  # pylint: disable=protected-access
  # Closed, the loader is back after the 25th batch: it gives the 26th next, not the 28th.
  np.testing.assert_array_equal(next(loader)['input_ids'], expected[25]['input_ids'])
  for want, batch in zip(expected, got):
    assert batch.placed == 'on device'
    np.testing.assert_array_equal(batch.host['input_ids'], want['input_ids'])
  position = json.loads(json.dumps(got[-1].position))  # as a checkpoint stores it
  assert position['stats']['ok'] == 25 * 4  # the consumed batches' records, not the made ones
  _assert_resumes(config, tok, position, expected[25:])


def test_prefetch_passes_the_end_and_errors_through(shapes_dir, tok):
  data_dir, name = shapes_dir
  loader = pipeline.Loader(_config(name, data_dir, batch_size=120, num_epochs=1), tok)
  with prefetch.Prefetcher(loader, lambda b: b, depth=2) as feed:
    assert len([next(feed), next(feed)]) == 2  # 240 records
    for _ in range(2):  # the end, every time it is asked
      with pytest.raises(StopIteration):
        next(feed)

  def place(batch):
    raise ValueError('no room on the device')

  with prefetch.Prefetcher(pipeline.Loader(_config(name, data_dir), tok), place) as feed:
    with pytest.raises(ValueError, match='no room on the device'):
      next(feed)


def test_epochs_reshuffle_and_flip(shapes_dir, tok):
  data_dir, name = shapes_dir
  loader = pipeline.Loader(_config(name, data_dir, batch_size=240, num_epochs=2), tok)
  first, second = next(loader), next(loader)
  assert not np.array_equal(first['input_ids'], second['input_ids'])  # reshuffled
  key = lambda b: sorted(r.tobytes() for r in b['input_ids'])
  assert key(first) == key(second)  # same records
  with pytest.raises(StopIteration):
    next(loader)


def test_caption_dropout_rate(shapes_dir, tok):
  data_dir, name = shapes_dir
  loader = pipeline.Loader(_config(name, data_dir, batch_size=240, caption_dropout=0.3),
                           tok)
  batches = [next(loader) for _ in range(5)]
  drop = np.concatenate([b['drop'] for b in batches])
  ids = np.concatenate([b['input_ids'] for b in batches])
  assert abs(drop.mean() - 0.3) < 0.04  # 1200 draws: 4 standard deviations is 0.053
  empty = tokenizer_lib.tokenize(tok, '')[0][0]
  assert (ids[drop] == empty).all() and not (ids[~drop] == empty).all(1).any()


def _noise_png(rng, size=(24, 20)):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(buf, 'PNG')
  return buf.getvalue()


@pytest.mark.parametrize('hosts', [1, 2, 4])
def test_host_sharding_partitions_records(tmp_path, hosts, tok):
  rng = np.random.default_rng(0)
  src = tmp_path / 'imgs'
  src.mkdir()
  for i in range(22):
    (src / f'{i}.png').write_bytes(_noise_png(rng))
    (src / f'{i}.txt').write_text(f'image {i}')
  name, _ = builders.build_folder(str(src), str(tmp_path / 'tfds'))
  seen = []
  for index in range(hosts):
    config = _config(name, str(tmp_path / 'tfds'), batch_size=hosts, num_epochs=1, resolution=16)
    loader = pipeline.Loader(config, tok, process_index=index, process_count=hosts)
    seen += [row.tobytes() for batch in loader for row in batch['input_ids']]
  assert len(seen) == len(set(seen)) == 22


def _save(img, path, **kw):
  img.save(path, **kw)


def test_folder_builder_reads_conventions_and_modes(tmp_path):
  red = Image.new('RGB', (40, 30), (255, 0, 0))
  cases = tmp_path / 'cases'
  for convention in ('jsonl', 'csv', 'sidecar'):
    d = cases / convention
    d.mkdir(parents=True)
    _save(red.convert('L'), d / 'gray.png')
    rgba = Image.new('RGBA', (40, 30), (0, 0, 255, 0))  # fully transparent: white after compositing
    _save(rgba, d / 'rgba.png')
    _save(red.convert('P'), d / 'palette.gif')
    _save(red.convert('CMYK'), d / 'cmyk.jpg')
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _save(red, d / 'rotated.jpg', exif=exif.tobytes())
    names = ['gray.png', 'rgba.png', 'palette.gif', 'cmyk.jpg', 'rotated.jpg']
    if convention == 'jsonl':
      (d / 'metadata.jsonl').write_text(
          '\n'.join(json.dumps({'file_name': n, 'text': f'a {n}'}) for n in names))
    elif convention == 'csv':
      (d / 'metadata.csv').write_text('file_name,text\n' + ''.join(f'{n},"a {n}"\n' for n in names))
    else:
      for n in names:
        (d / (os.path.splitext(n)[0] + '.txt')).write_text(f'a {n}')
    name, summary = builders.build_folder(str(d), str(tmp_path / 'tfds'))
    assert summary.startswith('5 images with captions')
    records = {r['file_name'].decode(): r for r in sources.data_source(name, 'train', str(tmp_path / 'tfds'))}
    assert set(records) == set(names)
    assert records['gray.png']['caption'] == b'a gray.png'
    decoded = {n: np.asarray(pipeline.decode_image(records[n]['image'])) for n in names}
    assert all(img.ndim == 3 and img.shape[2] == 3 for img in decoded.values())
    assert decoded['rotated.jpg'].shape[:2] == (40, 30)  # EXIF orientation applied
    assert (decoded['rgba.png'] == 255).all()
    assert decoded['palette.gif'][0, 0].tolist() == [255, 0, 0]
    assert decoded['cmyk.jpg'][0, 0, 0] > 200 and decoded['cmyk.jpg'][0, 0, 1] < 60


def test_bad_records_are_skipped_and_counted(tmp_path, tok):
  rng = np.random.default_rng(1)
  src = tmp_path / 'messy'
  src.mkdir()
  for i in range(6):
    (src / f'good{i}.png').write_bytes(_noise_png(rng, (40, 40)))
    (src / f'good{i}.txt').write_text(f'good {i}')
  (src / 'truncated.png').write_bytes(_noise_png(rng, (40, 40))[:100])
  (src / 'truncated.txt').write_text('cut short')
  (src / 'notimage.png').write_bytes(b'this is not an image')
  (src / 'notimage.txt').write_text('text')
  (src / 'tiny.png').write_bytes(_noise_png(rng, (4, 4)))
  (src / 'tiny.txt').write_text('too small')
  (src / 'latin1.png').write_bytes(_noise_png(rng, (40, 40)))
  (src / 'latin1.txt').write_bytes('caf\xe9'.encode('latin-1'))
  (src / 'empty.png').write_bytes(_noise_png(rng, (40, 40)))
  (src / 'empty.txt').write_text('  ')
  (src / 'nocaption.png').write_bytes(_noise_png(rng, (40, 40)))
  name, summary = builders.build_folder(str(src), str(tmp_path / 'tfds'))
  assert '7 images with captions' in summary  # images that do not decode are left out at build
  assert 'no caption: nocaption.png' in summary and 'empty caption: empty.png' in summary
  assert 'not utf8: latin1.txt' in summary
  assert 'bad image: notimage.png (' in summary and 'truncated.png (' in summary
  config = _config(name, str(tmp_path / 'tfds'), batch_size=1, num_epochs=1, resolution=16,
                   min_image_size=8)
  loader = pipeline.Loader(config, tok)
  assert len(list(loader)) == 6
  stats = loader.stats
  assert (stats['ok'], stats['skipped_bad_image'], stats['skipped_too_small']) == (6, 0, 1)


def test_long_captions_are_truncated_and_counted(tmp_path, tok):
  src = tmp_path / 'long'
  src.mkdir()
  (src / 'a.png').write_bytes(_noise_png(np.random.default_rng(2), (20, 20)))
  (src / 'a.txt').write_text('word ' * 100)
  name, _ = builders.build_folder(str(src), str(tmp_path / 'tfds'))
  loader = pipeline.Loader(_config(name, str(tmp_path / 'tfds'), batch_size=1, num_epochs=1,
                                   resolution=16), tok)
  (batch,) = list(loader)
  assert batch['input_ids'].shape == (1, 77) and batch['input_ids'][0, -1] == tok.eos_token_id
  assert loader.stats['truncated_captions'] == 1


def test_clear_errors(shapes_dir, tmp_path, tok):
  data_dir, name = shapes_dir
  with pytest.raises(FileNotFoundError, match='python -m ldm_jax.data build shapes'):
    sources.data_source('shapes/nothing_here', 'train', str(tmp_path))
  with pytest.raises(ValueError, match=r"no split 'test'; it has \['train', 'holdout'\]"):
    sources.data_source(name, 'test', data_dir)
  with pytest.raises(ValueError, match=r"unknown data config keys \['resolutoin'\]"):
    pipeline.LoaderConfig.from_config({'name': name, 'data_dir': data_dir, 'resolutoin': 32})
  with pytest.raises(ValueError, match='global batch 6 is not divisible by 4 hosts'):
    pipeline.Loader(_config(name, data_dir, batch_size=6), tok, 0, 4)


def test_precomputed_dataset_holds_the_encodings(shapes_dir, tmp_path, tok):
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.data import precompute  # pylint: disable=g-import-not-at-top
  from ldm_jax.models import build, text_encoder, vae  # pylint: disable=g-import-not-at-top
  data_dir, name = shapes_dir
  nets = [vae.AutoencoderKL(vae.VAEConfig.tiny()),
          text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.tiny())]
  (vae_net, vae_params), (te_net, te_params) = [(m, build.random_params(m, 0)) for m in nets]
  config = _config(name, data_dir, split='holdout')
  pre_name, stats = precompute.precompute(config, tok, (vae_net, vae_params),
                                          (te_net, te_params), str(tmp_path), 'holdout32',
                                          batch_size=16)
  assert stats['ok'] == 40
  pre = pipeline.Loader(_config(pre_name, str(tmp_path), split='holdout', precomputed=True,
                                shuffle=False, batch_size=8), None)
  raw = pipeline.Loader(_config(name, data_dir, split='holdout', shuffle=False, batch_size=8),
                        tok)
  got, want = next(pre), next(raw)
  assert got['moments'].shape == (8, 16, 16, 8) and got['context'].shape == (8, 77, 32)
  mean, logvar = vae_net.apply({'params': vae_params}, want['image'], method='encode')
  context = te_net.apply({'params': te_params}, want['input_ids']).last_hidden_state
  np.testing.assert_allclose(got['moments'], np.concatenate([mean, logvar], -1), atol=1e-5)
  np.testing.assert_allclose(got['context'], context, atol=1e-5)
  # Given the tokenizer that encoded them, the stored token ids are used as they are (dropped
  # captions get the empty caption's); another max_length tokenizes the captions again.
  kw = dict(split='holdout', precomputed=True, shuffle=False, batch_size=40, caption_dropout=0.5)
  stored, again = (pipeline.Loader(_config(pre_name, str(tmp_path), max_length=n, **kw), tok)
                   for n in (77, 76))
  assert stored._process.stored_ids and not again._process.stored_ids
  a, b = next(stored), next(again)
  np.testing.assert_array_equal(a['drop'], b['drop'])
  assert 0 < a['drop'].sum() < 40
  np.testing.assert_array_equal(a['input_ids'][:, :76], b['input_ids'])
  del jax


def test_worker_processes_give_the_same_batches(shapes_dir, tok):
  data_dir, name = shapes_dir
  config = _config(name, data_dir, crop='random', flip=True, caption_dropout=0.2)
  single = pipeline.Loader(config, tok)
  workers = pipeline.Loader(pipeline.dataclasses.replace(config, worker_count=2), tok)
  for _ in range(5):
    a, b = next(single), next(workers)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_build_command(tmp_path, capsys):
  from ldm_jax.data import __main__ as cli  # pylint: disable=g-import-not-at-top
  cli.main(['build', 'shapes', '--data_dir', str(tmp_path), '--image_size', '16',
            '--num_train', '10', '--num_holdout', '5'])
  assert 'built shapes/s16_n10_h5_seed0' in capsys.readouterr().out
  assert len(sources.data_source('shapes/s16_n10_h5_seed0', 'train', str(tmp_path))) == 10


def test_centered_layout_has_one_object_at_the_center(tmp_path, capsys):
  from ldm_jax.data import __main__ as cli  # pylint: disable=g-import-not-at-top
  cli.main(['build', 'shapes', '--data_dir', str(tmp_path), '--num_train', '60',
            '--num_holdout', '10', '--layout', 'centered'])
  name = 'shapes/s32_n60_h10_seed0_centered'
  assert f'built {name}' in capsys.readouterr().out
  for split in ('train', 'holdout'):
    for record in sources.data_source(name, split, str(tmp_path)):
      colour, shape = record['colour'].decode(), record['shape'].decode()
      assert record['num_shapes'] == 1 and shapes.is_holdout(colour, shape) == (split == 'holdout')
      assert shapes_eval.read_image(record['image']) == (colour, shape)
      background = np.all(record['image'] == record['image'][0, 0], axis=-1)
      ys, xs = np.nonzero(~background)
      assert abs(ys.mean() - 15.5) < 2.5 and abs(xs.mean() - 15.5) < 1, record['caption']
  with pytest.raises(ValueError, match=r"unknown shapes layout 'grid'; choose one of"):
    builders.build_shapes(str(tmp_path), layout='grid')


class ToyCaptions(builders.tfds.core.GeneratorBasedBuilder):
  """A tfds dataset prepared by someone else, with its own key names (as coco_captions has)."""
  VERSION = builders.tfds.core.Version('1.0.0')

  def _info(self):
    features = builders.tfds.features
    return builders.tfds.core.DatasetInfo(builder=self, features=features.FeaturesDict({
        'photo': features.Tensor(shape=(12, 12, 3), dtype=np.uint8),
        'description': features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i in range(8):
      yield i, {'photo': np.full((12, 12, 3), 20 * i, np.uint8), 'description': f'gray {i}'}


def test_any_tfds_dataset_by_name_with_key_mapping(tmp_path, tok):
  ToyCaptions(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = _config('toy_captions', str(tmp_path), image_key='photo', caption_key='description',
                   resolution=8, batch_size=8, shuffle=False)
  batch = next(pipeline.Loader(config, tok))
  assert batch['image'].shape == (8, 8, 8, 3)
  assert sorted(np.round((batch['image'][:, 0, 0, 0] + 1) * 127.5)) == [20 * i for i in range(8)]
