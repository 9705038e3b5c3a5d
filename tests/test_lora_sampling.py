"""Sampling with LoRAs: ours against diffusers' `load_lora_weights`, sample.py --lora, the
convert CLI's LoRA layouts, and the errors of a LoRA made for another model.

One tiny random SD 1.x pipeline, compiled once: every LoRA, scale and sample.py run below
reuses its function (the merged weights keep the base's shapes and dtypes). Images agree with
diffusers' to max |ours - ref| <= 2e-3 on [0, 1], float32, same latents.
"""

import os
import sys
import types
from unittest import mock

from absl import app
from absl import flags
from absl.testing import flagsaver
import jax
import numpy as np
from PIL import Image
import pytest

import torch_reference as tr
from ldm_jax import convert
from ldm_jax.convert import __main__ as convert_main
from ldm_jax.convert import lora as convert_lora
from ldm_jax.convert import tables
from ldm_jax.diffusion import pipeline
from ldm_jax.models import build
from ldm_jax.models import lora
from ldm_jax.models import unet as unet_lib
from ldm_jax.sampling import loras
from ldm_jax.sampling import outputs

torch = tr.torch
pytest.importorskip('peft')  # diffusers' load_lora_weights runs on PEFT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-3
PROMPTS = ['abc', 'a b c d e f']
SIZE = 16  # pixels; the tiny VAE downsamples by 2
STEPS = 3
UNET_TARGETS = ('attention', 'feed_forward', 'projections', 'conv')
TEXT_TARGETS = ('text_attention', 'text_mlp')


def random_adapters(params, targets, rank, seed):
  """lora.init's adapters with a random nonzero B (as after training), so that they matter."""
  adapters = lora.init(params, lora.LoraConfig(rank=rank, targets=targets), jax.random.key(seed))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, v: rng.normal(0, 0.3, v.shape).astype(np.float32) if p[-1].key == 'up'
      else np.asarray(v), adapters)


def _adapters(components, unet_rank, text_rank, seed):
  return {'unet': random_adapters(components.unet[1], UNET_TARGETS, unet_rank, seed),
          'text_encoder': random_adapters(components.text_encoder[1], TEXT_TARGETS, text_rank,
                                          seed + 1)}


@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """The tiny folder, our pipeline on it, and LoRA files: A as PEFT and kohya, B as kohya."""
  folder = str(tmp_path_factory.mktemp('sd'))
  tr.save_pipeline(folder)
  files = tmp_path_factory.mktemp('loras')
  components = convert.load_diffusers(folder)
  a, b = _adapters(components, 4, 2, 1), _adapters(components, 2, 3, 3)
  alpha_a, alpha_b = {'unet': 8.0, 'text_encoder': 1.0}, {'unet': 1.0, 'text_encoder': 6.0}
  paths = types.SimpleNamespace(
      a_peft=convert_lora.save_lora(a, str(files / 'a'), alpha_a),
      a_kohya=convert_lora.save_lora(a, str(files / 'a_kohya.safetensors'), alpha_a, 'kohya'),
      b_kohya=convert_lora.save_lora(b, str(files / 'b_kohya.safetensors'), alpha_b, 'kohya'))
  return types.SimpleNamespace(folder=folder, components=components, paths=paths,
                               sd=pipeline.StableDiffusion(components), adapters=(a, b),
                               alphas=(alpha_a, alpha_b))


def _noise():
  return np.random.default_rng(0).standard_normal((2, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _ours(env, chosen):
  loras.set_loras(env.sd, env.components, chosen, log=None)
  return env.sd.generate(PROMPTS, steps=STEPS, latents=_noise(), output='float')


def _theirs(pipe, adapters, weights):
  pipe.set_adapters(adapters, adapter_weights=weights)
  latents = torch.from_numpy(np.ascontiguousarray(np.transpose(_noise(), (0, 3, 1, 2))))
  return pipe(PROMPTS, num_inference_steps=STEPS, latents=latents, height=SIZE, width=SIZE,
              output_type='np').images


def test_our_lora_files_give_diffusers_images(env):
  """PEFT and kohya files of ldm_jax adapters (U-Net with LoCon, text encoder) sample the images
  diffusers samples with them, alone and two at their own scales; no recompiles, and no LoRA
  gives the base images back bit for bit."""
  p = env.paths
  pipe = tr.diffusers.StableDiffusionPipeline.from_pretrained(env.folder, safety_checker=None)
  for name, path in (('a', p.a_peft), ('a_kohya', p.a_kohya), ('b', p.b_kohya)):
    pipe.load_lora_weights(path, adapter_name=name)
  base = _ours(env, [])
  count = env.sd.compile_count
  cases = [([(p.a_peft, 1.0)], ['a'], [1.0]), ([(p.a_kohya, 1.0)], ['a_kohya'], [1.0]),
           ([(p.b_kohya, 1.0)], ['b'], [1.0]),
           ([(p.a_peft, 0.7), (p.b_kohya, 0.4)], ['a', 'b'], [0.7, 0.4])]
  errors = []
  for chosen, names, weights in cases:
    ours = _ours(env, chosen)
    assert np.max(np.abs(ours - base)) > 0.05, chosen  # the LoRA matters
    errors.append(float(np.max(np.abs(ours - _theirs(pipe, names, weights)))))
  print('max |ours - diffusers| per case:', errors)
  assert max(errors) <= ATOL, errors
  np.testing.assert_array_equal(_ours(env, []), base)
  assert env.sd.compile_count == count


def test_merge_is_lora_apply_in_float32_cast_to_the_param_dtype(env):
  """apply_loras' trees: lora.apply of both LoRAs, the base's dtypes, unadapted leaves shared."""
  (a, b), (alpha_a, alpha_b) = env.adapters, env.alphas
  merged = loras.apply_loras(env.components, [(env.paths.a_peft, 0.5), (env.paths.b_kohya, -1)],
                             log=None)
  for network in ('unet', 'text_encoder'):
    base = getattr(env.components, network)[1]
    expected = lora.apply(base, [(a[network], 0.5, alpha_a[network]),
                                 (b[network], -1.0, alpha_b[network])], dtype=np.float32)
    got = getattr(merged, network)[1]
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=0, atol=1e-6), got, expected)
    assert jax.tree.map(lambda x: x.dtype, got) == jax.tree.map(lambda x: x.dtype, base)
  assert merged.unet[1]['conv_in']['kernel'] is env.components.unet[1]['conv_in']['kernel']
  assert merged.vae is env.components.vae


def _sample_main(args, monkeypatch, sd, components):
  """sample.py's main in-process; its pipeline is `sd` with the weights sample.py built."""
  monkeypatch.syspath_prepend(ROOT)
  import sample  # pylint: disable=g-import-not-at-top

  def shared(built):
    components.append(built)
    loras.place(sd, built)
    return sd

  monkeypatch.setattr(sample, 'pipeline', types.SimpleNamespace(
      SAMPLERS=pipeline.SAMPLERS, StableDiffusion=shared))
  argv = ['sample.py', *args]
  with flagsaver.flagsaver(), mock.patch.object(sys, 'argv', argv):
    sample.main(flags.FLAGS(argv))


def test_sample_py_lora_flags(env, tmp_path, monkeypatch):
  """sample.py --lora FILE:SCALE (twice) writes the LoRA images and records the LoRAs."""
  p, out, built = env.paths, tmp_path / 'out', []
  count = env.sd.compile_count
  _sample_main([f'--init={env.folder}', f'--lora={p.a_peft}:0.7', f'--lora={p.b_kohya}:0.4',
                *[f'--prompt={q}' for q in PROMPTS], '--batch_size=2', f'--steps={STEPS}',
                '--seed=5', f'--out={out}'], monkeypatch, env.sd, built)
  assert env.sd.compile_count == count  # the test pipeline's function: same shapes
  expected = loras.apply_loras(env.components, [(p.a_peft, 0.7), (p.b_kohya, 0.4)], log=None)
  for network in ('unet', 'text_encoder'):
    jax.tree.map(np.testing.assert_array_equal, getattr(built[0], network)[1],
                 getattr(expected, network)[1])
  loras.place(env.sd, expected)
  images = env.sd.generate(PROMPTS, steps=STEPS, seed=5)
  recs = outputs.read_records(str(out))
  for k, rec in enumerate(recs):
    np.testing.assert_array_equal(np.asarray(Image.open(out / rec['file'])), images[k])
    assert rec['loras'] == [{'path': p.a_peft, 'scale': 0.7}, {'path': p.b_kohya, 'scale': 0.4}]

  with pytest.raises(app.UsageError, match='the scale .x. is no finite number'):
    _sample_main([f'--init={env.folder}', f'--lora={p.a_peft}:x', '--prompt=a',
                  f'--out={tmp_path / "bad"}'], monkeypatch, env.sd, built)
  with pytest.raises(app.UsageError, match="--lora '/nope.safetensors' does not exist"):
    _sample_main([f'--init={env.folder}', '--lora=/nope.safetensors:2', '--prompt=a',
                  f'--out={tmp_path / "bad"}'], monkeypatch, env.sd, built)
  assert len(built) == 1 and not (tmp_path / 'bad').exists()


def test_parse_lora_specs(tmp_path):
  odd = tmp_path / 'a:b.safetensors'
  odd.write_bytes(b'')
  assert loras.parse('x.safetensors') == loras.Lora('x.safetensors', 1.0)
  assert loras.parse('x.safetensors:0.25') == loras.Lora('x.safetensors', 0.25)
  assert loras.parse('d/x:-1') == loras.Lora('d/x', -1.0)
  assert loras.parse(str(odd)) == loras.Lora(str(odd), 1.0)
  assert loras.parse(f'{odd}:2') == loras.Lora(str(odd), 2.0)
  assert loras.parse(('x', 3)) == loras.Lora('x', 3.0)
  for bad, message in (('x.safetensors:', "scale '' is no finite number"),
                       ('x.safetensors:nan', "scale 'nan' is no finite number"),
                       ('x.safetensors:0.5x', 'FILE:SCALE'), (':0.5', 'names no file')):
    with pytest.raises(ValueError, match=message):
      loras.parse(bad)


def test_a_lora_for_another_model_is_refused_with_every_module(env, tmp_path):
  """A kohya LoRA of the tiny SDXL U-Net and both its text encoders on the SD 1.x model: every
  key that does not fit is listed, and what the file looks made for is said."""
  xl = build.abstract_params(unet_lib.UNet2DConditionModel(unet_lib.UNetConfig.tiny_xl()))
  adapters = {'unet': lora.init(xl, lora.LoraConfig(rank=2), jax.random.key(0)),
              'text_encoder_2': lora.init(env.components.text_encoder[1],
                                          lora.LoraConfig(rank=2, targets=TEXT_TARGETS),
                                          jax.random.key(1))}
  path = convert_lora.save_lora(jax.tree.map(np.asarray, adapters),
                                str(tmp_path / 'xl.safetensors'), layout='kohya',
                                base={'unet': xl})
  with pytest.raises(convert_lora.LoraFormatError) as e:
    loras.apply_loras(env.components, [path], log=None)
  message = str(e.value)
  assert ('it looks made for another model: its cross-attention context width 64 (this model: '
          '32); text_encoder_2 width 32 (this model: has none)') in message
  state, _ = convert_lora.read_file(path)
  unknown = [k for k in state if 'input_blocks' in k or 'lora_te2_' in k]
  assert unknown and all(k in message for k in unknown)

  sd15_like = 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k'
  convert.diffusers.save_safetensors(
      {f'{sd15_like}.lora_A.weight': np.ones((4, 768), np.float32),
       f'{sd15_like}.lora_B.weight': np.ones((32, 4), np.float32)},
      str(tmp_path / 'sd15.safetensors'), {'format': 'pt'})
  with pytest.raises(ValueError, match=r'looks made for SD 1.x: its cross-attention context '
                     r'width 768 \(this model: 32\)[^\n]*\n.*mis-shaped'):
    loras.apply_loras(env.components, [str(tmp_path / 'sd15.safetensors')], log=None)


def _state(path):
  return convert_lora.read_file(path)


def test_convert_cli_peft_kohya_peft_is_identical(env, tmp_path, capsys):
  """python -m ldm_jax.convert --to kohya, then --to peft: the same tensors, dtype and config."""
  a = env.adapters[0]
  src = convert_lora.save_lora(a, str(tmp_path / 'src'), env.alphas[0], dtype=np.float16)
  kohya, back = str(tmp_path / 'k.safetensors'), str(tmp_path / 'back.safetensors')
  assert convert_main.main(['--src', src, '--to', 'kohya', '--base', env.folder,
                            '--out', kohya]) == 0
  assert 'a peft LoRA' in capsys.readouterr().out
  assert convert_main.main(['--src', kohya, '--to', 'peft', '--base', env.folder,
                            '--out', back]) == 0
  assert 'wrote peft (float16)' in capsys.readouterr().out
  (want, want_meta), (got, got_meta) = _state(src), _state(back)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    assert got[key].dtype == value.dtype == np.float16
    np.testing.assert_array_equal(got[key], value)
  assert got_meta == want_meta
  kohya_state, _ = _state(kohya)
  assert kohya_state['lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha'] == 1.0

  assert convert_main.main(['--src', src, '--to', 'kohya', '--out', kohya]) == 1
  assert 'needs --base' in capsys.readouterr().err


def test_sdxl_loras_merge_as_diffusers_fuses_them(tmp_path):
  """A kohya SDXL LoRA (sgm U-Net names, lora_te1_ and lora_te2_) merged by apply_loras: the
  weights diffusers' load_lora_weights + fuse_lora give (no compile)."""
  folder = str(tmp_path / 'xl')
  pipe = tr.save_sdxl_pipeline(folder)
  components = convert.load_diffusers(folder)
  base = loras.base_trees(components)
  adapters = {'unet': random_adapters(base['unet'], UNET_TARGETS, 2, 7),
              'text_encoder': random_adapters(base['text_encoder'], TEXT_TARGETS, 2, 8),
              'text_encoder_2': random_adapters(base['text_encoder_2'], TEXT_TARGETS, 3, 9)}
  path = convert_lora.save_lora(adapters, str(tmp_path / 'xl.safetensors'), 2.0, 'kohya', base)
  merged = loras.apply_loras(components, [(path, 0.6)], log=None)
  pipe.load_lora_weights(path)
  pipe.fuse_lora(lora_scale=0.6)  # into the PEFT layers' base_layer weights
  for network in ('unet', 'text_encoder', 'text_encoder_2'):
    theirs = {k.removeprefix('text_model.').replace('.base_layer.', '.'): v.numpy()
              for k, v in getattr(pipe, network).state_dict().items() if '.lora_' not in k}
    ours, before = (tables.to_torch(getattr(c, network)[1]) for c in (merged, components))
    assert sorted(ours) == sorted(theirs)
    for key, value in ours.items():
      np.testing.assert_allclose(value, theirs[key], rtol=0, atol=1e-5, err_msg=key)
    changed = [k for k in ours if not np.array_equal(ours[k], before[k])]
    assert len(changed) == len(lora.modules(adapters[network])), network
