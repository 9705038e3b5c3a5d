"""diffusers folders in and out: loading, export round trips, and every kind of bad input."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors import numpy as st_numpy

import torch_reference as tr
from ldm_jax import convert
from ldm_jax.convert import diffusers as convert_diffusers

torch = tr.torch


@pytest.fixture(scope='module')
def pipeline_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('sd_tiny'))
  models = tr.save_pipeline(path)
  return path, models


def _same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_load_diffusers_reads_every_component(pipeline_dir):
  path, _ = pipeline_dir
  components = convert.load_diffusers(path)
  unet_module, _ = components.unet
  assert unet_module.config.block_out_channels == (32, 64)
  assert components.vae[0].config.scaling_factor == 0.18215
  assert components.text_encoder[0].config.num_hidden_layers == 3
  assert components.scheduler_config['beta_schedule'] == 'scaled_linear'
  assert components.tokenizer('abc').input_ids == [998, 0, 2, 5, 999]


def test_export_loads_in_diffusers_with_the_same_outputs(pipeline_dir, tmp_path):
  path, (unet, vae, text_encoder) = pipeline_dir
  components = convert.load_diffusers(path)
  convert.save_diffusers(components, str(tmp_path))
  pipe = tr.diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path), safety_checker=None)
  tr.assert_same_pipeline_outputs(pipe, unet, vae, text_encoder)
  assert pipe.tokenizer('abc').input_ids == [998, 0, 2, 5, 999]
  assert type(pipe.scheduler).__name__ == 'DDIMScheduler'


def test_export_reimports_bit_exact(pipeline_dir, tmp_path):
  components = convert.load_diffusers(pipeline_dir[0])
  convert.save_diffusers(components, str(tmp_path))
  # We write the text encoder with the `text_model.` prefix (transformers 5 writes none).
  keys = st_numpy.load_file(str(tmp_path / 'text_encoder' / 'model.safetensors'))
  assert all(k.startswith('text_model.') for k in keys)
  again = convert.load_diffusers(str(tmp_path))
  for name in ('unet', 'vae', 'text_encoder'):
    _same_tree(getattr(components, name)[1], getattr(again, name)[1])
    assert getattr(components, name)[0].config == getattr(again, name)[0].config


def test_vae_with_old_attention_names_loads(pipeline_dir, tmp_path):
  path, _ = pipeline_dir
  shutil.copytree(os.path.join(path, 'vae'), tmp_path / 'vae')
  weights = tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors'
  renames = {'to_q.': 'query.', 'to_k.': 'key.', 'to_v.': 'value.', 'to_out.0.': 'proj_attn.'}
  old = {}
  for key, value in st_numpy.load_file(str(weights)).items():
    for new_name, old_name in renames.items():
      key = key.replace('attentions.0.' + new_name, 'attentions.0.' + old_name)
    old[key] = value
  assert any('.proj_attn.' in k for k in old)
  st_numpy.save_file(old, str(weights))
  _, params = convert_diffusers.load_vae(str(tmp_path / 'vae'))
  _same_tree(params, convert_diffusers.load_vae(os.path.join(path, 'vae'))[1])


def test_sharded_safetensors_load(pipeline_dir, tmp_path):
  path, (unet, _, _) = pipeline_dir
  unet.save_pretrained(str(tmp_path), max_shard_size='1MB')
  assert os.path.isfile(tmp_path / 'diffusion_pytorch_model.safetensors.index.json')
  _, params = convert_diffusers.load_unet(str(tmp_path))
  _same_tree(params, convert_diffusers.load_unet(os.path.join(path, 'unet'))[1])


def test_fp16_variant_loads_into_float32_params(pipeline_dir, tmp_path):
  _, (unet, _, _) = pipeline_dir
  unet.half().save_pretrained(str(tmp_path), variant='fp16')
  unet.float()
  _, params = convert_diffusers.load_unet(str(tmp_path), variant='fp16')
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype('float32')}


# Bad input: each a clear error naming the problem.


def test_folder_missing_a_component(pipeline_dir, tmp_path):
  shutil.copytree(pipeline_dir[0], tmp_path / 'sd', ignore=shutil.ignore_patterns('vae'))
  with pytest.raises(convert.ConversionError, match=r'missing vae/'):
    convert.load_diffusers(str(tmp_path / 'sd'))


def test_folder_without_model_index(tmp_path):
  with pytest.raises(convert.ConversionError, match='no model_index.json'):
    convert.load_diffusers(str(tmp_path))


def test_pickle_weights_are_refused_with_a_way_out(pipeline_dir, tmp_path):
  pipeline_dir[1][0].save_pretrained(str(tmp_path), safe_serialization=False)
  with pytest.raises(convert.ConversionError, match='never unpickles.*safe_serialization=True'):
    convert_diffusers.load_unet(str(tmp_path))


def test_weights_from_another_architecture_list_every_key(pipeline_dir, tmp_path):
  path, _ = pipeline_dir
  shutil.copytree(os.path.join(path, 'unet'), tmp_path / 'unet')
  shutil.copy(os.path.join(path, 'vae', 'diffusion_pytorch_model.safetensors'), tmp_path / 'unet')
  with pytest.raises(convert.WeightsMismatchError) as e:
    convert_diffusers.load_unet(str(tmp_path / 'unet'))
  message = str(e.value)
  assert 'missing:' in message and 'unexpected:' in message
  assert 'time_embedding.linear_1.weight' in message  # a U-Net key the VAE file lacks
  assert 'encoder.mid_block.attentions.0.to_q.weight' in message  # a VAE key the U-Net lacks


def test_mis_shaped_weights_are_listed(pipeline_dir, tmp_path):
  path, _ = pipeline_dir
  shutil.copytree(os.path.join(path, 'unet'), tmp_path / 'unet')
  config_path = tmp_path / 'unet' / 'config.json'
  config = json.loads(config_path.read_text())
  config['cross_attention_dim'] = 48  # as an SD 2 config (1024) over SD 1 weights (768)
  config_path.write_text(json.dumps(config))
  with pytest.raises(convert.WeightsMismatchError, match=r'mis-shaped:\n.*attn2.to_k.weight: file '
                     r'has \(32, 32\), model expects \(32, 48\)'):
    convert_diffusers.load_unet(str(tmp_path / 'unet'))


def test_truncated_weights_file(pipeline_dir, tmp_path):
  path, _ = pipeline_dir
  shutil.copytree(os.path.join(path, 'vae'), tmp_path / 'vae')
  weights = tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors'
  weights.write_bytes(weights.read_bytes()[:5000])
  with pytest.raises(convert.ConversionError, match='not a readable safetensors file'):
    convert_diffusers.load_vae(str(tmp_path / 'vae'))


def test_unknown_block_type_in_config_json(pipeline_dir, tmp_path):
  path, _ = pipeline_dir
  shutil.copytree(os.path.join(path, 'unet'), tmp_path / 'unet')
  config_path = tmp_path / 'unet' / 'config.json'
  config = json.loads(config_path.read_text())
  config['up_block_types'] = ['UpBlock2D', 'KCrossAttnUpBlock2D']
  config_path.write_text(json.dumps(config))
  with pytest.raises(ValueError, match="unknown block type 'KCrossAttnUpBlock2D'"):
    convert_diffusers.load_unet(str(tmp_path / 'unet'))
