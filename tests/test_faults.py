"""Faults and bad input (README: "Faults and bad input"): every case ends in a correct result or
one clear message naming the problem and the fix, before compute is spent, losing nothing.

Four parts: checkpoints and runs (corrupt steps set aside, non-finite states never saved, failed
saves, an honest metrics record, kill -9 at random instants resuming bit for bit), data (image
modes, stale builds and encodings, bad images named), conversions (a single file keeps its
model) and start-up (every mistypeable value checked before anything is written). A lost process
of a multi-process run: test_multihost.py.
"""

import functools
import glob
import importlib
import io
import json
import logging
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from unittest import mock
import zlib

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageCms
import pytest
from safetensors import numpy as st_numpy
import yaml

from ldm_jax import checkpoint
from ldm_jax import config_check
from ldm_jax import convert
from ldm_jax import sharding
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax import weights
from ldm_jax.convert import __main__ as convert_cli
from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import single_file
from ldm_jax.convert import single_file_config as sfc
from ldm_jax.data import __main__ as cli
from ldm_jax.data import builders
from ldm_jax.data import pipeline
from ldm_jax.data import precompute
from ldm_jax.data import sources
from ldm_jax.models import build
from ldm_jax.models import text_encoder as text_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib
from ldm_jax.tokenizer import build as tokenizer_build
from ldm_jax.train import clock
from ldm_jax.train import logger as logger_lib
from ldm_jax.train import loop
from ldm_jax.train import preflight
from ldm_jax.train import stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import shapes  # pylint: disable=g-import-not-at-top,wrong-import-position


# ==================================================================================================
# Faults of checkpoints and runs: corrupt steps, non-finite states, failed saves, kill -9.
# ==================================================================================================


def _state(seed):
  """A small train-state-like tree: float32, bfloat16 and int leaves, a tuple like optax's."""
  rng = np.random.default_rng(seed)
  w = lambda *s: rng.normal(size=s).astype(np.float32)
  return {'step': np.asarray(seed, np.int32),
          'params': {'conv': {'kernel': w(3, 3, 4, 8), 'bias': w(8)}, 'dense': w(64, 32)},
          'opt_state': ({'count': np.asarray(seed, np.int32), 'mu': {'dense': w(64, 32)}},),
          'ema_params': {'conv': {'kernel': w(3, 3, 4, 8).astype(jnp.bfloat16)}}}


def _abstract(state):
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


@pytest.fixture
def saved(tmp_path):
  """A workdir whose checkpoints hold steps 1, 2, 3 of `_state`."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step), {'position': step}, {'seed': 0})
  ckpt.close()
  return str(tmp_path)


def _array_files(workdir, step):
  """The files holding a step's array bytes, largest first."""
  files = [f for f in glob.glob(f'{workdir}/checkpoints/{step}/state/**/d/*', recursive=True)
           if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize, reverse=True)


def _xor_two_bytes(workdir, step):
  path = _array_files(workdir, step)[0]
  data = bytearray(open(path, 'rb').read())
  for offset in (len(data) // 3, len(data) // 2):
    data[offset] ^= 0x01  # a low bit: the value stays finite, only the checksum can tell
  open(path, 'wb').write(bytes(data))


def _random_4k(workdir, step):
  path = _array_files(workdir, step)[0]
  with open(path, 'r+b') as f:
    f.seek(64)
    f.write(np.random.default_rng(0).bytes(4096))


def _truncate(workdir, step):
  path = _array_files(workdir, step)[0]
  os.truncate(path, os.path.getsize(path) // 2)


def _remove_array_folder(workdir, step):
  shutil.rmtree(os.path.dirname(_array_files(workdir, step)[0]))


def _remove_state(workdir, step):
  shutil.rmtree(f'{workdir}/checkpoints/{step}/state')


def _truncate_data_json(workdir, step):
  path, = glob.glob(f'{workdir}/checkpoints/{step}/data/process_0-of-1.json')
  os.truncate(path, os.path.getsize(path) // 2)


CORRUPTIONS = [_xor_two_bytes, _random_4k, _truncate, _remove_array_folder, _remove_state,
               _truncate_data_json]


@pytest.mark.parametrize('corrupt', CORRUPTIONS, ids=lambda f: f.__name__.strip('_'))
def test_a_corrupt_newest_step_is_set_aside_and_the_previous_one_used(saved, corrupt, caplog):
  corrupt(saved, 3)
  # Another run's checkpoints (config.resume): the bad step is skipped, nothing moved.
  other = checkpoint.Checkpointer(None, directory=f'{saved}/checkpoints')
  assert other.restore_newest_good(_abstract(_state(3)), set_aside=False)[0] == 2
  other.close()
  assert sorted(os.listdir(f'{saved}/checkpoints')) == ['1', '2', '3']
  ckpt = checkpoint.Checkpointer(saved, keep=5)
  with caplog.at_level(logging.WARNING):
    step, state, data = ckpt.restore_newest_good(_abstract(_state(3)))
  ckpt.close()
  assert (step, data) == (2, {'position': 2})
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), _state(2))
  reports = [r.getMessage() for r in caplog.records if 'step 3' in r.getMessage()]
  assert any('cannot be used' in m for m in reports), reports  # one line: the step and why
  assert sorted(os.listdir(f'{saved}/checkpoints')) == ['1', '2']
  assert os.listdir(f'{saved}/{checkpoint.SET_ASIDE}') == ['3']  # renamed, never deleted
  # A reader of the run's state (sampling, config.resume) skips it too, and moves nothing.
  shutil.move(f'{saved}/{checkpoint.SET_ASIDE}/3', f'{saved}/checkpoints/3')
  step, state = checkpoint.read_checkpoint(saved)
  assert step == (3 if corrupt is _truncate_data_json else 2)  # it reads no data position
  assert os.path.isdir(f'{saved}/checkpoints/3')
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(step))):
    np.testing.assert_array_equal(got, want)


def test_flipped_bytes_are_named_by_array(saved):
  _xor_two_bytes(saved, 3)  # the array file may be compressed: the values can turn to NaN
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'^(corrupt: |NaN/inf in )\d arrays? \((params|opt_state/0|ema_params)/'):
    checkpoint.Checkpointer(saved).restore(3, _abstract(_state(3)))


def test_no_good_step_lists_each_and_moves_nothing(saved):
  for step in (1, 2, 3):
    _xor_two_bytes(saved, step)
  ckpt = checkpoint.Checkpointer(saved, keep=5)
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore_newest_good(_abstract(_state(3)))
  ckpt.close()
  for step in (1, 2, 3):  # (a flipped bit of a compressed file can decode to NaN instead)
    assert re.search(rf'step {step}: (corrupt|NaN/inf)', str(e.value)), str(e.value)
  assert sorted(os.listdir(f'{saved}/checkpoints')) == ['1', '2', '3']


def test_num_steps_below_the_checkpoint_is_a_clear_error(saved):
  config = type('Config', (), {'num_steps': 2, 'resume': ''})()
  ckpt = checkpoint.Checkpointer(saved)
  with pytest.raises(preflight.ConfigError, match=r"the workdir's checkpoint is at step 3, past "
                     r'num_steps=2: nothing to train. Raise --config.num_steps above 3'):
    loop._restore_or_init(config, None, None, _abstract(_state(3)), ckpt, None, None)  # pylint: disable=protected-access
  ckpt.close()


@pytest.mark.parametrize('leaf', ['opt_state/0/mu/dense', 'ema_params/conv/kernel'])
def test_a_state_with_nan_is_never_saved(tmp_path, leaf):
  state = _state(1)
  *parents, name = [int(k) if k.isdigit() else k for k in leaf.split('/')]
  node = functools.reduce(lambda n, k: n[k], parents, state)
  node[name] = node[name].copy()
  node[name].reshape(-1)[5] = np.nan  # in a bfloat16 array too
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  with pytest.raises(checkpoint.NonFiniteStateError, match=leaf):
    ckpt.save(1, state, {}, {})
  ckpt.close()
  assert ckpt.latest_step() is None


def test_a_changed_config_is_not_called_corrupt(saved):
  abstract = _abstract(_state(3))
  abstract['params']['dense'] = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16,
                                                     sharding=abstract['params']['dense'].sharding)
  with pytest.raises(checkpoint.CheckpointError, match=r'the config does not match the '
                     r'checkpoint: 1 arrays differ \(params/dense: saved float32\[64, 32\], '
                     r'config bfloat16\[64, 32\]\)'):
    checkpoint.Checkpointer(saved).restore(3, abstract)


def test_a_failed_background_save_is_one_clear_error(tmp_path):
  """The write fails in orbax's background thread (the file-size limit plays a full disk)."""
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1), {}, {})
  ckpt.wait()
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (2048, hard))  # Python ignores SIGXFSZ: EFBIG
  try:
    ckpt.save(2, _state(2), {}, {})
    with pytest.raises(checkpoint.CheckpointError) as e:  # what the loop calls after each step
      for _ in range(1000):
        ckpt.check()
        time.sleep(0.01)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  ckpt.close()
  message = str(e.value)
  assert message.startswith('saving step 2 to') and 'File too large' in message, message
  assert 'intact (steps [1])' in message
  step, _, _ = checkpoint.Checkpointer(str(tmp_path)).restore_newest_good(_abstract(_state(1)))
  assert step == 1


def test_non_finite_metrics_stop_before_the_save(tmp_path):
  """A finite loss with NaN gradients stops the run; with no checkpoint yet, it says so."""
  class Config(dict):
    __getattr__ = dict.__getitem__

  config = Config(ckpt_every=10, log_every=1, num_steps=20, data=Config(batch_size=8))
  reader = loop._MetricsReader(logger_lib.Logger(str(tmp_path), 20), config, str(tmp_path),  # pylint: disable=protected-access
                               None, clock.Clock())
  good = {'loss': 1e23, 'grad_norm': 1.0, 'param_norm': 1.0, 'update_norm': 1.0}
  reader.push(1, good, {})
  reader.push(2, dict(good, grad_norm=np.nan, param_norm=np.nan), {})
  with pytest.raises(loop.NonFiniteError) as e:
    reader.flush()
  assert str(e.value).startswith('the loss is finite (1e+23) but grad_norm is nan, param_norm is '
                                 'nan (the gradients or the updated weights are not finite) at '
                                 'step 2: stopped. No checkpoint was saved before it (the first '
                                 'is due at step 10): a rerun starts from the beginning'), e.value
  reader.good_step = 10
  reader.push(11, dict(good, loss=np.inf), {})
  with pytest.raises(loop.NonFiniteError, match='loss is inf at step 11: stopped. The last good '
                     'checkpoint is step 10'):
    reader.flush()


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  rows = [{'step': s, 'loss': s} for s in (1, 2, 3, 4, 5)]
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + '{"step": 6, "lo')  # died here
  log = logger_lib.Logger(str(tmp_path), 10, start_step=2)
  for step in (3, 4):
    log.log(step, {'loss': 10.0 * step}, 8)
  log.close()
  got = [json.loads(l) for l in path.read_text().splitlines()]
  assert [(r['step'], r['loss']) for r in got] == [(1, 1), (2, 2), (3, 30.0), (4, 40.0)]


# kill -9 at random instants, a save that fails, a corrupt newest step: the run ends bit for bit
# where an uninterrupted one does, and its metrics.jsonl holds each step once. The input runs
# ahead of the step (3 batches made and placed in a thread): the checkpoints must hold the data
# position of the batch each saved state consumed, not of the ones made ahead.

_STEPS = 16


def _train_cmd(data_dir, workdir):
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config',
          os.path.join(ROOT, 'configs', 'shapes.py') + ':ldm,runlocal', '--workdir', workdir,
          f'--config.data.data_dir={data_dir}', '--config.allow_random_vae=True',
          f'--config.num_steps={_STEPS}',
          '--config.ckpt_every=2', '--config.log_every=1', '--config.sample_every=0',
          '--config.keep_checkpoints=3', '--config.data.prefetch=3']


def _start(cmd, **kwargs):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('JAX_NUM_CPU_DEVICES', None)
  return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, cwd=ROOT, **kwargs)


def _wait_for_line(proc, prefix):
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith(prefix):
      return lines
  raise AssertionError(f'the run ended before {prefix!r}:\n' + ''.join(lines[-40:]))


def _saving(workdir):
  return glob.glob(f'{workdir}/checkpoints/*.orbax-checkpoint-tmp*')


def _limit_file_size():
  resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def test_kill_9_a_failed_save_and_a_corrupt_step_resume_bit_for_bit(tmp_path):
  seed = random.randrange(10 ** 6)
  rand = random.Random(seed)
  data_dir = str(tmp_path / 'tfds')
  builders.build_shapes(data_dir, image_size=32, num_train=64, num_holdout=16)
  reference, workdir = str(tmp_path / 'reference'), str(tmp_path / 'run')
  straight = _start(_train_cmd(data_dir, reference))  # alongside the first interrupted run
  cmd = _train_cmd(data_dir, workdir)
  log = []

  # 1. kill -9 at a random instant while it trains (checkpoints of steps 2 and 4 done or under way).
  proc = _start(cmd)
  log += _wait_for_line(proc, 'step 5/')
  time.sleep(rand.uniform(0, 1.0))
  proc.kill()
  log += proc.communicate(timeout=60)[0]

  # 2. kill -9 in the middle of an async save.
  proc = _start(cmd)
  deadline = time.time() + 240
  while not _saving(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.002)
  proc.kill()
  log += proc.communicate(timeout=60)[0]

  # 3. SIGTERM: saves where it is and stops (so two checkpoints at least are on disk).
  proc = _start(cmd)
  log += _wait_for_line(proc, 'step ')
  time.sleep(rand.uniform(0, 0.3))
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0]
  assert proc.returncode == 0, out[-3000:]
  assert len([s for s in os.listdir(f'{workdir}/checkpoints') if s.isdigit()]) >= 2, seed

  # 4. The disk fills up: the save fails and the run stops at once, with one message.
  proc = _start(cmd, preexec_fn=_limit_file_size)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode != 0, out[-3000:]
  assert 'error: saving step' in out and 'File too large' in out, out[-3000:]
  assert 'Traceback' not in out and len(out.splitlines()) < 80, out[-5000:]

  # 5. The newest checkpoint's bytes rot on disk: set aside, the one before it is used.
  newest = max(int(s) for s in os.listdir(f'{workdir}/checkpoints') if s.isdigit())
  _xor_two_bytes(workdir, newest)
  proc = _start(cmd)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, out[-3000:]
  # (the array file may be compressed: the flipped bits can decode to NaN instead)
  assert re.search(rf'checkpoint step {newest} of \S+ cannot be used: (corrupt|NaN/inf)', out), out
  assert os.listdir(f'{workdir}/{checkpoint.SET_ASIDE}') == [str(newest)]
  assert 'loaded from the compilation cache' in out, out  # restarts do not compile the step again

  ref_out = straight.communicate(timeout=300)[0]
  assert straight.returncode == 0, ref_out[-3000:]
  (s1, a), (s2, b) = (checkpoint.read_checkpoint(w) for w in (reference, workdir))
  assert s1 == s2 == _STEPS
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=f'random seed {seed}')  # bit for bit
  rows = [json.loads(l) for l in open(f'{workdir}/metrics.jsonl')]
  ref_rows = [json.loads(l) for l in open(f'{reference}/metrics.jsonl')]
  assert [r['step'] for r in rows] == list(range(1, _STEPS + 1)), (seed, [r['step'] for r in rows])
  assert [r['loss'] for r in rows] == [r['loss'] for r in ref_rows], seed


# ==================================================================================================
# Data faults end in a correct result or one clear message: image modes, stale builds and
# encodings, bad and tiny images, broken metadata, unknown dataset names, bad data config.
# ==================================================================================================


COLOUR = (200, 80, 40)
RAMP16 = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)  # every 16-bit level range


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  folder = tokenizer_build.build_caption_tokenizer(['a red green blue circle square image'],
                                                   tmp_path_factory.mktemp('tok'))
  return tokenizer_lib.load_tokenizer(folder)


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def _png16(array, colour_type):
  """A 16-bit PNG written by hand (Pillow writes 16-bit greys only)."""
  h, w = array.shape[:2]
  raw = b''.join(b'\0' + array[y].astype('>u2').tobytes() for y in range(h))
  chunk = lambda t, d: struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 16, colour_type,
                                                           0, 0, 0))
          + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


def _palette(transparent):
  img = Image.new('RGB', (8, 8), COLOUR).quantize(4)
  return _encode(img, 'PNG', **({'transparency': 0} if transparent else {}))


def _palette_alpha():
  img = Image.new('RGB', (8, 8), COLOUR).quantize(4).convert('PA')
  img.putalpha(128)
  return _encode(img, 'TIFF')


def _lab():
  to_lab = ImageCms.buildTransform(ImageCms.createProfile('sRGB'), ImageCms.createProfile('LAB'),
                                   'RGB', 'LAB')
  return _encode(ImageCms.applyTransform(Image.new('RGB', (8, 8), COLOUR), to_lab), 'TIFF')


def _grey(value):
  return np.full((8, 8, 3), value, np.float64)


def _ramp_rgb():
  return np.repeat((RAMP16 / 257)[..., None], 3, -1)


# name -> (encoded file, the RGB it must decode to)
MODES = {
    '1': (lambda: _encode(Image.new('1', (8, 8), 1), 'PNG'), lambda: _grey(255)),
    'L': (lambda: _encode(Image.new('L', (8, 8), 128), 'PNG'), lambda: _grey(128)),
    'LA': (lambda: _encode(Image.new('LA', (8, 8), (0, 128)), 'PNG'),  # half-transparent black
           lambda: _grey(127.5)),
    'P': (lambda: _palette(False), lambda: _grey(0) + COLOUR),
    'P_transparency': (lambda: _palette(True), lambda: _grey(255)),
    'PA': (_palette_alpha, lambda: (_grey(255) + COLOUR) / 2),  # half-transparent on white
    'RGB': (lambda: _encode(Image.new('RGB', (8, 8), COLOUR), 'PNG'), lambda: _grey(0) + COLOUR),
    'RGBA': (lambda: _encode(Image.new('RGBA', (8, 8), COLOUR + (0,)), 'PNG'), lambda: _grey(255)),
    'CMYK': (lambda: _encode(Image.new('RGB', (8, 8), COLOUR).convert('CMYK'), 'TIFF'),
             lambda: _grey(0) + COLOUR),
    'YCbCr': (lambda: _encode(Image.new('RGB', (8, 8), COLOUR).convert('YCbCr'), 'TIFF'),
              lambda: _grey(0) + COLOUR),
    'LAB': (_lab, lambda: _grey(0) + COLOUR),
    'I;16_png': (lambda: _encode(Image.fromarray(RAMP16), 'PNG'), _ramp_rgb),
    'I;16_tiff': (lambda: _encode(Image.fromarray(RAMP16), 'TIFF'), _ramp_rgb),
    'I;16B_tiff': (lambda: _encode(Image.frombytes('I;16B', (8, 8), RAMP16.astype('>u2').tobytes()),
                                   'TIFF'), _ramp_rgb),
    'I_tiff': (lambda: _encode(Image.fromarray(RAMP16.astype(np.int32)), 'TIFF'), _ramp_rgb),
    'F_unit': (lambda: _encode(Image.fromarray(np.full((8, 8), 0.5, np.float32)), 'TIFF'),
               lambda: _grey(127.5)),
    'F_8bit': (lambda: _encode(Image.new('L', (8, 8), 128).convert('F'), 'TIFF'),
               lambda: _grey(128)),
    'F_range': (lambda: _encode(Image.fromarray(RAMP16.astype(np.float32)), 'TIFF'),
                _ramp_rgb),
    'RGB16_png': (lambda: _png16(np.stack([RAMP16, 65535 - RAMP16, RAMP16], -1), 2),
                  lambda: np.stack([RAMP16, 65535 - RAMP16, RAMP16], -1) / 257),
    'LA16_png': (lambda: _png16(np.stack([RAMP16, np.full_like(RAMP16, 65535)], -1), 4),
                 _ramp_rgb),
}


@pytest.mark.parametrize('mode', list(MODES))
def test_every_pillow_mode_decodes_to_the_right_rgb(mode):
  """Fault 1: 16-bit greys were clipped to white by convert('RGB')."""
  encoded, expected = MODES[mode]
  got = np.asarray(pipeline.decode_image(encoded()), np.float64)
  assert got.shape == (8, 8, 3)
  np.testing.assert_allclose(got, expected(), atol=2, err_msg=mode)


def _folder(path, n, size=(8, 8), seed=0):
  """n captioned noise PNGs (sidecar .txt captions) in `path`."""
  rng = np.random.default_rng(seed)
  path.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    img = rng.integers(0, 255, size[::-1] + (3,), dtype=np.uint8)
    (path / f'{i}.png').write_bytes(_encode(Image.fromarray(img), 'PNG'))
    (path / f'{i}.txt').write_text(f'image {i}')
  return str(path)


def _records(name, data_dir):
  return sorted(r['file_name'].decode() for r in sources.data_source(name, 'train', data_dir))


def test_folder_dataset_follows_its_source(tmp_path, caplog):
  """Fault 2: a build of b/photos was 'already built' with a/photos' images."""
  data_dir = str(tmp_path / 'tfds')
  a, b = _folder(tmp_path / 'a' / 'photos', 2), _folder(tmp_path / 'b' / 'photos', 3, seed=1)
  name, _ = builders.build_folder(a, data_dir)
  assert _records(name, data_dir) == ['0.png', '1.png']
  with pytest.raises(SystemExit, match=r'error: image_folder/photos in .* was built from '
                                       r'.*a/photos, not .*b/photos: pass --overwrite'):
    cli.main(['build', 'folder', '--src', b, '--data_dir', data_dir])
  assert builders.build_folder(b, data_dir, name='photos_b')[0] == 'image_folder/photos_b'
  builders.build_folder(b, data_dir, overwrite=True)
  assert _records(name, data_dir) == ['0.png', '1.png', '2.png']
  assert builders.build_folder(b, data_dir)[1].startswith('already built (3 images')
  _folder(tmp_path / 'b' / 'photos', 4, seed=2)  # one added, three rewritten
  with caplog.at_level(logging.WARNING):
    _, summary = builders.build_folder(b, data_dir)
  assert summary.startswith('4 images with captions') and _records(name, data_dir)[-1] == '3.png'
  assert 'rebuilding image_folder/photos' in caplog.text and '2 added: 3.png, 3.txt' in caplog.text


def test_precomputed_encodings_follow_their_inputs(tmp_path, tok, caplog):
  """Fault 3: a workdir's encodings of one dataset were reused for another."""
  from ldm_jax.models import build, vae  # pylint: disable=g-import-not-at-top
  net = vae.AutoencoderKL(vae.VAEConfig.tiny(block_out_channels=(8,), norm_num_groups=4,
                                             latent_channels=2))
  data_dir, workdir = str(tmp_path / 'tfds'), str(tmp_path / 'work' / 'precomputed')
  a = builders.build_shapes(data_dir, image_size=8, num_train=3, num_holdout=1, seed=0)
  b = builders.build_shapes(data_dir, image_size=8, num_train=3, num_holdout=1, seed=1)
  config = pipeline.LoaderConfig(name=a, data_dir=data_dir, resolution=8, max_length=8)

  def encode(name, seed=0):
    data = pipeline.dataclasses.replace(config, name=name)
    out = precompute.for_training(data, tok, (net, build.random_params(net, seed)), None, workdir)
    return sorted(r['caption'] for r in sources.data_source(out.name, 'train', out.data_dir))

  captions = lambda name: sorted(r['caption'] for r in sources.data_source(name, 'train', data_dir))
  assert encode(a) == captions(a)
  shard = os.path.join(workdir, 'precomputed', 'train', '1.0.0')
  mtimes = {f: os.stat(os.path.join(shard, f)).st_mtime_ns for f in os.listdir(shard)}
  assert encode(a) == captions(a)  # a resumed run: the same encodings, not written again
  assert mtimes == {f: os.stat(os.path.join(shard, f)).st_mtime_ns for f in os.listdir(shard)}
  with caplog.at_level(logging.WARNING):
    assert encode(b) == captions(b) != captions(a)
  assert (f"precomputed/train in {workdir} is stale (dataset: '{a}' -> '{b}'" in caplog.text
          and 'deleting it and encoding again' in caplog.text)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    encode(b, seed=1)
  assert 'is stale (vae changed)' in caplog.text


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
  """A folder with good, tiny, empty, truncated and non-image files, built once."""
  root = tmp_path_factory.mktemp('messy')
  src = root / 'messy'
  _folder(src, 3, size=(16, 16))
  (src / 'tiny.png').write_bytes(_encode(Image.new('RGB', (1, 1), COLOUR), 'PNG'))
  (src / 'empty.png').write_bytes(b'')
  (src / 'truncated.png').write_bytes(_encode(Image.new('RGB', (64, 64), COLOUR), 'PNG')[:60])
  (src / 'notimage.jpg').write_bytes(b'not an image')
  for stem in ('tiny', 'empty', 'truncated', 'notimage'):
    (src / f'{stem}.txt').write_text(stem)
  name, summary = builders.build_folder(str(src), str(root / 'tfds'))
  return name, str(root / 'tfds'), summary


def test_bad_images_are_named_at_build(messy):
  """Fault 4: a corrupt or empty image was counted as good and skipped silently later."""
  name, data_dir, summary = messy
  assert summary.startswith('4 images with captions; 3 skipped (bad image: empty.png (')
  assert 'notimage.jpg (cannot identify image file)' in summary and 'truncated.png (' in summary
  assert _records(name, data_dir) == ['0.png', '1.png', '2.png', 'tiny.png']


class BrokenImage(builders.tfds.core.GeneratorBasedBuilder):
  """A dataset prepared elsewhere that holds an image which does not decode."""
  VERSION = builders.tfds.core.Version('1.0.0')

  def _info(self):
    features = builders.tfds.features
    return builders.tfds.core.DatasetInfo(builder=self, features=features.FeaturesDict({
        'image': features.Tensor(shape=(), dtype=np.object_), 'caption': features.Text(),
        'file_name': features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    yield 0, {'image': _encode(Image.new('RGB', (8, 8)), 'PNG'), 'caption': 'a', 'file_name': 'ok'}
    yield 1, {'image': b'\x89PNG broken', 'caption': 'b', 'file_name': 'photos/broken.png'}


def test_bad_image_at_train_time_is_logged_with_its_name(tmp_path, tok, caplog):
  """Fault 4, train time: the skip was counted but never named."""
  BrokenImage(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  config = pipeline.LoaderConfig(name='broken_image', data_dir=str(tmp_path), resolution=8,
                                 batch_size=1, num_epochs=1, max_length=8)
  loader = pipeline.Loader(config, tok)
  with caplog.at_level(logging.WARNING):
    assert len(list(loader)) == 1
  assert loader.stats['skipped_bad_image'] == 1
  assert ('skipped an image that does not decode: photos/broken.png: cannot identify image file '
          '(1 so far; counted as skipped_bad_image in the loader stats)') in caplog.text


def test_metadata_errors_name_the_file_and_line(tmp_path):
  """Fault 5: 'Invalid control character at: line 1 column 38', no file, the wrong line."""
  src = _folder(tmp_path / 'meta', 2)
  jsonl = os.path.join(src, 'metadata.jsonl')
  with open(jsonl, 'w') as f:
    f.write('{"file_name": "0.png", "text": "a"}\n\n{"file_name": "1.png", "text": "b\tc"}\n')
  with pytest.raises(SystemExit, match=rf'error: {jsonl} line 3: Invalid control character '
                                       r'\(column 34\)'):
    cli.main(['build', 'folder', '--src', src, '--data_dir', str(tmp_path / 'tfds')])
  with open(jsonl, 'w') as f:
    f.write('{"file_name": "0.png", "text": "a"}\n{"file": "1.png", "text": "b"}\n')
  with pytest.raises(ValueError, match=r'metadata.jsonl line 2: needs a "file_name" string \(and '
                                       r"\"text\"\); it has keys \['file', 'text'\]"):
    builders.build_folder(src, str(tmp_path / 'tfds'))
  os.remove(jsonl)
  with open(os.path.join(src, 'metadata.csv'), 'w') as f:
    f.write('file_name,caption\n0.png,a\n')
  with pytest.raises(ValueError, match=r"metadata.csv has columns \['file_name', 'caption'\]; it "
                                       'needs a header row with file_name and text'):
    builders.build_folder(src, str(tmp_path / 'tfds'))


def test_tiny_images_are_named_at_build_and_warned_about_in_training(messy, tok, caplog):
  """Fault 6: a 1x1 image was upsampled and trained on without a word."""
  name, data_dir, summary = messy
  assert ('1 tiny, shorter side < 16 px (kept and upsampled in training; data.min_image_size=16 '
          'skips them: tiny.png (1x1))') in summary
  config = pipeline.LoaderConfig(name=name, data_dir=data_dir, resolution=16, batch_size=1,
                                 num_epochs=1, max_length=8)
  loader = pipeline.Loader(config, tok)
  with caplog.at_level(logging.WARNING):
    assert len(list(loader)) == 4
  assert loader.stats['upsampled_small'] == 1
  assert ('an image with a 1 px shorter side was upsampled 16x to 16 px (1 so far; counted as '
          'upsampled_small in the loader stats); set data.min_image_size (e.g. 4)') in caplog.text
  skipping = pipeline.Loader(pipeline.dataclasses.replace(config, min_image_size=4), tok)
  assert len(list(skipping)) == 3 and skipping.stats['upsampled_small'] == 0


def test_unknown_dataset_names(tmp_path, caplog):
  """Fault 7: the advice built a different shapes dataset than the config names."""
  data_dir, name = str(tmp_path), 'shapes/s8_n4_h2_seed3_centered'
  with caplog.at_level(logging.INFO):
    assert len(sources.data_source(name, 'train', data_dir)) == 4  # built on demand
  assert f'building {name} in {data_dir}' in caplog.text
  command = (f'python -m ldm_jax.data build shapes --data_dir {data_dir} --image_size 8 '
             '--num_train 2 --num_holdout 1 --seed 0')
  assert command in sources.check_name('shapes/s8_n2_h1_seed0', data_dir, process_count=2)
  with pytest.raises(FileNotFoundError, match=r"'shapes/s32_n10' is not a shapes dataset name: "
                                              r'the format is shapes/s\{size\}_n\{train\}'):
    sources.data_source('shapes/s32_n10', 'train', data_dir)
  message = sources.check_name('image_folder/photos', data_dir)
  assert 'build folder --src DIR' in message and f"holds ['{name}']" in message
  message = sources.check_name('my_dataset', data_dir)
  assert 'data.name takes: shapes/s{size}' in message and 'image_folder/<name>' in message
  assert 'precomputed/<name>' in message and 'array_record' in message


def test_names_and_data_config_are_checked_without_reading_data(tmp_path):
  """Fault 8: start-up checks of data.name and the data config's values."""
  assert sources.check_name('shapes/s8_n2_h1_seed0', str(tmp_path)) is None  # built on demand
  assert 'layout' in sources.check_name('shapes/s8_n2_h1_seed0_grid', str(tmp_path))
  assert 'empty' in sources.check_name('', str(tmp_path))
  with pytest.raises(ValueError, match=r'bad data config: data.batch_size=0: must be an integer '
                                       '>= 1'):
    pipeline.LoaderConfig.from_config({'name': 'x', 'data_dir': 'd', 'batch_size': 0})
  problems = pipeline.LoaderConfig.problems(
      {'name': 'x', 'data_dir': 'd', 'batch_size': -8, 'resolution': 4, 'caption_dropout': 1.5,
       'crop': 'middle', 'num_epochs': 0, 'worker_count': -1})
  assert [p.split('=')[0] for p in problems] == [
      'data.batch_size', 'data.resolution', 'data.crop', 'data.caption_dropout', 'data.num_epochs',
      'data.worker_count']
  assert "data.crop='middle': must be one of ('center', 'random')" in problems
  assert pipeline.LoaderConfig.problems({'name': 'x', 'data_dir': 'd'}) == []
  with pytest.raises(ValueError, match='data.caption_dropout=2: must be a probability'):
    pipeline.LoaderConfig(name='x', data_dir='d', caption_dropout=2)


# ==================================================================================================
# Conversions keep the model: a single file written by ldm_jax converts back to the same configs.
#
# The model is the `make demo` export's kind: v-prediction, VAE scale 0.651, an f=2 VAE, a 16x16
# latent U-Net and a tiny text encoder, none of them on the SD conventions, and a non-default
# scheduler. No torch: the networks are built and filled with random numbers here.
# ==================================================================================================


NETWORKS = ('unet', 'vae', 'text_encoder')
# Every value off diffusers' and SD's defaults, so that a default filled in anywhere shows.
SCHEDULER = {'_class_name': 'DDIMScheduler', 'num_train_timesteps': 500, 'beta_start': 0.0001,
             'beta_end': 0.02, 'beta_schedule': 'linear', 'prediction_type': 'v_prediction',
             'rescale_betas_zero_snr': True, 'steps_offset': 0, 'clip_sample': False,
             'set_alpha_to_one': False, 'timestep_spacing': 'trailing'}


def _components(unet, vae, text, scheduler):
  modules = (unet_lib.UNet2DConditionModel(unet), vae_lib.AutoencoderKL(vae),
             text_lib.CLIPTextModel(text))
  nets = {name: (m, build.random_params(m, seed)) for seed, (name, m) in enumerate(
      zip(NETWORKS, modules))}
  return convert.Components(tokenizer=None, scheduler_config=scheduler, **nets)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
  """The demo-like model, written as demo.safetensors with demo.yaml beside it."""
  components = _components(
      unet_lib.UNetConfig.tiny(
          sample_size=16, block_out_channels=(32, 64, 64), num_attention_heads=4,
          down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
          up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
          cross_attention_dim=64),
      vae_lib.VAEConfig.tiny(scaling_factor=0.651),
      text_lib.TextEncoderConfig.tiny(vocab_size=40, hidden_size=64, intermediate_size=128,
                                      max_position_embeddings=16),
      SCHEDULER)
  path = tmp_path_factory.mktemp('demo')
  file, yaml_path = str(path / 'demo.safetensors'), str(path / 'demo.yaml')
  convert.save_single_file(components, file, config_yaml=yaml_path)
  return components, file, yaml_path


def _assert_same_model(got, want, params=True):
  for name in NETWORKS:
    assert getattr(got, name)[0].config == getattr(want, name)[0].config, name
    if params:
      jax.tree.map(np.testing.assert_array_equal, getattr(got, name)[1], getattr(want, name)[1])
  assert got.scheduler_config == want.scheduler_config


def test_metadata_brings_back_every_config(demo):
  components, file, yaml_path = demo
  metadata = single_file.read_metadata(file)
  assert set(sfc.METADATA_KEYS.values()) < set(metadata) and metadata['format'] == 'pt'
  again, report = single_file.load(file)  # no config, no flags
  _assert_same_model(again, components)
  assert (again.unet[0].config.sample_size, again.vae[0].config.sample_size) == (16, 32)
  assert report.configs_from == 'metadata' and report.scheduler_from == 'metadata'
  assert set(report.settings.sources.values()) == {'metadata'}
  assert f'the YAML beside it ({yaml_path}) was not read' in '\n'.join(report.lines())


def test_flags_win_over_metadata(demo):
  _, file, _ = demo
  mapped = single_file.map_checkpoint(
      st_numpy.load_file(file), metadata=single_file.read_metadata(file),
      prediction_type='epsilon', image_size=64, scaling_factor=0.5)
  unet, vae, text = mapped.configs
  assert set(mapped.settings.sources.values()) == {'argument'}
  assert (unet.sample_size, vae.sample_size, vae.scaling_factor) == (32, 64, 0.5)
  assert mapped.scheduler_config == SCHEDULER | {'prediction_type': 'epsilon'}
  # The rest is still the metadata's: off-convention norm groups, heads and text encoder.
  assert (unet.norm_num_groups, unet.num_attention_heads, text.num_attention_heads) == (
      8, (4, 4, 4), 4)


def _wild(state):
  # A file from the wild: SD 1.x conventions and defaults, whatever the model really was.
  return single_file.map_checkpoint(state)


def test_files_from_the_wild_keep_detection(demo):
  _, file, _ = demo
  mapped = _wild(st_numpy.load_file(file))  # no metadata, no YAML
  s = mapped.settings
  assert (s.image_size, s.prediction_type, s.scaling_factor) == (512, 'epsilon', 0.18215)
  assert set(s.sources.values()) == {'default for SD 1.x'}
  assert mapped.configs_from == 'tensor shapes + SD conventions'
  assert mapped.scheduler_config['_class_name'] == 'PNDMScheduler'


def test_an_edited_yaml_wins_over_its_stale_ldm_jax_section(demo):
  components, file, yaml_path = demo
  state = st_numpy.load_file(file)
  with open(yaml_path) as f:
    original = yaml.safe_load(f)
  exact = single_file.map_checkpoint(state, config_yaml=original)
  assert exact.configs == tuple(getattr(components, n)[0].config for n in NETWORKS)
  assert exact.scheduler_config == SCHEDULER
  assert exact.configs_from == 'original config (its ldm_jax: section)'
  original['model']['params'] |= {'parameterization': 'eps', 'scale_factor': 0.3}
  edited = single_file.map_checkpoint(state, config_yaml=original)
  assert (edited.settings.prediction_type, edited.settings.scaling_factor) == ('epsilon', 0.3)
  assert edited.configs_from == 'tensor shapes + original config'
  assert 'ldm_jax: section was ignored' in edited.notes[0]


def test_openclip_layout_round_trips(tmp_path):
  components = _components(
      unet_lib.UNetConfig.tiny(use_linear_projection=True, upcast_attention=True,
                               sample_size=24, cross_attention_dim=64),
      vae_lib.VAEConfig.tiny(sample_size=48, scaling_factor=0.13025),
      text_lib.TextEncoderConfig.tiny(hidden_size=64, hidden_act='gelu', with_projection=True,
                                      projection_dim=48),
      {'_class_name': 'EulerDiscreteScheduler', 'beta_schedule': 'squaredcos_cap_v2',
       'prediction_type': 'sample', 'num_train_timesteps': 1000})
  file = str(tmp_path / 'sd2.safetensors')
  convert.save_single_file(components, file, dtype=np.float16)
  again, report = single_file.load(file)
  assert str(report.model_type) == 'SD 2.x (openclip text encoder)'
  _assert_same_model(again, components, params=False)  # stored as float16
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y, np.float16)),
               again.text_encoder[1], components.text_encoder[1])


def _modes(*roots):
  """{path: mode} of every file and folder under (and including) the roots."""
  modes = {}
  for root in roots:
    modes[root] = os.stat(root).st_mode
    for folder, dirs, files in os.walk(root) if os.path.isdir(root) else ():
      for name in dirs + files:
        modes[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mode
  return modes


def test_cli_reads_the_yaml_beside_and_writes_with_the_umask(demo, tmp_path, capsys):
  components, file, yaml_path = demo
  # No metadata (written by hand), the YAML beside: its ldm_jax section describes the model.
  src = str(tmp_path / 'src' / 'demo.safetensors')
  os.makedirs(os.path.dirname(src))
  st_numpy.save_file(st_numpy.load_file(file), src)
  shutil.copy(yaml_path, tmp_path / 'src' / 'demo.yaml')
  assert not any(k.startswith('ldm_jax.') for k in single_file.read_metadata(src))
  back, again = str(tmp_path / 'out' / 'demo_back'), str(tmp_path / 'out' / 'again.safetensors')
  mask = os.umask(0o027)  # not the usual 022: the modes must follow the umask, whatever it is
  try:
    assert convert_cli.main(['--src', src, '--to', 'diffusers', '--out', back]) == 0
    assert convert_cli.main(['--src', src, '--to', 'single_file', '--out', again]) == 0
  finally:
    os.umask(mask)
  out = capsys.readouterr().out
  assert f'read the YAML beside it: {os.path.splitext(src)[0]}.yaml' in out
  assert 'prediction v_prediction (YAML beside), VAE scaling factor 0.651 (YAML beside)' in out
  assert 'sample sizes  VAE 32 px, U-Net 16 latent px' in out
  nets = {name: getattr(diffusers_lib, f'load_{name}')(os.path.join(back, name))
          for name in NETWORKS}
  scheduler = diffusers_lib.load_scheduler_config(os.path.join(back, 'scheduler'))
  _assert_same_model(convert.Components(tokenizer=None, scheduler_config=scheduler, **nets),
                     components)
  # Written again as a single file, it carries the same description as the first one.
  assert single_file.read_metadata(again) == single_file.read_metadata(file)
  modes = _modes(back, again, str(tmp_path / 'out' / 'again.yaml'))
  wrong = {p: oct(m & 0o777) for p, m in modes.items()
           if m & 0o777 != (0o750 if os.path.isdir(p) else 0o640)}
  assert len(modes) > 10 and not wrong


# ==================================================================================================
# Everything a user can mistype is caught at start-up, in one message with the fix, before
# anything is written: configs and their arguments, batch, mesh, sharding rules, data names, paths,
# numbers (`train.preflight`), and sample.py's flags and workdirs.
#
# No training and no compilation: the train.py rows run in one subprocess that starts train.py
# several times (a fresh interpreter: train.py and sample.py both define --config); the rest is
# in-process.
# ==================================================================================================


def _config(tmp_path, spec='ldm,runlocal', **overrides):
  """The shapes config with a data_dir under tmp_path (a shapes dataset is built on demand)."""
  c = shapes.get_config(spec)
  c.data.data_dir = str(tmp_path / 'data')
  c.allow_random_vae = True
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()  # as absl hands it over
  return c


def _problems(tmp_path, num_devices=8, workdir=None, **overrides):
  """preflight's problems for the shapes config with `overrides`; asserts nothing was written."""
  workdir = workdir or str(tmp_path / 'run')
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(preflight.ConfigError) as info:
    preflight.check(_config(tmp_path, **overrides), workdir, num_devices=num_devices)
  assert sorted(os.listdir(tmp_path)) == before  # no workdir, nothing else
  return info.value


# train.py end to end, in one subprocess: each case is (argv, workdir that must not appear).

_DRIVER = textwrap.dedent('''
    import contextlib, io, json, runpy, sys, traceback
    from absl import flags
    results = []
    for argv in json.loads(sys.argv[1]):
      before, err, code, raised = set(flags.FLAGS), io.StringIO(), None, None
      sys.argv = argv
      with contextlib.redirect_stderr(err):
        try:
          runpy.run_path(argv[0], run_name='__main__')
        except SystemExit as e:
          code = e.code
        except BaseException:  # a traceback: what these cases must never give
          raised = traceback.format_exc()
      for name in set(flags.FLAGS) - before:  # the next script defines its own flags afresh
        if flags.FLAGS.find_module_defining_flag(name) in (argv[0], '__main__'):
          delattr(flags.FLAGS, name)
      results.append({'code': code, 'stderr': err.getvalue(), 'raised': raised})
    print('RESULTS ' + json.dumps(results))
''')


@pytest.fixture(scope='module')
def entry_points(tmp_path_factory):
  """{case: (result, workdir)} of train.py/sample.py runs with mistakes, in one subprocess."""
  tmp = tmp_path_factory.mktemp('entry')
  shapes_py = os.path.join(ROOT, 'configs', 'shapes.py')
  data = f'--config.data.data_dir={tmp / "data"}'
  cases = {
      'typo_stage': ['train.py', '--config', f'{shapes_py}:vea,runlocal'],
      'variant_as_stage': ['train.py', f'--config={shapes_py}:runlocal'],
      'missing_config': ['train.py', '--config', str(tmp / 'nope.py')],
      'preflight': ['train.py', '--config', f'{shapes_py}:ldm,runlocal', data,
                    '--config.data.batch_size=0', "--config.mesh=(('data', -1), ('fsdp', 3))"],
      'sample_missing_config': ['sample.py', '--config', str(tmp / 'nope.py'), '--prompt=x'],
  }
  argvs = [argv + [f'--workdir={tmp / name}'] if argv[0] == 'train.py' else argv + [
      f'--out={tmp / name}'] for name, argv in cases.items()]
  out = subprocess.run([sys.executable, '-c', _DRIVER, json.dumps(argvs)], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULTS ')]
  assert lines, (out.stdout + out.stderr)[-4000:]
  results = json.loads(lines[-1][len('RESULTS '):])
  return {name: (r, tmp / name) for name, r in zip(cases, results)}


def _one_error_line(result, workdir):
  """The error line of a case that must exit 2 with `error: ...`, no traceback, nothing written."""
  assert result['raised'] is None, result['raised']
  assert result['code'] == 2, result
  assert result['stderr'].startswith('error: '), result['stderr']
  assert 'Traceback' not in result['stderr']
  assert not os.path.exists(workdir)
  return result['stderr']


@pytest.mark.parametrize('case, message', [
    ('typo_stage', "error: configs/shapes.py:vea,runlocal: 'vea' is not a stage; the argument is "
                   'a stage (vae, ldm, clip), then optionally runlocal, e.g. '
                   'configs/shapes.py:ldm,runlocal'),
    ('variant_as_stage', "'runlocal' is a variant, not a stage"),
])
def test_train_refuses_an_unknown_stage_or_variant(entry_points, case, message):
  assert message in _one_error_line(*entry_points[case])


@pytest.mark.parametrize('case', ['missing_config', 'sample_missing_config'])
def test_a_missing_config_file_is_one_line(entry_points, case):
  result, workdir = entry_points[case]
  err = _one_error_line(result, workdir)
  assert err.splitlines() == [f"error: config file '{workdir.parent / 'nope.py'}' does not exist"]


def test_train_preflight_error_is_one_message_and_no_workdir(entry_points):
  err = _one_error_line(*entry_points['preflight'])
  assert err.startswith('error: bad training config (3 problems):\n  - ')
  assert 'data.batch_size=0: must be an integer >= 1' in err
  assert "mesh [('data', -1), ('fsdp', 3)] needs a multiple of 3 devices; there are 1" in err
  assert 'the ldm stage needs a trained VAE: set --config.vae_workdir=' in err


@pytest.mark.parametrize('spec, message', [
    ('shapes.py:vea,runlocal', "'vea' is not a stage; the argument is a stage (vae, ldm, clip)"),
    ('shapes.py:runlocal', "'runlocal' is a variant, not a stage"),
    ('shapes.py:ldm,runlcal', "unknown variant 'runlcal'"),
    ('sd15.py:finetuen', "unknown variant 'finetuen'; the argument is any of finetune, scratch, "
                         'runlocal, comma-separated, e.g. configs/sd15.py:finetune,runlocal'),
    ('sd21.py:finetune,scratch', 'choose finetune or scratch, not both'),
    ('tiny.py:runlocal', 'configs/tiny.py takes no argument'),
])
def test_every_config_refuses_unknown_arguments(spec, message):
  with pytest.raises(ValueError) as info:
    config_check.load_config(os.path.join(ROOT, 'configs', spec))
  assert message in str(info.value)
  assert config_check.startup_problem(['x', f'--config={ROOT}/configs/{spec}']) == str(info.value)


def test_stage_must_be_a_stage_and_the_configs_know_them_all(tmp_path):
  assert sorted(common.STAGES) == sorted(stages.STAGES)
  err = _problems(tmp_path, stage='vea')
  assert "stage 'vea' is not one of ldm, vae, clip" in str(err)


def test_a_good_config_passes_and_its_paths_are_stored_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'tok').mkdir()
  c = _config(tmp_path, **{'data.data_dir': 'data', 'tokenizer': 'tok'})
  assert preflight.check(c, 'runs/x', num_devices=8) is c
  assert c.data.data_dir == str(tmp_path / 'data') and c.tokenizer == str(tmp_path / 'tok')
  c = _config(tmp_path)
  preflight.check(c, 'runs/x', num_devices=8)
  assert c.tokenizer == 'shapes'  # a name, not a path
  assert sorted(os.listdir(tmp_path)) == ['tok']


def test_batch_size_zero_or_not_divisible(tmp_path):
  err = _problems(tmp_path, **{'data.batch_size': 0})
  assert err.problems == ['data.batch_size=0: must be an integer >= 1']
  err = _problems(tmp_path, **{'data.batch_size': 12, 'optim.grad_accum': 5})
  assert err.problems == [
      'global batch 12 (data.batch_size) is not divisible by 8 devices: make it a multiple of 8, '
      'e.g. --config.data.batch_size=8 or 16',
      'data.batch_size 12 is not divisible by optim.grad_accum 5 (the batch is split into that '
      'many micro-batches): e.g. --config.optim.grad_accum=1']


def test_mesh_must_fit_the_devices_with_known_axes(tmp_path):
  err = _problems(tmp_path, mesh=(('data', 2), ('fsdp', 2)))
  assert err.problems == ["mesh [('data', 2), ('fsdp', 2)] needs 4 devices; there are 8: e.g. "
                          "--config.mesh=\"(('data', -1), ('fsdp', 2))\""]
  err = _problems(tmp_path, mesh=(('data', -1), ('fdsp', 2)))
  assert "mesh axis 'fdsp' is not one of data, fsdp" in str(err)
  assert sharding.mesh_problems((('data', -1), ('model', 2)), 8, ('data', 'fsdp', 'model')) == []


def test_sharding_rules_that_can_never_apply(tmp_path):
  err = _problems(tmp_path, **{'sharding.rules': [('(unet', 'fsdp'), ('.*', 'shard')]})
  assert "sharding.rules[0] regex '(unet' does not compile" in err.problems[0]
  assert "sharding.rules[1] spec 'shard' is not 'replicate' or 'fsdp'" in err.problems[1]
  # Rules that match no parameter (or only ones an earlier rule takes), once the shapes exist.
  tree = {'params': {'unet': {'conv_in': {'kernel': jax.ShapeDtypeStruct((3, 3), np.float32)}}}}
  rules = [('.*', 'fsdp'), ('unet', 'replicate'), ('vea', 'fsdp')]
  assert sharding.unmatched_rules(rules, tree) == [
      "sharding.rules[1] ('unet', 'replicate') shards nothing: every path it matches (e.g. "
      "'params/unet/conv_in/kernel') is taken by an earlier rule: put it before them",
      "sharding.rules[2] ('vea', 'fsdp') shards nothing: it matches no parameter path (they look "
      "like 'params/unet/conv_in/kernel')"]


def test_data_name_scheme(tmp_path):
  err = _problems(tmp_path, **{'data.name': 'shapes/s32_n64'})
  assert 'shapes/s32_n64' in str(err) and 'shapes/s{size}_n{train}' in str(err)
  err = _problems(tmp_path, **{'data.name': 'image_folder/mine'})
  assert "'image_folder/mine'" in str(err) and 'build folder' in str(err)


def test_paths_that_do_not_exist(tmp_path):
  (tmp_path / 'empty_run').mkdir()
  err = _problems(tmp_path, vae_workdir=str(tmp_path / 'nope'), init=str(tmp_path / 'sd15'),
                  resume=str(tmp_path / 'empty_run'), tokenizer=str(tmp_path / 'tok'),
                  **{'text_encoder.workdir': str(tmp_path / 'clip')})
  text = str(err)
  assert len(err.problems) == 5, text
  assert f"init '{tmp_path / 'sd15'}' does not exist: it must name a diffusers folder" in text
  assert f"resume '{tmp_path / 'empty_run'}' holds no checkpoint" in text
  assert f"vae_workdir '{tmp_path / 'nope'}' does not exist: it must name a vae-stage run" in text
  assert f"tokenizer '{tmp_path / 'tok'}' does not exist" in text
  assert 'text_encoder.workdir' in text


def test_workdir_read_only_or_under_a_file(tmp_path, monkeypatch):
  (tmp_path / 'a_file').write_text('')
  err = _problems(tmp_path, workdir=str(tmp_path / 'a_file' / 'run'))
  assert f"--workdir '{tmp_path / 'a_file' / 'run'}' cannot be created: " in str(err)
  assert 'is a file, not a folder' in str(err)
  read_only = tmp_path / 'ro'
  read_only.mkdir()
  real_statvfs = os.statvfs

  def statvfs(path):  # a read-only filesystem (EROFS), which even root cannot write
    result = real_statvfs(path)
    if os.path.abspath(path) == str(read_only):
      return mock.Mock(f_flag=result.f_flag | os.ST_RDONLY)
    return result

  monkeypatch.setattr(os, 'statvfs', statvfs)
  err = _problems(tmp_path, workdir=str(read_only / 'run'))
  assert err.problems == [f"--workdir '{read_only / 'run'}' cannot be created: '{read_only}' is "
                          'on a read-only filesystem; pick a folder you can write (or fix its '
                          'permissions)']
  assert not os.listdir(read_only)


def test_numbers_out_of_range_all_at_once(tmp_path):
  err = _problems(tmp_path, num_steps=0, ckpt_every=0, log_every=-1, keep_checkpoints=0,
                  **{'optim.lr': 0.0, 'ema.decay': 1.5, 'data.caption_dropout': 2.0,
                     'sample.guidance': -3.0, 'sample.sampler': 'plms'})
  text = str(err)
  assert text.startswith('bad training config (9 problems):\n  - num_steps is 0; it must be an '
                         'integer >= 1 (e.g. --config.num_steps=1000)')
  for words in ('ckpt_every is 0', 'log_every is -1', 'keep_checkpoints is 0',
                'optim.lr is 0.0; it must be a number > 0', 'ema.decay is 1.5; it must be a number '
                'in [0, 1]', 'data.caption_dropout=2.0: must be a probability in [0, 1]',
                'sample.guidance is -3.0; it must be a number >= 0',
                "sample.sampler is 'plms'; choose one of ddpm, ddim"):
    assert words in text, words


# sample.py, in-process (as tests/test_sampling.py runs it).


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Fake training workdirs: a vae run, an ldm run whose config keeps a relative vae_workdir
  (a run from before preflight resolved them), and a workdir with no checkpoint."""
  tmp = tmp_path_factory.mktemp('runs')
  vae = str(tmp / 'vae')
  _save_run(vae, shapes.get_config('vae,runlocal'))
  config = shapes.get_config('ldm,runlocal')
  config.vae_workdir = os.path.join('runs', 'demo', 'vae')  # relative, as older runs kept it
  _save_run(str(tmp / 'ldm'), config)
  (tmp / 'empty').mkdir()
  return tmp


def _save_run(workdir, config):
  """A checkpoint as training writes it (a tiny state: only its config is read here)."""
  state = {'step': np.asarray(1, np.int32), 'ema_params': {'w': np.zeros(2, np.float32)}}
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(1, state, {}, json.loads(config.to_json_best_effort()))
  ckpt.close()


def _sample(monkeypatch, capsys, *args):
  """Runs sample.py's main as its __main__ does: (exit code, stderr)."""
  monkeypatch.syspath_prepend(ROOT)
  module = importlib.import_module('sample')
  argv = ['sample.py', *args]
  with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', argv), \
      pytest.raises(SystemExit) as info:
    module._one_line_errors(flags.FLAGS(argv))  # pylint: disable=protected-access
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  return info.value.code, err


def _png(path, size):
  Image.new('RGB', size).save(path)
  return str(path)


def test_sample_guidance_below_zero_is_refused(tmp_path, monkeypatch, capsys):
  code, err = _sample(monkeypatch, capsys, f'--init={tmp_path}', '--prompt=x', '--guidance=-3',
                      f'--out={tmp_path / "out"}')
  assert code == 2
  assert err.startswith('error: bad sampling request:\n  --guidance is -3.0; it must be >= 0: '
                        'values above 1 strengthen classifier-free guidance')
  assert not (tmp_path / 'out').exists()


def test_sample_mask_of_another_size_is_refused(tmp_path, monkeypatch, capsys):
  init, mask = _png(tmp_path / 'in.png', (48, 32)), _png(tmp_path / 'm.png', (64, 64))
  code, err = _sample(monkeypatch, capsys, f'--init={tmp_path}', '--prompt=x',
                      f'--init_image={init}', f'--mask={mask}', f'--out={tmp_path / "out"}')
  assert code == 2
  assert (f"--mask '{mask}' is 64x64 but --init_image '{init}' is 48x32: it would be stretched "
          'over the image; resize the mask to 48x32') in err
  assert not (tmp_path / 'out').exists()


def test_sample_a_vae_run_says_what_to_do_instead(runs, monkeypatch, capsys):
  code, err = _sample(monkeypatch, capsys, f'--workdir={runs / "vae"}', '--prompt=x',
                      f'--out={runs / "out"}')
  assert code == 2
  assert f"{runs / 'vae'} trained the 'vae' stage; sampling needs an ldm run" in err
  assert f'its reconstructions are in {runs / "vae"}/samples' in err
  assert f'--config.vae_workdir={runs / "vae"}' in err
  assert not (runs / 'out').exists()


def test_sample_a_workdir_without_checkpoint(runs, monkeypatch, capsys):
  code, err = _sample(monkeypatch, capsys, f'--workdir={runs / "empty"}', '--prompt=x',
                      f'--out={runs / "out"}')
  assert code == 2
  assert err.startswith(f"error: training workdir '{runs / 'empty'}' holds no checkpoint")
  assert len(err.strip().splitlines()) == 1
  assert os.listdir(runs / 'empty') == []


def test_sample_a_moved_run_names_its_vae_source_and_the_flag(runs, monkeypatch, capsys):
  monkeypatch.chdir(runs / 'empty')
  code, err = _sample(monkeypatch, capsys, f'--workdir={runs / "ldm"}', '--prompt=x',
                      f'--out={runs / "out"}')
  assert code == 2
  stored = os.path.join('runs', 'demo', 'vae')
  assert (f"the run's VAE comes from its vae_workdir '{stored}' (resolved against the current "
          f"directory to '{runs / 'empty' / stored}'), which holds no checkpoint: the run was "
          'perhaps moved or copied; pass --vae_workdir=') in err
  # --vae_workdir replaces it: the networks are then built from that run.
  seen = []

  def ldm_weights(config, train_text):
    seen.append(config.vae_workdir)
    raise ValueError('stop here')

  monkeypatch.setattr(weights, 'ldm_weights', ldm_weights)
  monkeypatch.setattr(weights, 'run_tokenizer', lambda workdir, config: [0] * 10)
  code, err = _sample(monkeypatch, capsys, f'--workdir={runs / "ldm"}', '--prompt=x',
                      f'--vae_workdir={runs / "vae"}', f'--out={runs / "out"}')
  assert (code, err, seen) == (2, 'error: stop here\n', [str(runs / 'vae')])
  assert not (runs / 'out').exists()
