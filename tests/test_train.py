"""Training: step equivalences (mesh, accumulation), EMA, losses, NaN, end to end (resume, signals
and kill -9: test_faults.py)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import weights
from ldm_jax.data import builders
from ldm_jax.diffusion import schedules
from ldm_jax.train import loop
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  builders.build_shapes(path, image_size=32, num_train=64, num_holdout=16)
  return path


def small_config(data_dir, stage='ldm', **overrides):
  """The shapes :runlocal config on the test dataset, with 1-device mesh and no previews."""
  c = shapes_config.get_config(f'{stage},runlocal')
  c.data.data_dir = data_dir
  c.sample_every = 0
  c.allow_random_vae = True
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _params(workdir):
  from ldm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.read_checkpoint(workdir)


def test_ema_follows_its_formula():
  ema = shapes_config.get_config('ldm').ema
  for step in (0, 1, 10, 5000):
    expected = min(ema.decay, (1 + step) / (10 + step))
    assert abs(float(state_lib.ema_decay(step, ema)) - expected) < 1e-7
  e, p = {'w': jnp.array([1.0, 2.0])}, {'w': jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(state_lib.ema_update(e, p, 0.9)['w'], [1.2, 2.4], rtol=1e-6)


def test_min_snr_and_v_targets_by_hand():
  from ldm_jax.train import losses  # pylint: disable=g-import-not-at-top
  snr = jnp.array([0.5, 5.0, 20.0])
  np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, 'epsilon'), [1.0, 1.0, 0.25])
  np.testing.assert_allclose(losses.min_snr_weights(snr, 5.0, 'v_prediction'),
                             [0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6)
  sched = schedules.Schedule.create(schedules.ScheduleConfig())
  x0, eps, t = jnp.full((1, 2), 2.0), jnp.full((1, 2), -1.0), jnp.array([500])
  a = float(sched.alphas_cumprod[500])
  np.testing.assert_allclose(schedules.velocity(sched, x0, eps, t),
                             np.full((1, 2), -a ** 0.5 - 2 * (1 - a) ** 0.5), rtol=1e-6)


def _stage_and_update(config, grad_accum=1):
  from ldm_jax.models import build  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import stages  # pylint: disable=g-import-not-at-top
  tok = weights.tokenizer(config, os.path.join(config.data.data_dir + '_tok', 'tokenizer'))
  config.model.text_encoder.vocab_size = len(tok)
  stage = stages.build_stage(config, tok)
  tx, lr = state_lib.make_optimizer(config.optim, config.num_steps)
  params = {'unet': build.random_params(stage.unet, 1),
            'text_encoder': build.random_params(stage.text_encoder, 2)}
  update = step_lib.make_update_fn(stage.loss, tx, config.ema, grad_accum, lr)
  return stage, tx, params, update, tok


def _batch(config, tok, n):
  from ldm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.LoaderConfig.from_config(config.data, batch_size=n, shuffle=False)
  return next(pipeline.Loader(data, tok, 0, 1))


def test_gradient_accumulation_equals_one_big_step(data_dir):
  config = small_config(data_dir)
  stage, tx, params, update1, tok = _stage_and_update(config)
  _, _, _, update2, _ = _stage_and_update(config, grad_accum=2)
  batch, rng = _batch(config, tok, 8), jax.random.key(0)
  one, m1 = jax.jit(update1)(state_lib.init_state(params, tx), stage.frozen, batch, rng)
  two, m2 = jax.jit(update2)(state_lib.init_state(params, tx), stage.frozen, batch, rng)
  np.testing.assert_allclose(m1['loss'], m2['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               one['params'], two['params'])


_MESH_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax
    jax.config.update('jax_num_cpu_devices', 8)
    jax.config.update('jax_default_matmul_precision', 'highest')
    sys.path[:0] = [{root!r}, {tests!r}]
    import numpy as np
    import test_train as t
    from ldm_jax import sharding
    from ldm_jax.train import state as state_lib
    config = t.small_config({data!r})
    stage, tx, params, update, tok = t._stage_and_update(config)
    batch, rng = t._batch(config, tok, 8), jax.random.key(0)
    results = []
    for axes in ([('data', 1), ('fsdp', 1)], [('data', 2), ('fsdp', 4)]):
      mesh = sharding.make_mesh(axes, jax.devices()[:int(np.prod([s for _, s in axes]))])
      state = state_lib.init_state(params, tx)
      sh = sharding.tree_shardings(state, mesh, [('.*', 'fsdp')])
      fsh = sharding.tree_shardings(stage.frozen, mesh, [('.*', 'fsdp')])
      rep = jax.sharding.NamedSharding(mesh, sharding.P())
      fn = jax.jit(update, in_shardings=(sh, fsh, sharding.batch_sharding(mesh), rep),
                   out_shardings=(sh, rep))
      new, metrics = fn(jax.device_put(state, sh), jax.device_put(stage.frozen, fsh),
                        sharding.put_batch(batch, mesh), rng)
      jax.block_until_ready(new)
      sharded = sum(1 for x in jax.tree.leaves(new['params']) if not x.sharding.is_fully_replicated)
      results.append((float(metrics['loss']), jax.device_get(new['params']), sharded))
    (l1, p1, _), (l2, p2, sharded) = results
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    print(json.dumps({{'loss_diff': abs(l1 - l2), 'param_diff': diff, 'sharded': sharded}}))
''')


def test_step_on_a_2x4_mesh_matches_one_device(data_dir):
  # In a subprocess: a hung XLA:CPU collective aborts its process, not the suite.
  script = _MESH_SCRIPT.format(root=ROOT, tests=os.path.join(ROOT, 'tests'), data=data_dir)
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['sharded'] > 10  # FSDP really split the parameters over 4 devices
  assert result['loss_diff'] <= 1e-5 and result['param_diff'] <= 1e-5, result


def test_nan_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  from ldm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  original = pipeline.Loader.__next__
  calls = {'n': 0}

  def poisoned(self):
    batch = original(self)
    calls['n'] += 1
    if calls['n'] == 3:  # the third batch carries a NaN
      batch['image'][0, 0, 0, 0] = np.nan
    return batch

  monkeypatch.setattr(pipeline.Loader, '__next__', poisoned)
  with pytest.raises(loop.NonFiniteError, match='at step 3: stopped. The last good checkpoint '
                     'is step 2'):
    loop.train(small_config(data_dir, num_steps=6, ckpt_every=2, precompute_latents=False),
               str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def _run(script, *args):
  out = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                       text=True, timeout=600, cwd=ROOT)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout + out.stderr


def test_train_main_each_stage_then_sample_from_the_workdir(data_dir, tmp_path):
  config = os.path.join(ROOT, 'configs', 'shapes.py')
  common = [f'--config.data.data_dir={data_dir}']
  for stage in ('vae', 'clip'):
    _run('train.py', '--config', f'{config}:{stage},runlocal', '--workdir', str(tmp_path / stage),
         *common)
    assert _params(str(tmp_path / stage))[0] == 4
  assert os.path.isfile(tmp_path / 'vae' / 'export' / 'vae' / 'config.json')
  assert os.listdir(tmp_path / 'vae' / 'samples')  # the reconstruction grid
  out = _run('train.py', '--config', f'{config}:ldm,runlocal', '--workdir',
             str(tmp_path / 'ldm'), f'--config.vae_workdir={tmp_path / "vae"}', *common,
             '--config.eval.every=2', '--config.eval.metrics=shapes,fid',  # fid: no weights given
             '--config.eval.num_images=4', '--config.eval.batch_size=4', '--config.eval.steps=2')
  assert re.search(r'compiled the step in [\d.]+ s \((loaded from|compiled and written to) the '
                   'compilation cache', out), out[-3000:]
  assert re.search(r'training loop, per step [\d.]+ ms over 3 steps: waiting for the device', out)
  rows = [json.loads(l) for l in open(tmp_path / 'ldm' / 'metrics.jsonl')]
  metrics = [m for m in rows if 'loss' in m]
  assert [m['step'] for m in metrics] == [1, 2, 3, 4]
  # In-training evaluation at steps 2 and 4: prompt fidelity logged; fid left out with a warning.
  evals = [m for m in rows if 'eval/shapes_fidelity_train' in m]
  assert [m['step'] for m in evals] == [2, 4], rows
  assert all(0 <= m['eval/shapes_fidelity_train'] <= 1 for m in evals)
  assert 'eval: fid is left out: set eval.inception and eval.fid_stats' in out
  assert sorted(os.listdir(tmp_path / 'ldm' / 'eval')) == ['step_000002.png', 'step_000004.png']
  assert {'loss', 'grad_norm', 'param_norm', 'update_norm', 'learning_rate', 'data',
          'host_ms'} <= set(metrics[-1])
  assert {'data', 'dispatch', 'device', 'wall'} <= set(metrics[-1]['host_ms'])
  # The consumed batches' records (4 steps of 8), not those the input thread made ahead.
  assert metrics[-1]['data']['ok'] == 32
  assert os.path.isfile(tmp_path / 'ldm' / 'export' / 'model_index.json')
  _run('sample.py', '--workdir', str(tmp_path / 'ldm'), '--prompt', 'a red circle',
       '--num_images', '2', '--batch_size', '2', '--steps', '2', '--out', str(tmp_path / 'out'))
  assert os.path.isfile(tmp_path / 'out' / 'grid.png')
  assert len(open(tmp_path / 'out' / 'samples.jsonl').readlines()) == 2


def test_compilation_cache_setting(tmp_path, monkeypatch):
  before = jax.config.jax_compilation_cache_dir  # conftest's, from $JAX_COMPILATION_CACHE_DIR
  try:
    assert step_lib.use_compilation_cache('auto') == before
    jax.config.update('jax_compilation_cache_dir', None)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert step_lib.use_compilation_cache('auto') == str(tmp_path / 'ldm_jax' / 'jax')
    assert os.path.isdir(tmp_path / 'ldm_jax' / 'jax')
    assert step_lib.use_compilation_cache('') == '' and not jax.config.jax_compilation_cache_dir
  finally:
    step_lib.use_compilation_cache(before)
  assert jax.config.jax_compilation_cache_dir == before


def test_unknown_config_key_lists_the_valid_ones(tmp_path):
  out = subprocess.run([sys.executable, os.path.join(ROOT, 'train.py'), '--config',
                        os.path.join(ROOT, 'configs', 'shapes.py') + ':ldm,runlocal',
                        '--workdir', str(tmp_path), '--config.optim.learning_rate=1'],
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "unknown config key 'optim.learning_rate'" in out.stderr
  assert "'lr'" in out.stderr and "'warmup_steps'" in out.stderr


@pytest.mark.parametrize('spec', ['shapes.py:vae', 'shapes.py:ldm,runlocal', 'shapes.py:clip',
                                  'sd15.py', 'sd15.py:scratch,runlocal', 'sd21.py:finetune',
                                  'sd21.py:mlperf',
                                  'tiny.py'])
def test_every_config_has_every_group(spec):
  from ldm_jax import config_check  # pylint: disable=g-import-not-at-top
  config = config_check.load_config(os.path.join(ROOT, 'configs', spec))
  reference = shapes_config.get_config('ldm')
  assert sorted(config.keys()) == sorted(reference.keys())
  assert config.stage in ('vae', 'ldm', 'clip')


@pytest.mark.parametrize('trainable_text', [True, False])
def test_precomputed_latents_train_like_images(data_dir, tmp_path, trainable_text):
  """Same batches, dropped captions and loss from the encodings as from the images."""
  from ldm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = small_config(data_dir, **{'data.caption_dropout': 0.5})
  stage, _, params, _, tok = _stage_and_update(config)
  if not trainable_text:  # frozen: its states are stored, and '' replaces the dropped ones
    stage.train_text = False
    stage.frozen['text_encoder'] = params.pop('text_encoder')
  data = pipeline.LoaderConfig.from_config(config.data, batch_size=8, shuffle=False)
  images = next(pipeline.Loader(data, tok, 0, 1))
  encoded = next(pipeline.Loader(stage.precompute(data, str(tmp_path)), tok, 0, 1))
  assert 'image' not in encoded and ('context' in encoded) != trainable_text
  np.testing.assert_array_equal(encoded['drop'], images['drop'])
  assert 0 < images['drop'].sum() < 8
  np.testing.assert_array_equal(encoded['input_ids'], images['input_ids'])
  keys = step_lib.example_keys(jax.random.key(0), 0, 8)
  want, _ = jax.jit(stage.loss)(params, stage.frozen, images, keys, 0)
  got, _ = jax.jit(stage.loss)(params, stage.frozen, encoded, keys, 0)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if not trainable_text:  # computed while tracing, kept as a concrete array (not a tracer)
    assert np.asarray(stage.empty_context).shape == (1, config.data.max_length, 64)


def test_init_unet_false_takes_only_the_frozen_networks_from_the_folder(monkeypatch):
  """MLPerf's protocol: a new U-Net of the folder's layout and the config's noise schedule over
  the folder's frozen VAE and text encoder."""
  import types  # pylint: disable=g-import-not-at-top
  from configs import sd21  # pylint: disable=g-import-not-at-top
  init = types.SimpleNamespace(unet=('unet', 'U'), vae=('vae', 'V'), text_encoder=('te', 'T'),
                               scheduler_config={'prediction_type': 'epsilon'})
  monkeypatch.setattr(weights, 'load_init', lambda config: init)
  config = sd21.get_config('mlperf')
  config.init = '/models/stable-diffusion-2-base'
  w = weights.ldm_weights(config, train_text=False)
  assert w.pretrained is None and w.frozen == {'vae': 'V', 'text_encoder': 'T'}
  assert (w.unet, w.vae, w.text_encoder) == ('unet', 'vae', 'te')
  assert w.scheduler_config['prediction_type'] == 'v_prediction'  # the config's, not the folder's
  with pytest.raises(ValueError, match='text_encoder.trainable=False'):
    weights.ldm_weights(config, train_text=True)
  config.init_unet = True  # fine-tuning: the folder's U-Net weights and schedule
  w = weights.ldm_weights(config, train_text=False)
  assert w.pretrained == {'unet': 'U'} and w.scheduler_config['prediction_type'] == 'epsilon'
