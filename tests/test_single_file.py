"""Single-file checkpoints in and out: diffusers' from_single_file, torch-free .ckpt, bad input."""

import collections
import dataclasses
import os
import pickle
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import yaml

import torch_reference as tr
from ldm_jax import convert
from ldm_jax.convert import __main__ as convert_cli
from ldm_jax.convert import ckpt
from ldm_jax.convert import compvis
from ldm_jax.convert import single_file
from ldm_jax.convert import tables
from ldm_jax.models import build
from ldm_jax.models import text_encoder as text_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib

torch = tr.torch
RTOL = 1e-4
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny models that follow the SD conventions the shapes cannot tell (32 norm groups, 8 heads per
# U-Net level in SD 1.x, 64-wide heads in SD 2.x and in the text encoders), so that a single
# file loads with no config at all.
SD1_UNET = dict(norm_num_groups=32, attention_head_dim=8, cross_attention_dim=128)
SD2_UNET = dict(norm_num_groups=32, block_out_channels=(64, 128), attention_head_dim=(1, 2),
                cross_attention_dim=128, use_linear_projection=True, upcast_attention=True)
SD_TEXT = dict(hidden_size=128, num_attention_heads=2)


@pytest.fixture(scope='module')
def pipeline_dir(tmp_path_factory):
  """The tests' tiny pipeline as a single file (8 norm groups: it needs its config folder)."""
  path = str(tmp_path_factory.mktemp('sd_tiny'))
  models = tr.save_pipeline(path)
  components = convert.load_diffusers(path)
  file = os.path.join(path, 'model.safetensors')
  convert.save_single_file(components, file)
  return path, file, components, models


@pytest.fixture(scope='module')
def sd1_dir(tmp_path_factory):
  """An SD 1.x-convention tiny pipeline, its single file and its original YAML."""
  path = str(tmp_path_factory.mktemp('sd1_tiny'))
  tr.save_pipeline(path, unet=tr.tiny_unet(**SD1_UNET),
                   vae=tr.tiny_vae(norm_num_groups=32, sample_size=16),
                   text_encoder=tr.tiny_text_encoder(**SD_TEXT))
  components = convert.load_diffusers(path)
  file, yaml_path = os.path.join(path, 'sd1.safetensors'), os.path.join(path, 'sd1.yaml')
  convert.save_single_file(components, file, config_yaml=yaml_path)
  return path, file, yaml_path, components


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _inputs(context_dim=32):
  g = torch.Generator().manual_seed(0)
  return (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, context_dim, generator=g),
          torch.rand(1, 3, 16, 16, generator=g) * 2 - 1,
          torch.randint(0, 998, (2, 77), generator=g))


def test_export_loads_in_diffusers_from_single_file(pipeline_dir):
  path, file, _, (unet, vae, text_encoder) = pipeline_dir
  keys = st_numpy.load_file(file)
  assert 'model.diffusion_model.output_blocks.1.1.conv.weight' in keys  # upsampler, no attention
  assert keys['first_stage_model.decoder.mid.attn_1.q.weight'].shape == (64, 64, 1, 1)
  pipe = tr.diffusers.StableDiffusionPipeline.from_single_file(
      file, config=path, local_files_only=True, safety_checker=None)
  tr.assert_same_pipeline_outputs(pipe, unet, vae, text_encoder)


def test_single_file_imports_back_bit_exact(pipeline_dir):
  path, file, components, _ = pipeline_dir
  again, report = single_file.load(file, config=path)
  for name in ('unet', 'vae', 'text_encoder'):
    _same_tree(getattr(components, name)[1], getattr(again, name)[1])
    assert getattr(components, name)[0].config == getattr(again, name)[0].config
  assert again.scheduler_config == components.scheduler_config
  assert again.tokenizer('abc').input_ids == [998, 0, 2, 5, 999]
  assert str(report.model_type) == 'SD 1.x (clip text encoder)' and report.ema == 'absent'


def test_shapes_alone_describe_an_sd1_file(sd1_dir, tmp_path):
  _, file, _, components = sd1_dir
  # A file from the wild: no metadata and no YAML beside it (ours have both: test_faults_convert).
  wild = str(tmp_path / 'wild.safetensors')
  st_numpy.save_file(st_numpy.load_file(file), wild)
  again, report = single_file.load(wild)
  for name in ('unet', 'vae', 'text_encoder'):
    _same_tree(getattr(components, name)[1], getattr(again, name)[1])
  unet, vae = again.unet[0].config, again.vae[0].config
  # Without a YAML the sizes are SD 1.x's defaults; everything else is read off the tensors.
  assert (vae.sample_size, unet.sample_size) == (512, 256)
  assert _strip_size(unet) == _strip_size(components.unet[0].config)
  assert _strip_size(vae) == _strip_size(components.vae[0].config)
  assert _text(again) == _text(components)
  assert again.tokenizer is None and report.configs_from == 'tensor shapes + SD conventions'
  assert again.scheduler_config['_class_name'] == 'PNDMScheduler'


def _strip_size(config):
  return dataclasses.replace(config, sample_size=0)


def _text(components):
  # projection_dim is unused without a projection (transformers' default is 512, CLIP-L's 768).
  return dataclasses.replace(components.text_encoder[0].config, projection_dim=0)


def test_original_yaml_round_trips_and_loads_in_diffusers(sd1_dir):
  path, file, yaml_path, components = sd1_dir
  again, report = single_file.load(file, config_yaml=yaml_path, prediction_type='v_prediction',
                                   image_size=16, tokenizer=os.path.join(path, 'tokenizer'))
  for name in ('unet', 'vae'):
    assert getattr(again, name)[0].config == getattr(components, name)[0].config
  assert _text(again) == _text(components)
  assert report.settings.sources == {'image_size': 'argument', 'prediction_type': 'argument',
                                     'scaling_factor': 'original config'}
  assert again.scheduler_config['prediction_type'] == 'v_prediction'
  with open(yaml_path) as f:
    original = yaml.safe_load(f)
  original['model']['params']['unet_config']['params']['num_heads'] = 4
  original['model']['params']['parameterization'] = 'v'
  mapped = single_file.map_checkpoint(st_numpy.load_file(file), config_yaml=original)
  assert mapped.configs[0].num_attention_heads == (4, 4)  # the YAML's, not SD 1.x's 8
  assert mapped.scheduler_config['prediction_type'] == 'v_prediction'
  # diffusers builds the U-Net and VAE from our YAML (the text encoder from the folder).
  pipe = tr.diffusers.StableDiffusionPipeline.from_single_file(
      file, config=path, original_config=yaml_path, local_files_only=True, safety_checker=None)
  ref = tr.diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
  x, context, images, _ = _inputs(context_dim=128)
  with torch.no_grad():
    torch.testing.assert_close(pipe.unet(x, 10, context).sample, ref.unet(x, 10, context).sample,
                               rtol=0, atol=0)
    torch.testing.assert_close(pipe.vae(images).sample, ref.vae(images).sample, rtol=0, atol=0)


def _openclip_state(model):
  """An OpenCLIP text tower in the original layout, written by hand from a transformers model."""
  sd = {k.removeprefix('text_model.'): v.numpy() for k, v in model.state_dict().items()}
  out = {'token_embedding.weight': sd['embeddings.token_embedding.weight'],
         'positional_embedding': sd['embeddings.position_embedding.weight'],
         'ln_final.weight': sd['final_layer_norm.weight'],
         'ln_final.bias': sd['final_layer_norm.bias']}
  n = model.config.num_hidden_layers
  for i in range(n + 1):  # one resblock more than SD 2.x runs: it conditions on the penultimate
    src = f'encoder.layers.{min(i, n - 1)}.'
    scale = 1.0 if i < n else 3.0  # the extra block is garbage that must be skipped
    r = f'transformer.resblocks.{i}.'
    for leaf in ('weight', 'bias'):
      out[r + f'attn.in_proj_{leaf}'] = scale * np.concatenate(
          [sd[src + f'self_attn.{p}_proj.{leaf}'] for p in 'qkv'])
      for ours, theirs in (('attn.out_proj', 'self_attn.out_proj'), ('ln_1', 'layer_norm1'),
                           ('ln_2', 'layer_norm2'), ('mlp.c_fc', 'mlp.fc1'),
                           ('mlp.c_proj', 'mlp.fc2')):
        out[r + f'{ours}.{leaf}'] = scale * sd[src + f'{theirs}.{leaf}']
  out['text_projection'] = np.random.default_rng(0).standard_normal((128, 128), np.float32)
  out['logit_scale'] = np.float32(4.6)[None]
  return out


def test_sd2_openclip_splits_qkv_and_matches_transformers(tmp_path):
  unet, vae = tr.tiny_unet(**SD2_UNET), tr.tiny_vae(norm_num_groups=32)
  text = tr.tiny_text_encoder(hidden_act='gelu', **SD_TEXT)
  tr.save_pipeline(str(tmp_path / 'ref'), unet=unet, vae=vae, text_encoder=text)
  reference = convert.load_diffusers(str(tmp_path / 'ref'))
  state = {k: v for k, v in single_file.single_file_state(reference, 'clip').items()
           if not k.startswith('cond_stage_model.')}
  state |= {compvis.OPENCLIP_PREFIX + k: v for k, v in _openclip_state(text).items()}
  st_numpy.save_file(state, str(tmp_path / 'sd2.safetensors'))
  loaded, report = single_file.load(str(tmp_path / 'sd2.safetensors'))
  assert str(report.model_type) == 'SD 2.x (openclip text encoder)'
  assert loaded.scheduler_config['prediction_type'] == 'v_prediction'  # the 768 px default
  module, params = loaded.text_encoder
  assert (module.config.num_hidden_layers, module.config.hidden_act) == (3, 'gelu')
  assert module.config.num_attention_heads == 2
  for name in ('unet', 'vae'):
    _same_tree(getattr(loaded, name)[1], getattr(reference, name)[1])
  assert _strip_size(loaded.unet[0].config) == _strip_size(reference.unet[0].config)
  ids = np.random.default_rng(0).integers(0, 998, (2, 77))
  ours = module.apply({'params': params}, ids)
  with torch.no_grad():
    expected = text(torch.from_numpy(ids)).last_hidden_state.numpy()
  assert tr.rel_err(ours.last_hidden_state, expected) <= RTOL
  # Export joins q/k/v again and pads the dropped resblock with an identity (zero) block.
  exported = single_file.single_file_state(loaded)
  prefix = compvis.OPENCLIP_PREFIX + 'transformer.resblocks.'
  np.testing.assert_array_equal(exported[prefix + '1.attn.in_proj_weight'],
                                state[prefix + '1.attn.in_proj_weight'])
  assert not np.any(exported[prefix + '3.mlp.c_fc.weight'])


@pytest.mark.parametrize('dtype', [np.float16, jnp.bfloat16])
def test_half_precision_files_load_as_stored(sd1_dir, tmp_path, dtype):
  _, file, _, components = sd1_dir
  half = str(tmp_path / 'half.safetensors')
  single_file.save_single_file(components, half, dtype=dtype)
  again, report = single_file.load(half)
  assert report.file_dtypes == (jnp.dtype(dtype).name,)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, np.asarray(y, dtype).astype(x.dtype)),
               again.unet[1], components.unet[1])


def test_safetensors_header_size_is_not_mistaken_for_a_pickle(tmp_path):
  path = str(tmp_path / 'x.safetensors')
  for pad in range(64):  # until the header length's low byte is 0x80 or more, like a pickle's
    st_numpy.save_file({'w': np.ones(2, np.float32)}, path, metadata={'pad': 'x' * pad})
    if open(path, 'rb').read(1)[0] >= 0x80:
      break
  assert open(path, 'rb').read(1)[0] >= 0x80
  state, file_format = single_file.read_checkpoint(path)
  assert file_format == 'safetensors' and list(state) == ['w']


def _torch_shaped(module):
  """{diffusers key: zero-strided array of the PyTorch shape}: a full-size layout in no memory."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(build.abstract_params(module))[0]:
    names = tuple(k.key for k in path)
    _, _, to_torch = tables.LEAF_TABLE[names[-1], len(leaf.shape)]
    out[tables.torch_key(names)] = to_torch(np.broadcast_to(np.float32(0), leaf.shape))
  return out


def _openclip_h_file_shapes():
  """The text tower of an SD 2.x file as Stability wrote it: 24 resblocks, fused q/k/v."""
  z = lambda *shape: np.broadcast_to(np.float32(0), shape)
  out = {'token_embedding.weight': z(49408, 1024), 'positional_embedding': z(77, 1024),
         'ln_final.weight': z(1024), 'ln_final.bias': z(1024), 'text_projection': z(1024, 1024),
         'logit_scale': z()}
  for i in range(24):
    r = f'transformer.resblocks.{i}.'
    out |= {r + 'attn.in_proj_weight': z(3072, 1024), r + 'attn.in_proj_bias': z(3072),
            r + 'attn.out_proj.weight': z(1024, 1024), r + 'mlp.c_fc.weight': z(4096, 1024),
            r + 'mlp.c_fc.bias': z(4096), r + 'mlp.c_proj.weight': z(1024, 4096)}
    out |= {r + f'{m}.{leaf}': z(1024) for m in ('ln_1', 'ln_2') for leaf in ('weight', 'bias')}
    out |= {r + 'attn.out_proj.bias': z(1024), r + 'mlp.c_proj.bias': z(1024)}
  return {compvis.OPENCLIP_PREFIX + k: v for k, v in out.items()}


def _stability_yaml(version, v_prediction=False):
  """The parts of Stability's v1-inference.yaml / v2-inference(-v).yaml that the loader reads."""
  unet = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320,
              attention_resolutions=[4, 2, 1], num_res_blocks=2, channel_mult=[1, 2, 4, 4],
              use_spatial_transformer=True, transformer_depth=1, legacy=False)
  unet |= (dict(num_heads=8, context_dim=768) if version == 1 else
           dict(num_head_channels=64, use_linear_in_transformer=True, context_dim=1024))
  ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                  ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)
  params = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, image_size=64, channels=4,
                conditioning_key='crossattn', scale_factor=0.18215,
                unet_config={'params': unet},
                first_stage_config={'params': {'embed_dim': 4, 'ddconfig': ddconfig}})
  if v_prediction:
    params['parameterization'] = 'v'
  return {'model': {'target': 'ldm.models.diffusion.ddpm.LatentDiffusion', 'params': params}}


@pytest.mark.parametrize('preset, original, expected', [
    ('sd15', None, (512, 'epsilon', 'PNDMScheduler')),
    ('sd15', _stability_yaml(1), (512, 'epsilon', 'PNDMScheduler')),
    ('sd15_inpainting', None, (512, 'epsilon', 'PNDMScheduler')),
    ('sd21', None, (768, 'v_prediction', 'DDIMScheduler')),
    ('sd21', _stability_yaml(2, v_prediction=True), (768, 'v_prediction', 'DDIMScheduler')),
    ('sd21', _stability_yaml(2), (512, 'epsilon', 'DDIMScheduler')),  # 2.x-base
], ids=['sd15', 'sd15_yaml', 'sd15_inpainting', 'sd21', 'sd21_v_yaml', 'sd21_base_yaml'])
def test_full_size_layouts_give_the_preset_configs(preset, original, expected):
  unet_config = unet_lib.UNetConfig.sd21() if preset == 'sd21' else unet_lib.UNetConfig.sd15(
      in_channels=9 if preset == 'sd15_inpainting' else 4)
  vae_config, clip_config = vae_lib.VAEConfig.sd15(), text_lib.TextEncoderConfig.sd15()
  unet = _torch_shaped(unet_lib.UNet2DConditionModel(unet_config))
  vae = _torch_shaped(vae_lib.AutoencoderKL(vae_config))
  state = {compvis.UNET_PREFIX + k: v
           for k, v in compvis.unet_from_diffusers(unet, unet_config).items()}
  state |= {'first_stage_model.' + k: v
            for k, v in compvis.vae_from_diffusers(vae, vae_config).items()}
  if preset == 'sd21':
    state |= _openclip_h_file_shapes()
    text_config = text_lib.TextEncoderConfig.openclip_h()
  else:
    text_config = clip_config
    text = _torch_shaped(text_lib.CLIPTextModel(clip_config))
    state |= {compvis.CLIP_PREFIX + k: v for k, v in compvis.clip_from_diffusers(text).items()}
  counts = {p: sum(k.startswith(p) for k in state) for p in (
      compvis.UNET_PREFIX, 'first_stage_model.', 'cond_stage_model.')}
  assert list(counts.values()) == [686, 248, 294 if preset == 'sd21' else 196]
  mapped = single_file.map_checkpoint(state, config_yaml=original)
  size = mapped.settings.image_size
  assert mapped.configs[0] == dataclasses.replace(unet_config, sample_size=size // 8)
  assert mapped.configs[1] == dataclasses.replace(vae_config, sample_size=size)
  assert mapped.configs[2] == text_config
  text_keys = _torch_shaped(text_lib.CLIPTextModel(text_config))
  assert {k: v.shape for k, v in mapped.states['text_encoder'].items()} == {
      'text_model.' + k: v.shape for k, v in text_keys.items()}
  assert {k: v.shape for k, v in mapped.states['unet'].items()} == {
      k: v.shape for k, v in unet.items()}
  assert (size, mapped.scheduler_config['prediction_type'],
          mapped.scheduler_config['_class_name']) == expected


def _torch_state(state):
  return collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in state.items())


def test_ckpt_written_by_torch_loads_without_torch(sd1_dir, tmp_path):
  _, file, _, _ = sd1_dir
  state = st_numpy.load_file(file)
  weights = _torch_state(state)
  for key, value in state.items():  # EMA copies (LitEma's flattened names), distinguishable
    if key.startswith(compvis.UNET_PREFIX):
      weights[compvis.ema_key(key)] = torch.from_numpy(value + 1.0)
  weights['model_ema.num_updates'] = torch.tensor(7)
  weights['betas'] = torch.linspace(1e-4, 2e-2, 1000)
  ckpt_path = str(tmp_path / 'sd1.ckpt')
  torch.save({'state_dict': weights, 'global_step': np.int64(1234), 'epoch': 3}, ckpt_path)
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      import jax
      from ldm_jax.convert import single_file
      ema, report = single_file.load({ckpt_path!r})
      raw = single_file.load_single_file({ckpt_path!r}, use_ema=False)
      plain = single_file.load_single_file({file!r})
      assert report.ema == 'used' and report.file_format == 'ckpt', report
      jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b + 1), ema.unet[1], plain.unet[1])
      for name in ('unet', 'vae', 'text_encoder'):
        jax.tree.map(np.testing.assert_array_equal, getattr(raw, name)[1], getattr(plain, name)[1])
      assert 'torch' not in sys.modules, 'torch was imported'
      print('ok', len(report.ignored_keys))
  """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ['ok', '1']  # betas (model_ema.* goes with the EMA)


def test_ckpt_rebuilds_tensors_as_torch_does(tmp_path, monkeypatch):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {'contiguous': base, 'transposed': base.t(), 'offset_view': base[1:, 2:5],
             'half': base.half(), 'bfloat16': base.bfloat16(), 'int64': torch.arange(5),
             'bool': torch.tensor([True, False]), 'param': torch.nn.Parameter(base[0].clone()),
             'empty': torch.zeros(0, 3)}
  # Lightning pickles its callback classes as keys: they become inert stand-ins, never imported.
  module = types.ModuleType('pytorch_lightning.callbacks.model_checkpoint')

  class ModelCheckpoint:
    pass

  ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, 'ModelCheckpoint'
  module.ModelCheckpoint = ModelCheckpoint
  for name in ('pytorch_lightning', 'pytorch_lightning.callbacks'):
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
  monkeypatch.setitem(sys.modules, module.__name__, module)
  torch.save({'state_dict': tensors, 'callbacks': {ModelCheckpoint: {'best': base[0, 0]}},
              'global_step': np.int64(9), 'tags': {'a', 'b'}}, tmp_path / 'x.ckpt')
  loaded = ckpt.load(str(tmp_path / 'x.ckpt'))
  for name, t in tensors.items():
    expected = t.detach().float().numpy() if t.dtype == torch.bfloat16 else t.detach().numpy()
    np.testing.assert_array_equal(np.asarray(loaded['state_dict'][name], expected.dtype), expected)
    assert loaded['state_dict'][name].shape == tuple(t.shape)
  assert str(loaded['state_dict']['bfloat16'].dtype) == 'bfloat16'
  assert loaded['global_step'] == 9 and loaded['tags'] == {'a', 'b'}
  assert isinstance(next(iter(loaded['callbacks'])), ckpt.OpaqueObject)


# Bad input: each a clear error.


class _Evil:

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f'touch {self.target}',)


def test_pickled_code_is_refused_and_never_run(sd1_dir, tmp_path):
  _, file, _, _ = sd1_dir
  sentinel = tmp_path / 'pwned'
  bad = str(tmp_path / 'evil.ckpt')
  torch.save({'state_dict': _torch_state(st_numpy.load_file(file)), 'x': _Evil(sentinel)}, bad)
  with pytest.raises(convert.UnsafePickleError,
                     match=r'references (posix|os)\.system.*never executes pickled code'):
    convert.load_single_file(bad)
  assert not sentinel.exists()
  pickle.loads(pickle.dumps(_Evil(sentinel)))  # the same pickle, unrestricted, does run
  assert sentinel.exists()


def test_truncated_files(pipeline_dir, tmp_path):
  _, file, _, _ = pipeline_dir
  data = open(file, 'rb').read()
  (tmp_path / 'cut.safetensors').write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='truncated or corrupt'):
    convert.load_single_file(str(tmp_path / 'cut.safetensors'))
  torch.save({'state_dict': {'w': torch.ones(1000)}}, tmp_path / 'full.ckpt')
  data = (tmp_path / 'full.ckpt').read_bytes()
  (tmp_path / 'cut.ckpt').write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='truncated'):
    convert.load_single_file(str(tmp_path / 'cut.ckpt'))


def test_files_that_are_no_checkpoint(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new('RGB', (4, 4)).save(tmp_path / 'image.png')
  with pytest.raises(convert.ConversionError, match='is no checkpoint'):
    convert.load_single_file(str(tmp_path / 'image.png'))
  torch.save({'w': torch.ones(2)}, tmp_path / 'old.ckpt', _use_new_zipfile_serialization=False)
  with pytest.raises(convert.ConversionError, match='legacy'):
    convert.load_single_file(str(tmp_path / 'old.ckpt'))
  with pytest.raises(convert.ConversionError, match='no such file'):
    convert.load_single_file(str(tmp_path / 'missing.safetensors'))


@pytest.mark.parametrize('keys, message', [
    ({'conditioner.embedders.0.transformer.text_model.final_layer_norm.weight': (4,),
      'model.diffusion_model.input_blocks.0.0.weight': (8, 4, 3, 3)}, 'SDXL'),
    ({'encoder.conv_in.weight': (8, 3, 3, 3), 'decoder.conv_out.bias': (3,)},
     'unknown model type: no Stable Diffusion U-Net.*top-level names: decoder, encoder'),
    ({'model.diffusion_model.input_blocks.0.0.weight': (8, 8, 3, 3)},
     'unknown model type: the U-Net takes 8 input channels'),
    ({'model.diffusion_model.input_blocks.0.0.weight': (8, 4, 3, 3)}, 'no text encoder'),
])
def test_unknown_model_types(tmp_path, keys, message):
  st_numpy.save_file({k: np.zeros(s, np.float32) for k, s in keys.items()},
                     str(tmp_path / 'x.safetensors'))
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_single_file(str(tmp_path / 'x.safetensors'))


def test_missing_and_foreign_tensors_are_listed(sd1_dir, tmp_path):
  _, file, _, _ = sd1_dir
  state = st_numpy.load_file(file)
  del state['model.diffusion_model.out.2.bias']
  state['model.diffusion_model.extra.weight'] = np.zeros(3, np.float32)
  st_numpy.save_file(state, str(tmp_path / 'x.safetensors'))
  with pytest.raises(convert.WeightsMismatchError, match=r'(?s)missing:\n\s+conv_out.bias.*'
                     r'unexpected:\n\s+extra.weight'):
    convert.load_single_file(str(tmp_path / 'x.safetensors'))


def test_cli_converts_between_all_formats(sd1_dir, tmp_path, capsys):
  path, file, yaml_path, components = sd1_dir
  tokenizer = os.path.join(path, 'tokenizer')
  assert convert_cli.main(['--src', file, '--original_config', yaml_path, '--image_size', '16',
                           '--tokenizer', tokenizer, '--to', 'diffusers',
                           '--out', str(tmp_path / 'd')]) == 0
  out = capsys.readouterr().out
  assert 'SD 1.x (clip text encoder)' in out and 'unet          UNet2DConditionModel' in out
  assert 'float32' in out and 'M params' in out
  assert convert_cli.main(['--src', str(tmp_path / 'd'), '--to', 'orbax',
                           '--out', str(tmp_path / 'o')]) == 0
  assert convert_cli.main(['--src', str(tmp_path / 'o'), '--to', 'single_file',
                           '--out', str(tmp_path / 'again.safetensors')]) == 0
  original = st_numpy.load_file(file)
  again = st_numpy.load_file(str(tmp_path / 'again.safetensors'))
  assert sorted(original) == sorted(again)
  for key in original:
    np.testing.assert_array_equal(original[key], again[key])
  assert open(yaml_path).read() == (tmp_path / 'again.yaml').read_text()
  orbax = convert.load_orbax(str(tmp_path / 'o'))
  folder = convert.load_diffusers(str(tmp_path / 'd'))
  assert orbax.tokenizer is not None and orbax.scheduler_config == folder.scheduler_config
  for name in ('unet', 'vae', 'text_encoder'):
    _same_tree(getattr(orbax, name)[1], getattr(components, name)[1])
  assert convert_cli.main(['--src', str(tmp_path / 'nothing'), '--to', 'orbax',
                           '--out', str(tmp_path / 'x')]) == 1
  assert 'neither a single file' in capsys.readouterr().err
