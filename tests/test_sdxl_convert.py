"""SDXL weights in and out: diffusers folders (base and refiner), SGM single files, the CLI."""

import json
import os

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

import torch_reference as tr
from ldm_jax import convert
from ldm_jax.convert import __main__ as convert_cli
from ldm_jax.convert import compvis
from ldm_jax.convert import single_file
from ldm_jax.convert import single_file_config as sfc
from ldm_jax.convert import tables
from ldm_jax.models import unet as unet_lib

torch = tr.torch
KINDS = ('base', 'refiner')
NETWORKS = ('unet', 'vae', 'text_encoder', 'text_encoder_2')
_PIPELINES = {'base': 'StableDiffusionXLPipeline', 'refiner': 'StableDiffusionXLImg2ImgPipeline'}
_BIGG_PREFIX = {'base': compvis.SGM_OPENCLIP_PREFIX, 'refiner': compvis.SGM_REFINER_OPENCLIP_PREFIX}


@pytest.fixture(scope='module')
def xl(tmp_path_factory):
  """{kind: (folder diffusers wrote, its pipeline, our Components, our single file)}."""
  out = {}
  for kind in KINDS:
    root = tmp_path_factory.mktemp(f'sdxl_{kind}')
    folder = str(root / 'folder')
    pipe = tr.save_sdxl_pipeline(folder, refiner=kind == 'refiner')
    components = convert.load_diffusers(folder)
    file = str(root / 'model.safetensors')
    convert.save_single_file(components, file, config_yaml=str(root / 'model.yaml'))
    out[kind] = folder, pipe, components, file
  return out


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _same_components(a, b):
  for name in NETWORKS:
    if getattr(a, name) is None:
      assert getattr(b, name) is None, name
      continue
    assert getattr(a, name)[0].config == getattr(b, name)[0].config, name
    _same_tree(getattr(a, name)[1], getattr(b, name)[1])
  assert (a.options, a.scheduler_config) == (b.options, b.scheduler_config)


def _torch_state(model):
  return {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith('position_ids')}


def _assert_same_state(ours, theirs):
  ours = {k.removeprefix('text_model.'): v for k, v in ours.items()}
  theirs = {k.removeprefix('text_model.'): v for k, v in theirs.items()}
  assert sorted(ours) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], np.asarray(value), err_msg=key)


def _assert_same_file(a, b):
  """Same tensors, bit for bit, and the same metadata (whose order safetensors does not keep)."""
  state, again = st_numpy.load_file(a), st_numpy.load_file(b)
  assert sorted(state) == sorted(again)
  for key, value in state.items():
    assert value.dtype == again[key].dtype and value.tobytes() == again[key].tobytes(), key
  assert single_file.read_metadata(a) == single_file.read_metadata(b)


@pytest.mark.parametrize('kind', KINDS)
def test_diffusers_sdxl_folders_load_with_identical_parameters(xl, kind):
  _, pipe, components, _ = xl[kind]
  assert components.unet[0].config.is_xl
  assert components.text_encoder_2[0].config.with_projection
  assert components.tokenizer_2('abc').input_ids == [998, 0, 2, 5, 999]
  assert components.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'
  assert components.options == {'force_zeros_for_empty_prompt': True,
                                'requires_aesthetics_score': kind == 'refiner'}
  if kind == 'refiner':
    assert components.text_encoder is None and components.tokenizer is None
  for name in NETWORKS:
    if getattr(pipe, name) is not None:
      _assert_same_state(tables.to_torch(getattr(components, name)[1]),
                         _torch_state(getattr(pipe, name)))


def _added_cond(kind, g):
  ids = 5 if kind == 'refiner' else 6
  return {'text_embeds': torch.randn(2, 32, generator=g),
          'time_ids': torch.rand(2, ids, generator=g) * 1024}


@pytest.mark.parametrize('kind', KINDS)
def test_our_sdxl_export_loads_in_diffusers_with_identical_outputs(xl, kind, tmp_path):
  _, pipe, components, _ = xl[kind]
  convert.save_diffusers(components, str(tmp_path))
  index = json.loads((tmp_path / 'model_index.json').read_text())
  assert index['_class_name'] == _PIPELINES[kind]
  assert index.get('requires_aesthetics_score', False) == (kind == 'refiner')
  again = getattr(tr.diffusers, _PIPELINES[kind]).from_pretrained(str(tmp_path))
  assert again.config.force_zeros_for_empty_prompt
  assert type(again.scheduler).__name__ == 'EulerDiscreteScheduler'
  g = torch.Generator().manual_seed(0)
  width = 32 if kind == 'refiner' else 64
  x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, width, generator=g)
  added, ids = _added_cond(kind, g), torch.randint(0, 998, (2, 77), generator=g)
  def outputs(m):
    second = m.text_encoder_2(ids, output_hidden_states=True)
    first = [m.text_encoder(ids).last_hidden_state] if kind == 'base' else []
    return [m.unet(x, 10, context, added_cond_kwargs=added).sample, second.text_embeds,
            second.hidden_states[-2], second.last_hidden_state] + first

  with torch.no_grad():
    for exported, original in zip(outputs(again), outputs(pipe), strict=True):
      torch.testing.assert_close(exported, original, rtol=0, atol=0)
  assert again.tokenizer_2('abc').input_ids == [998, 0, 2, 5, 999]
  _same_components(convert.load_diffusers(str(tmp_path)), components)


@pytest.mark.parametrize('kind', KINDS)
def test_sgm_single_file_matches_diffusers_loader_and_round_trips(xl, kind, tmp_path):
  folder, pipe, components, file = xl[kind]
  state = st_numpy.load_file(file)
  assert all(k.startswith(('model.diffusion_model.', 'first_stage_model.',
                           'conditioner.embedders.')) for k in state)
  assert 'model.diffusion_model.label_emb.0.0.weight' in state
  bigg = _BIGG_PREFIX[kind]
  assert bigg + 'transformer.resblocks.2.attn.in_proj_weight' in state  # all 3 layers kept
  assert bigg + 'transformer.resblocks.3.ln_1.weight' not in state
  # diffusers' own single-file loader reads our file into the very same networks; it takes the
  # second encoder for CLIP-L when both are equally wide (as here), so that one goes through
  # diffusers' own OpenCLIP conversion.
  cls = getattr(tr.diffusers, _PIPELINES[kind])
  theirs = cls.from_single_file(file, config=folder, local_files_only=True)
  for name in ('unet', 'vae') + (('text_encoder',) if kind == 'base' else ()):
    _assert_same_state(_torch_state(getattr(theirs, name)), _torch_state(getattr(pipe, name)))
  torch_file = {k: torch.from_numpy(v) for k, v in state.items()}
  converted = tr.diffusers.loaders.single_file_utils.convert_open_clip_checkpoint(
      pipe.text_encoder_2, torch_file, prefix=bigg)
  _assert_same_state({k: v.numpy() for k, v in converted.items()},
                     _torch_state(pipe.text_encoder_2))
  # file -> diffusers folder -> file: bit-exact, and the same model each way.
  loaded = convert.load_single_file(file, config=folder)
  _same_components(loaded, components)
  convert.save_diffusers(loaded, str(tmp_path / 'folder'))
  again = convert.load_diffusers(str(tmp_path / 'folder'))
  convert.save_single_file(again, str(tmp_path / 'again.safetensors'))
  _assert_same_file(file, str(tmp_path / 'again.safetensors'))


@pytest.mark.parametrize('kind', KINDS)
def test_sgm_file_from_the_wild_is_detected_with_sdxl_defaults(xl, kind):
  _, _, components, file = xl[kind]
  mapped = single_file.map_checkpoint(st_numpy.load_file(file))  # no metadata, no YAML
  family = 'sdxl_refiner' if kind == 'refiner' else 'sdxl'
  assert mapped.model_type.family == family and mapped.configs_from.startswith('tensor shapes')
  s = mapped.settings
  assert (s.image_size, s.prediction_type, s.scaling_factor) == (1024, 'epsilon', 0.13025)
  assert mapped.scheduler_config['_class_name'] == 'EulerDiscreteScheduler'
  assert mapped.scheduler_config['timestep_spacing'] == 'leading'
  assert mapped.options['requires_aesthetics_score'] == (kind == 'refiner')
  unet, vae, text, text_2 = mapped.configs
  want = components.unet[0].config
  for field in ('block_out_channels', 'down_block_types', 'up_block_types', 'layers_per_block',
                'cross_attention_dim', 'addition_embed_type', 'addition_time_embed_dim',
                'projection_class_embeddings_input_dim', 'use_linear_projection'):
    assert getattr(unet, field) == getattr(want, field), field
  # Level 0 has no attention: its depth is unused, and the mid block's (2) is the last level's.
  assert unet.transformer_layers_per_block == (2, 2)
  assert (vae.scaling_factor, vae.force_upcast) == (0.13025, True)
  assert (text is None) == (kind == 'refiner')
  assert text_2.with_projection and text_2.num_hidden_layers == 3 and text_2.hidden_act == 'gelu'


@pytest.mark.parametrize('preset, family', [('sdxl', 'sdxl'), ('sdxl_refiner', 'sdxl_refiner')])
def test_released_sdxl_unets_match_diffusers_layout_and_shape_rules(preset, family):
  # The full-size U-Nets, on torch's meta device (names and shapes only): our SGM keys are the
  # ones diffusers' own converter reads, and a file from the wild gets exactly the preset back.
  config = getattr(unet_lib.UNetConfig, preset)()
  raw = config.to_diffusers()
  with torch.device('meta'):
    state = tr.diffusers.UNet2DConditionModel.from_config(raw).state_dict()
  sgm = compvis.unet_from_diffusers(dict(state), config)
  upsampler = 2 if preset == 'sdxl' else 1  # after the attention, where the up level has one
  assert {'label_emb.0.0.weight', 'label_emb.0.2.bias',
          f'output_blocks.2.{upsampler}.conv.weight'} < set(sgm)
  back = tr.diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint(
      {compvis.UNET_PREFIX + k: v for k, v in sgm.items()},
      dict(raw, layers_per_block=raw['layers_per_block'][0]))
  assert sorted(back) == sorted(state) and all(back[k] is state[k] for k in state)
  model_type = compvis.ModelType(family, False, 'openclip')
  settings = sfc.resolve_settings(model_type)
  assert sfc.unet_config(compvis.unet_to_diffusers(sgm), model_type, settings, 8,
                         pooled_dim=1280) == config


@pytest.mark.parametrize('prefix, dropped, network, missing', [
    (compvis.UNET_PREFIX, 'label_emb.0.2.bias', 'unet', 'add_embedding.linear_2.bias'),
    (compvis.SGM_OPENCLIP_PREFIX, 'text_projection', 'text_encoder_2', 'text_projection.weight'),
])
def test_missing_and_foreign_sdxl_tensors_are_listed(xl, tmp_path, prefix, dropped, network,
                                                     missing):
  file = xl['base'][3]
  state = st_numpy.load_file(file)
  del state[prefix + dropped]
  state[prefix + 'extra.weight'] = np.zeros(3, np.float32)
  st_numpy.save_file(state, str(tmp_path / 'x.safetensors'),
                     metadata=single_file.read_metadata(file))
  with pytest.raises(convert.WeightsMismatchError, match=rf'(?s){network}: the weights do not '
                     rf'fit.*missing:\n\s+{missing}.*unexpected:\n\s+extra.weight'):
    convert.load_single_file(str(tmp_path / 'x.safetensors'))


@pytest.mark.parametrize('drop, message', [
    (compvis.SGM_CLIP_PREFIX, 'OpenCLIP bigG .* but no CLIP-L'),
    (compvis.SGM_OPENCLIP_PREFIX,
     'without OpenCLIP bigG: it has conditioner.embedders.0.transformer'),
])
def test_incomplete_sgm_files_say_what_they_lack(xl, tmp_path, drop, message):
  state = {k: v for k, v in st_numpy.load_file(xl['base'][3]).items() if not k.startswith(drop)}
  st_numpy.save_file(state, str(tmp_path / 'x.safetensors'))
  with pytest.raises(convert.ConversionError, match=message):
    convert.load_single_file(str(tmp_path / 'x.safetensors'))


def test_cli_converts_sdxl_both_ways(xl, tmp_path, capsys):
  folder, _, components, file = xl['base']
  tok = lambda name: os.path.join(folder, name)
  assert convert_cli.main(['--src', file, '--to', 'diffusers', '--out', str(tmp_path / 'd'),
                           '--tokenizer', tok('tokenizer'), '--tokenizer_2',
                           tok('tokenizer_2')]) == 0
  out = capsys.readouterr().out
  assert 'SDXL (clip+openclip text encoders)' in out and 'text_encoder_2' in out
  assert 'tokenizer yes, tokenizer_2 yes' in out and 'force_zeros_for_empty_prompt=True' in out
  again = convert.load_diffusers(str(tmp_path / 'd'))
  _same_components(again, components)
  assert again.tokenizer_2 is not None
  assert convert_cli.main(['--src', str(tmp_path / 'd'), '--to', 'single_file',
                           '--out', str(tmp_path / 'again.safetensors')]) == 0
  _assert_same_file(file, str(tmp_path / 'again.safetensors'))
  assert 'sgm.models.diffusion.DiffusionEngine' in (tmp_path / 'again.yaml').read_text()
