"""The sharded, resumable precompute: a killed run resumes, two processes make what one makes,
aspect-ratio buckets keep their shapes, and the `precompute` command."""

import io
import logging
import os
import tarfile

import jax
import numpy as np
from PIL import Image
import pytest

from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import __main__ as cli
from ldm_jax.data import builders
from ldm_jax.data import encode_shards
from ldm_jax.data import pipeline
from ldm_jax.data import precompute
from ldm_jax.data import shapes
from ldm_jax.data import sources
from ldm_jax.models import build
from ldm_jax.models import vae as vae_lib
from ldm_jax.tokenizer import build as tokenizer_build

SHARD, BATCH = 8, 8  # 36 records: shards of 8, 8, 8, 8 and 4; a batch is one per CPU device
CONFIGS = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')
_WRITE_SHARD = precompute.Job.write_shard


class Killed(Exception):
  """Stands for the kill of a run."""


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(a 16 px shapes LoaderConfig, a tokenizer, a random f=2 VAE)."""
  root = tmp_path_factory.mktemp('precompute')
  name = builders.build_shapes(str(root / 'tfds'), image_size=16, num_train=36, num_holdout=4)
  words = list(shapes.COLOURS) + list(shapes.SHAPES) + ['a', 'on', 'background', 'image']
  tok = tokenizer_lib.load_tokenizer(
      tokenizer_build.build_caption_tokenizer([' '.join(words)], root / 'tok'))
  net = vae_lib.AutoencoderKL(vae_lib.VAEConfig.tiny(block_out_channels=(8, 8), norm_num_groups=4,
                                                     latent_channels=2))
  config = pipeline.LoaderConfig(name=name, data_dir=str(root / 'tfds'), resolution=16,
                                 max_length=8)
  return config, tok, (net, build.random_params(net, 0))


@pytest.fixture(scope='module')
def reference(setup, tmp_path_factory):
  """The records of an uninterrupted single-process encoding."""
  config, tok, vae = setup
  out = str(tmp_path_factory.mktemp('reference'))
  name, stats = precompute.precompute(config, tok, vae, None, out, 'train', batch_size=BATCH,
                                      shard_size=SHARD)
  assert stats['ok'] == 36
  return _records(name, out)


def _records(name, data_dir):
  source = sources.data_source(name, 'train', data_dir)
  return [source[i] for i in range(len(source))]


def _assert_same(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _recording(monkeypatch, written, kill_after=None):
  """Records the shards written (in `written`); with `kill_after`, the run is killed while it
  writes the next one (its partial file left behind)."""
  def write_shard(job, k, *args):
    if kill_after is not None and len(written) == kill_after:
      (job.progress_dir / (job.shard_path(k).name + '.partial')).write_bytes(b'half a shard')
      raise Killed
    written.append(k)
    return _WRITE_SHARD(job, k, *args)
  monkeypatch.setattr(precompute.Job, 'write_shard', write_shard)


def test_a_killed_run_redoes_only_its_unfinished_shards(setup, reference, tmp_path, monkeypatch):
  config, tok, vae = setup
  encode = lambda: precompute.precompute(config, tok, vae, None, str(tmp_path), 'train',
                                         batch_size=BATCH, shard_size=SHARD)
  written = []
  _recording(monkeypatch, written, kill_after=2)
  with pytest.raises(Killed):
    encode()
  assert written == [0, 1]
  assert sources.newest_version('precomputed/train', str(tmp_path)) is None  # not readable yet
  written.clear()
  _recording(monkeypatch, written)
  name, stats = encode()
  assert written == [2, 3, 4] and stats['ok'] == 36  # the stats of every shard
  _assert_same(_records(name, str(tmp_path)), reference)
  written.clear()
  assert encode()[1]['ok'] == 0 and not written  # done: nothing is encoded again


def test_a_killed_run_of_other_inputs_is_not_resumed(setup, tmp_path, monkeypatch, caplog):
  config, tok, (net, params) = setup
  written = []
  _recording(monkeypatch, written, kill_after=3)
  with pytest.raises(Killed):
    precompute.precompute(config, tok, (net, params), None, str(tmp_path), 'train',
                          batch_size=BATCH, shard_size=SHARD)
  written.clear()
  _recording(monkeypatch, written)
  with caplog.at_level(logging.WARNING):
    precompute.precompute(config, tok, (net, build.random_params(net, 1)), None, str(tmp_path),
                          'train', batch_size=BATCH, shard_size=SHARD)
  assert 'precomputed/train in' in caplog.text and 'is stale (vae changed)' in caplog.text
  assert written == [0, 1, 2, 3, 4]


def test_two_processes_make_what_one_makes(setup, reference, tmp_path, monkeypatch):
  config, tok, vae = setup
  job = precompute.plan(config, tok, vae, None, str(tmp_path), 'train', shard_size=SHARD)
  precompute.start(job)
  first, second = [], []
  _recording(monkeypatch, first)
  stats = [encode_shards.encode(job, BATCH, 0, 2)]
  with pytest.raises(RuntimeError, match='2 of 5 shards of precomputed/train are not encoded'):
    precompute.finalize(job)
  _recording(monkeypatch, second)
  stats.append(encode_shards.encode(job, BATCH, 1, 2))
  total = precompute.finalize(job)
  assert first == [0, 2, 4] and second == [1, 3]
  assert stats[0]['ok'] == 20 and stats[1]['ok'] == 16 and total['ok'] == 36
  _assert_same(_records('precomputed/train', str(tmp_path)), reference)


def _tar(path, sizes):
  """A webdataset shard of noise PNGs of (width, height) `sizes`, then one that is damaged."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, 'w') as tar:
    members = []
    for i, (w, h) in enumerate(sizes):
      buf = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, 'PNG')
      members += [(f'{i:04d}.png', buf.getvalue()), (f'{i:04d}.txt', b'a red circle')]
    members += [(f'{len(sizes):04d}.png', b'not an image'), (f'{len(sizes):04d}.txt', b'a')]
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_buckets_survive_precompute(setup, tmp_path):
  _, tok, (net, params) = setup
  sizes = [(24, 16), (16, 24), (16, 16), (30, 18), (17, 26)] * 2  # (width, height)
  _tar(tmp_path / 'shard.tar', sizes)
  config = pipeline.LoaderConfig(name=f'webdataset:{tmp_path}/shard.tar', data_dir=str(tmp_path),
                                 resolution=16, max_length=8, buckets='24x16,16x16,16x24')
  name, stats = precompute.precompute(config, tok, (net, params), None, str(tmp_path / 'out'),
                                      'bucketed', batch_size=BATCH, shard_size=4)
  assert stats['ok'] == 10 and stats['skipped_bad_image'] == 1
  buckets = [(24, 16), (16, 24), (16, 16), (24, 16), (16, 24)] * 2
  version_dir = sources.newest_version(name, str(tmp_path / 'out'))
  np.testing.assert_array_equal(np.load(os.path.join(version_dir, 'sizes.npy')), buckets)
  records = _records(name, str(tmp_path / 'out'))
  assert [r['moments'].shape for r in records] == [(h // 2, w // 2, 4) for w, h in buckets]
  assert [tuple(r['original_size']) for r in records] == [(h, w) for w, h in sizes]
  # A 30x18 image's moments are the VAE's encoding of its 24x16 crop.
  source = sources.data_source(config.name, 'train', config.data_dir)
  image = pipeline.ProcessRecord(config, tok)(source[3], np.random.default_rng(0), (24, 16))
  x = image['image'][None].astype(np.float32) / 127.5 - 1.0
  want = jax.jit(lambda x: net.apply({'params': params}, x, method='encode'))(x)
  np.testing.assert_allclose(records[3]['moments'], np.concatenate(want, -1)[0], atol=1e-5)
  loader = pipeline.Loader(pipeline.LoaderConfig(
      name=name, data_dir=str(tmp_path / 'out'), precomputed=True, buckets='auto',
      batch_size=2, resolution=16, max_length=8), tok)
  for _ in range(4):  # every batch is of one bucket's shape
    batch = next(loader)
    assert batch['moments'].shape[1:] in [(h // 2, w // 2, 4) for w, h in set(buckets)]


def test_precompute_command(tmp_path, capsys):
  out = str(tmp_path / 'out')
  argv = ['precompute', '--config', os.path.join(CONFIGS, 'shapes.py:ldm,runlocal'),
          f'--config.data.data_dir={tmp_path / "data"}', '--config.allow_random_vae=True',
          '--out', out, '--name', 'demo', '--shard_size', '40']
  with pytest.raises(SystemExit, match='the config trains its text encoder'):
    cli.main(argv + ['--text_encoder'])
  cli.main(argv)
  printed = capsys.readouterr().out
  assert 'precomputed/demo in' in printed and 'ok 64' in printed
  assert (f'--config.data.name=precomputed/demo --config.data.data_dir={out} '
          '--config.data.precomputed=True --config.precompute_latents=False') in printed
  loader = pipeline.Loader(pipeline.LoaderConfig(name='precomputed/demo', data_dir=out,
                                                 precomputed=True, batch_size=8), None)
  batch = next(loader)
  assert batch['moments'].shape == (8, 16, 16, 8) and 'context' not in batch
  np.testing.assert_array_equal(batch['original_size'], np.full((8, 2), 32))
