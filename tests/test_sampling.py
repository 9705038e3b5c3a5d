"""sample.py and ldm_jax.sampling: prompts, batches, seeds, files, model sources and bad input.

A fake pipeline stands in for StableDiffusion, so nothing here but the training-workdir tests
compiles JAX code.
"""

import hashlib
import importlib
import inspect
import json
import os
import sys
import types
from unittest import mock

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from ldm_jax import convert
from ldm_jax import weights
from ldm_jax.sampling import outputs
from ldm_jax.sampling import run
from ldm_jax.sampling import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ('ddpm', 'ddim', 'pndm', 'dpmpp_2m', 'dpmpp_2m_karras', 'euler', 'euler_a')
NATIVE = 16  # the fake model's native size


class FakeStableDiffusion:
  """StableDiffusion's signature; image k of a call is (seed, k, len(prompt)) in every pixel."""
  vae_scale = 8

  def __init__(self, components=None):
    self.components = components
    self.calls = []

  def generate(self, prompts, *, negative_prompts=None, steps=50, sampler='ddim',
               guidance_scale=7.5, seed=0, height=None, width=None, latents=None,
               init_images=None, strength=None, masks=None, progress=None):
    self.calls.append(dict(prompts=prompts, negative_prompts=negative_prompts, steps=steps,
                           sampler=sampler, guidance_scale=guidance_scale, seed=seed,
                           height=height, width=width, latents=latents,
                           init_images=init_images, strength=strength, masks=masks))
    for i in range(steps):
      if progress:
        progress(i + 1, steps)
    images = np.zeros((len(prompts), height or NATIVE, width or NATIVE, 3), np.uint8)
    images[..., 0] = seed
    images[..., 1] = np.arange(len(prompts))[:, None, None]
    images[..., 2] = np.array([len(p) for p in prompts])[:, None, None]
    return images


FAKE_PIPELINE = types.SimpleNamespace(SAMPLERS=SAMPLERS, StableDiffusion=FakeStableDiffusion)


def _png(path, size=(40, 24), mode='RGB', color=(255, 0, 0)):
  """Writes a solid image of (width, height) `size`; returns its path."""
  Image.new(mode, size, color).save(path)
  return str(path)


def _run(tmp_path, **kw):
  request = run.Request(**{'prompts': ('a cat',), 'out_dir': str(tmp_path / 'out'), **kw})
  run.validate(request, SAMPLERS, 8)
  sd = FakeStableDiffusion()
  lines = []
  recs = run.run(sd, request, log=lines.append)
  return sd, recs, lines, request.out_dir


# outputs: grid, files, init images and masks.


@pytest.mark.parametrize('n, cols, shape', [
    (1, None, (8, 6, 3)), (4, None, (16, 12, 3)), (5, None, (16, 18, 3)), (3, 1, (24, 6, 3)),
    (2, 5, (8, 12, 3))])
def test_make_grid_shapes(n, cols, shape):
  assert outputs.make_grid(np.ones((n, 8, 6, 3), np.uint8), cols).shape == shape


def test_make_grid_places_images_row_major_and_pads_black():
  images = np.arange(1, 6, dtype=np.uint8)[:, None, None, None] * np.ones((5, 2, 3, 1), np.uint8)
  grid = outputs.make_grid(images)[..., 0]  # 2 rows x 3 cols of 2x3 tiles
  assert grid[::2, ::3].tolist() == [[1, 2, 3], [4, 5, 0]]


def test_make_grid_rejects_no_images():
  with pytest.raises(ValueError, match='non-empty'):
    outputs.make_grid(np.zeros((0, 8, 8, 3), np.uint8))


def test_write_samples_writes_pngs_jsonl_and_grid(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (3, 8, 16, 3), dtype=np.uint8)
  recs = [{'prompt': f'p{i}', 'seed': i} for i in range(3)]
  written = outputs.write_samples(str(tmp_path), images, recs)
  assert [r['file'] for r in written] == ['000000.png', '000001.png', '000002.png']
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / '000002.png')), images[2])
  assert outputs.read_records(str(tmp_path)) == written
  assert np.asarray(Image.open(tmp_path / 'grid.png')).shape == (16, 32, 3)
  outputs.write_samples(str(tmp_path), images[:1], [{'prompt': 'q', 'seed': 9}], start=3)
  assert [r['file'] for r in outputs.read_records(str(tmp_path))][-1] == '000003.png'
  assert len(outputs.read_records(str(tmp_path))) == 4


def test_load_image_resizes_to_rgb_in_minus_one_one(tmp_path):
  for mode, color in (('RGB', (255, 0, 0)), ('RGBA', (255, 0, 0, 0)), ('L', 255)):
    image = outputs.load_image(_png(tmp_path / f'{mode}.png', mode=mode, color=color), 16, 32)
    assert image.shape == (16, 32, 3) and image.dtype == np.float32
    assert image.min() >= -1 and image.max() <= 1 and image[0, 0, 0] == 1


def test_load_mask_is_single_channel_zero_one(tmp_path):
  mask = outputs.load_mask(_png(tmp_path / 'm.png', color=(255, 255, 255)), 8, 24)
  assert mask.shape == (8, 24, 1) and mask.dtype == np.float32
  np.testing.assert_allclose(mask, 1.0)
  assert outputs.load_mask(_png(tmp_path / 'k.png', mode='L', color=0), 8, 8).max() == 0


def test_image_size_rounds_down_to_multiples_of_8(tmp_path):
  assert outputs.image_size(_png(tmp_path / 'a.png', size=(45, 30)), 8) == (24, 40)
  with pytest.raises(ValueError, match='at least 8x8'):
    outputs.image_size(_png(tmp_path / 'b.png', size=(7, 30)), 8)


def test_image_size_rounds_to_the_vae_factor(tmp_path):
  assert outputs.image_size(_png(tmp_path / 'a.png', size=(45, 31)), 2) == (30, 44)  # f=2 VAE
  with pytest.raises(ValueError, match='at least 16x16'):
    outputs.image_size(_png(tmp_path / 'b.png', size=(15, 30)), 16)


def test_missing_or_unreadable_image_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.png'):
    outputs.load_image(str(tmp_path / 'nope.png'), 8, 8)
  (tmp_path / 'text.png').write_text('not an image')
  with pytest.raises(ValueError, match='text.png'):
    outputs.load_mask(str(tmp_path / 'text.png'), 8, 8)


# run: prompts, batches, seeds, records.


def test_read_prompts_joins_flags_and_file_skipping_blanks(tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('a dog\n\n  a red car  \n\n')
  assert run.read_prompts(['a cat'], str(path)) == ['a cat', 'a dog', 'a red car']
  assert run.read_prompts([], None) == []
  with pytest.raises(ValueError, match='missing.txt'):
    run.read_prompts([], str(tmp_path / 'missing.txt'))


def test_plan_batches_expands_prompts_seeds_calls_and_pads_the_last():
  request = run.Request(prompts=('a', 'b'), num_images=3, batch_size=4, seed=10)
  batches = run.plan_batches(request)
  assert [b.prompts for b in batches] == [('a', 'a', 'a', 'b'), ('b', 'b', 'b', 'b')]
  assert [(b.seed, b.start, b.num_real) for b in batches] == [(10, 0, 4), (11, 4, 2)]


def test_plan_batches_never_calls_bigger_than_needed():
  batches = run.plan_batches(run.Request(prompts=('a',), batch_size=8))
  assert [(b.prompts, b.num_real) for b in batches] == [(('a',), 1)]


def test_run_writes_every_image_with_the_seed_that_made_it(tmp_path):
  sd, recs, lines, out = _run(tmp_path, prompts=('a cat', 'a dog!'), num_images=3, batch_size=2,
                              seed=5, steps=7, sampler='euler_a', guidance=3.0,
                              negative_prompt='blurry')
  assert [c['seed'] for c in sd.calls] == [5, 6, 7]
  assert all(c['steps'] == 7 and c['sampler'] == 'euler_a' and c['guidance_scale'] == 3.0
             and c['negative_prompts'] == ['blurry', 'blurry'] and c['init_images'] is None
             for c in sd.calls)
  assert outputs.read_records(out) == recs
  assert [(r['file'], r['prompt'], r['seed'], r['index_in_call']) for r in recs] == [
      ('000000.png', 'a cat', 5, 0), ('000001.png', 'a cat', 5, 1), ('000002.png', 'a cat', 6, 0),
      ('000003.png', 'a dog!', 6, 1), ('000004.png', 'a dog!', 7, 0),
      ('000005.png', 'a dog!', 7, 1)]
  assert recs[0] == {'file': '000000.png', 'prompt': 'a cat', 'negative_prompt': 'blurry',
                     'seed': 5, 'sampler': 'euler_a', 'steps': 7, 'guidance': 3.0,
                     'index_in_call': 0, 'batch_size': 2}
  for r in recs:  # the fake paints (seed, index in call, len(prompt)): each file is its record's
    pixel = np.asarray(Image.open(os.path.join(out, r['file'])))[0, 0]
    assert pixel.tolist() == [r['seed'], r['index_in_call'], len(r['prompt'])]
  assert np.asarray(Image.open(os.path.join(out, 'grid.png'))).shape == (2 * NATIVE, 3 * NATIVE, 3)
  assert len(lines) == 5 and '6/6 images' in lines[-2] and 'images/s, ETA' in lines[-2]


def test_run_drops_the_padding_of_the_last_call(tmp_path):
  sd, recs, _, out = _run(tmp_path, num_images=3, batch_size=2)
  assert [len(c['prompts']) for c in sd.calls] == [2, 2]
  assert len(recs) == 3 and not os.path.exists(os.path.join(out, '000003.png'))
  assert recs[-1]['batch_size'] == 2


def test_run_passes_and_records_size_only_when_given(tmp_path):
  sd, recs, _, _ = _run(tmp_path)
  assert sd.calls[0]['height'] is None and 'height' not in recs[0] and 'strength' not in recs[0]
  sd, recs, _, _ = _run(tmp_path, height=24, width=40)
  assert (sd.calls[0]['height'], sd.calls[0]['width']) == (24, 40)
  assert (recs[0]['height'], recs[0]['width']) == (24, 40)


def test_run_img2img_and_inpainting(tmp_path):
  init = _png(tmp_path / 'init.png', size=(45, 30))
  mask = _png(tmp_path / 'mask.png', size=(45, 30), mode='L', color=255)
  sd, recs, _, _ = _run(tmp_path, init_image=init)
  assert sd.calls[0]['strength'] == 0.8 and recs[0]['strength'] == 0.8  # img2img's default
  sd, recs, _, _ = _run(tmp_path, init_image=init, strength=0.5, num_images=2, batch_size=2)
  call = sd.calls[0]
  assert (call['height'], call['width'], call['strength']) == (24, 40, 0.5)  # the image's size
  assert call['init_images'].shape == (2, 24, 40, 3) and call['masks'] is None
  assert recs[0]['init_image'] == init and recs[0]['strength'] == 0.5 and recs[0]['height'] == 24
  sd, recs, _, _ = _run(tmp_path, init_image=init, mask=mask, height=16, width=16)
  assert sd.calls[0]['init_images'].shape == (1, 16, 16, 3) and sd.calls[0]['strength'] == 1.0
  assert sd.calls[0]['masks'].shape == (1, 16, 16, 1) and sd.calls[0]['masks'].min() == 1
  assert recs[0]['mask'] == mask


@pytest.mark.parametrize('kw, message', [
    (dict(sampler='plms'), "unknown sampler 'plms': choose one of ddpm, ddim, pndm, dpmpp_2m, "
                           'dpmpp_2m_karras, euler, euler_a'),
    (dict(height=100), '--height 100 is not a positive multiple of 8 .* try 96'),
    (dict(width=0), '--width 0 is not a positive multiple of 8'),
    (dict(prompts=()), 'no prompts: pass --prompt'),
    (dict(mask='m.png'), '--mask needs --init_image'),
    (dict(init_image='missing.png'), "--init_image 'missing.png' does not exist"),
    (dict(init_image='README.md', mask='missing.png'), "--mask 'missing.png' does not exist"),
    (dict(init_image='README.md', strength=0.0), r'--strength 0.0 is outside \(0, 1\]'),
    (dict(strength=1.5), r'--strength 1.5 is outside \(0, 1\]'),
    (dict(steps=0), '--steps is 0; it must be at least 1'),
    (dict(num_images=0), '--num_images is 0'),
    (dict(batch_size=-1), '--batch_size is -1'),
], ids=lambda x: None if isinstance(x, dict) else x.split(' ')[0])
def test_validate_rejects_bad_input_with_the_fix(kw, message, monkeypatch):
  monkeypatch.chdir(ROOT)
  request = run.Request(**{'prompts': ('a cat',), **kw})
  with pytest.raises(ValueError, match=message):
    run.validate(request, SAMPLERS, 8)


def test_validate_lists_every_problem_at_once():
  request = run.Request(prompts=('a',), sampler='x', height=30, mask='m.png')
  with pytest.raises(ValueError) as info:
    run.validate(request, SAMPLERS, 8)
  assert str(info.value).count('\n  ') == 4  # sampler, height, mask without init, mask missing


def test_validate_checks_sizes_against_the_vae_factor_once_known():
  request = run.Request(prompts=('a',), height=36, width=20)
  run.validate(request, SAMPLERS)  # before the weights load: no factor yet
  run.validate(request, SAMPLERS, 2)  # an f=2 VAE (the shapes one)
  with pytest.raises(ValueError, match='--height 36 is not a positive multiple of 8 .* try 32'):
    run.validate(request, SAMPLERS, 8)


def test_resolve_model(tmp_path):
  config = ml_collections.ConfigDict({'init': str(tmp_path), 'model': {
      'dtype': 'bfloat16', 'param_dtype': 'float32'}})
  assert sources.resolve_model(config=config) == sources.ModelSource(
      str(tmp_path), 'bfloat16', 'float32')
  assert sources.resolve_model(init=str(tmp_path), dtype='float16') == (
      sources.ModelSource(str(tmp_path), 'float16', 'float16'))
  with pytest.raises(ValueError, match='either --workdir'):
    sources.resolve_model(init=str(tmp_path), workdir='/ckpt')
  with pytest.raises(ValueError, match="workdir '/ckpt' does not exist"):
    sources.resolve_model(workdir='/ckpt')
  assert sources.resolve_model(workdir=str(tmp_path)).kind == 'workdir'
  with pytest.raises(ValueError, match='nothing to sample from'):
    sources.resolve_model(config=ml_collections.ConfigDict({'init': ''}))
  with pytest.raises(ValueError, match="'/no/such' does not exist"):
    sources.resolve_model(init='/no/such')


def test_resolve_model_single_file_needs_a_tokenizer(tmp_path):
  ckpt, tok = tmp_path / 'model.safetensors', tmp_path / 'tokenizer'
  ckpt.write_bytes(b'')
  tok.mkdir()
  with pytest.raises(ValueError, match='holds no tokenizer: pass --tokenizer DIR'):
    sources.resolve_model(init=str(ckpt))
  assert sources.resolve_model(init=str(ckpt), tokenizer=str(tok)) == sources.ModelSource(
      str(ckpt), 'float32', 'float32', kind='single_file', tokenizer=str(tok))
  config = ml_collections.ConfigDict({'init': str(ckpt), 'tokenizer': str(tok), 'model': {
      'dtype': 'bfloat16', 'param_dtype': 'float32'}})
  assert sources.resolve_model(config=config).tokenizer == str(tok)
  with pytest.raises(ValueError, match="tokenizer folder '/no/tok' does not exist"):
    sources.resolve_model(init=str(ckpt), tokenizer='/no/tok')
  (tmp_path / 'model.bin').write_bytes(b'')
  with pytest.raises(ValueError, match=r'not an original checkpoint \(.safetensors or .ckpt\)'):
    sources.resolve_model(init=str(tmp_path / 'model.bin'), tokenizer=str(tok))
  with pytest.raises(ValueError, match='--tokenizer does not go with --workdir'):
    sources.resolve_model(workdir=str(tmp_path), tokenizer=str(tok))


def test_resolve_model_rejects_an_unknown_dtype(tmp_path):
  with pytest.raises(ValueError, match="--dtype 'bf16' is not a dtype: try float32, bfloat16"):
    sources.resolve_model(init=str(tmp_path), dtype='bf16')


def test_load_passes_dtypes_and_tokenizer_to_the_converter(monkeypatch):
  calls = []
  monkeypatch.setattr(convert, 'load_single_file', lambda path, **kw: calls.append((path, kw)))
  source = sources.ModelSource('m.ckpt', 'bfloat16', 'float32', 'single_file', '/tok')
  sources.load(source)
  assert calls == [('m.ckpt', {'tokenizer': '/tok', 'dtype': np.dtype('bfloat16'),
                               'param_dtype': np.dtype('float32')})]


def test_the_real_pipeline_takes_our_arguments():
  pipeline = pytest.importorskip('ldm_jax.diffusion.pipeline')
  request = run.Request(prompts=('a',), negative_prompt='b', init_image='i', mask='m')
  cond = {'height': 8, 'width': 8, 'init_image': np.zeros((8, 8, 3)), 'mask': np.ones((8, 8, 1))}
  batch = run.plan_batches(request)[0]
  used = set(run.generate_kwargs(request, batch, cond, progress=print))
  assert used <= set(inspect.signature(pipeline.StableDiffusion.generate).parameters)
  assert tuple(pipeline.SAMPLERS) == SAMPLERS


def test_duration():
  assert [run._duration(s) for s in (0.2, 59, 61, 3725)] == ['1s', '59s', '1m01s',
                                                                       '1h02m']


# sample.py end to end, flags in, files out.


@pytest.fixture
def sample(monkeypatch):
  """sample.py with the fake pipeline; `sample.loaded` lists the weights it asked for."""
  monkeypatch.syspath_prepend(ROOT)
  module = importlib.import_module('sample')
  monkeypatch.setattr(module, 'pipeline', FAKE_PIPELINE)
  loaded = []
  monkeypatch.setattr(convert, 'load_diffusers', lambda path, **kw: loaded.append((path, kw)))
  monkeypatch.setattr(convert, 'load_single_file',
                      lambda path, **kw: loaded.append((path, kw)))
  module.loaded = loaded
  return module


def _main(sample, *args):
  argv = ['sample.py', *args]
  # config_flags reads its --config.* overrides from sys.argv.
  with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', argv):
    sample.main(flags.FLAGS(argv))


def test_sample_main_writes_samples(sample, tmp_path, capsys):
  out = tmp_path / 'out'
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('a dog\n\na bird\n')
  _main(sample, f'--init={tmp_path}', '--prompt=a cat', f'--prompts_file={prompts}',
        '--num_images=2', '--batch_size=3', '--steps=4', '--sampler=dpmpp_2m', '--seed=1',
        f'--out={out}', '--dtype=bfloat16')
  assert sample.loaded[0][0] == str(tmp_path)
  assert str(sample.loaded[0][1]['dtype']) == 'bfloat16'
  recs = outputs.read_records(str(out))
  assert [r['prompt'] for r in recs] == ['a cat', 'a cat', 'a dog', 'a dog', 'a bird', 'a bird']
  assert [r['seed'] for r in recs] == [1, 1, 1, 2, 2, 2]
  assert sorted(os.listdir(out)) == [f'{i:06d}.png' for i in range(6)] + ['grid.png',
                                                                           'samples.jsonl']
  assert 'call 2/2 (seed 2): 6/6 images' in capsys.readouterr().out


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # config_flags' loader
def test_sample_main_reads_init_from_config(sample, tmp_path):
  _main(sample, f'--config={ROOT}/configs/tiny.py', f'--config.init={tmp_path}', '--prompt=x',
        f'--out={tmp_path / "out"}')
  assert sample.loaded[0][0] == str(tmp_path)
  assert json.loads((tmp_path / 'out' / 'samples.jsonl').read_text())['sampler'] == 'ddim'


def test_sample_main_from_a_single_file(sample, tmp_path):
  ckpt, tok = tmp_path / 'model.ckpt', tmp_path / 'tokenizer'
  ckpt.write_bytes(b'')
  tok.mkdir()
  _main(sample, f'--init={ckpt}', f'--tokenizer={tok}', '--prompt=x', f'--out={tmp_path / "out"}')
  assert sample.loaded[0][0] == str(ckpt) and sample.loaded[0][1]['tokenizer'] == str(tok)
  assert len(outputs.read_records(str(tmp_path / 'out'))) == 1


@pytest.mark.parametrize('args, message', [
    (['--workdir=/ckpt', '--prompt=x'], "workdir '/ckpt' does not exist"),
    (['--prompt=x'], 'nothing to sample from'),
    (['--init={tmp}'], 'no prompts'),
    (['--init={tmp}', '--prompt=x', '--sampler=lms'], "unknown sampler 'lms': choose one of"),
    (['--init={tmp}', '--prompt=x', '--height=513'], 'try 512'),
    (['--init={tmp}', '--prompt=x', '--mask=m.png'], '--mask needs --init_image'),
    (['--init={tmp}', '--prompt=x', '--init_image=nope.png'], "'nope.png' does not exist"),
    (['--init={tmp}', '--prompt=x', '--strength=2'], r'outside \(0, 1\]'),
    (['--init={tmp}', '--prompt', 'a', 'b'], 'unexpected arguments'),
], ids=['workdir', 'no_model', 'no_prompts', 'sampler', 'size', 'mask', 'init_image', 'strength',
        'unquoted'])
def test_sample_main_bad_input_is_a_usage_error(sample, tmp_path, args, message):
  args = [a.format(tmp=tmp_path) for a in args]
  with pytest.raises(app.UsageError, match=message):
    _main(sample, *args, f'--out={tmp_path / "out"}')
  if not any(a.startswith(('--height', '--width')) for a in args):  # those need the VAE's factor
    assert not sample.loaded  # rejected before any weights load
  assert not (tmp_path / 'out').exists()  # and before any sampling


# A training workdir as a source: read, never written; only its EMA parameters restored.


def _save_run(workdir, config, ema):
  """A checkpoint as training writes it, whose raw weights and moments differ from the EMA."""
  from ldm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  shifted = lambda c: jax.tree.map(lambda x: x + c, ema)
  state = {'step': np.asarray(2, np.int32), 'params': shifted(1.0),
           'opt_state': {'mu': shifted(2.0), 'nu': shifted(3.0)}, 'ema_params': ema}
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(2, state, {'position': 16}, json.loads(config.to_json_best_effort()))
  ckpt.close()


@pytest.fixture(scope='module', params=[True, False], ids=['joint_text', 'frozen_text'])
def ldm_run(request, tmp_path_factory):
  """(ldm workdir, clip workdir or None, their EMA trees): the shapes runs, random weights.

  The text encoder is trained with the U-Net, or frozen and taken from a clip-stage run. The
  saved config keeps `vocab_size` 0 (the tokenizer's), as the shapes config has it.
  """
  from ldm_jax.models import build  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, ROOT)
  from configs import shapes  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('ldm'))
  config = shapes.get_config('ldm,runlocal')
  config.allow_random_vae = True
  tok = weights.tokenizer(config, save_to=os.path.join(workdir, 'tokenizer'))
  sized = ml_collections.ConfigDict(config.to_dict())
  sized.model.text_encoder.vocab_size = len(tok)
  nets = build.networks_from_config(sized.model)
  text = build.random_params(nets['text_encoder'], 2)
  ema = {'unet': build.random_params(nets['unet'], 1)}
  clip = None
  if request.param:
    ema['text_encoder'] = text
  else:
    clip = str(tmp_path_factory.mktemp('clip'))
    _save_run(clip, shapes.get_config('clip,runlocal'),
              {'text_encoder': text, 'text_projection': {'kernel': np.ones((64, 8), np.float32)}})
    config.text_encoder.trainable = False
    config.text_encoder.workdir = clip
  _save_run(workdir, config, ema)
  return workdir, clip, ema, text


def _snapshot(folder):
  """Every path under `folder` with the sha256 of its bytes (None for a folder)."""
  entries = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      entries[os.path.relpath(os.path.join(root, name), folder)] = None
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        entries[os.path.relpath(os.path.join(root, name), folder)] = (
            hashlib.sha256(f.read()).hexdigest())
  return entries


def test_sampling_from_a_workdir_reads_only_its_ema_weights(ldm_run, monkeypatch):
  from ldm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion import pipeline  # pylint: disable=g-import-not-at-top
  workdir, clip, ema, text = ldm_run
  before = [_snapshot(w) for w in (workdir, clip) if w]
  reads, read = [], checkpoint.read_checkpoint

  def spy(path, item='state', step=None, only=None):
    reads.append((item, only))
    return read(path, item, step, only)

  monkeypatch.setattr(checkpoint, 'read_checkpoint', spy)
  components = sources.load(sources.resolve_model(workdir=workdir))
  sd = pipeline.StableDiffusion(components)
  assert [_snapshot(w) for w in (workdir, clip) if w] == before  # byte for byte, nothing added
  assert {r for r in reads if r[0] == 'state'} == {('state', 'ema_params')}
  for got, want in ((components.unet[1], ema['unet']), (components.text_encoder[1], text)):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, got, want)  # the EMA, not the raw weights
  assert components.text_encoder[0].config.vocab_size == len(components.tokenizer)
  assert sd.vae_scale == 2  # the shapes VAE's real factor: sizes are checked against it
  run.validate(run.Request(prompts=('a red circle',), height=36, width=36), SAMPLERS,
               sd.vae_scale)


def test_a_workdir_of_another_stage_is_refused(monkeypatch, tmp_path):
  monkeypatch.setattr(weights, 'run_config', lambda workdir: ml_collections.ConfigDict(
      {'stage': 'vae'}))
  with pytest.raises(ValueError, match="trained the 'vae' stage; sampling needs an ldm run"):
    sources.from_workdir(str(tmp_path))
