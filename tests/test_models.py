"""The networks without a reference: preset sizes, configs, dtypes, remat and attention impls
(the kernels themselves: test_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import build
from ldm_jax.models import text_encoder
from ldm_jax.models import unet
from ldm_jax.models import vae


@pytest.mark.parametrize('make, millions, tensors', [
    (lambda: unet.UNet2DConditionModel(unet.UNetConfig.sd15()), 859.52, 686),
    (lambda: unet.UNet2DConditionModel(unet.UNetConfig.sd21()), 865.91, 686),
    (lambda: vae.AutoencoderKL(vae.VAEConfig.sd15()), 83.65, 248),
    (lambda: text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.sd15()), 123.06, 196),
    (lambda: text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.openclip_h()), 340.39, 372),
], ids=['sd15_unet', 'sd21_unet', 'vae', 'clip_l', 'openclip_h'])
def test_preset_parameter_counts(make, millions, tensors):
  abstract = build.abstract_params(make())  # shapes only: nothing is allocated
  assert round(build.count_params(abstract) / 1e6, 2) == millions
  assert len(jax.tree.leaves(abstract)) == tensors


def test_parameter_paths_mirror_diffusers_keys():
  abstract = build.abstract_params(unet.UNet2DConditionModel(unet.UNetConfig.tiny()))
  assert abstract['down_blocks_0']['resnets_0']['conv1']['kernel'].shape == (3, 3, 32, 32)
  block = abstract['down_blocks_0']['attentions_0']['transformer_blocks_0']
  assert set(block) == {'norm1', 'attn1', 'norm2', 'attn2', 'norm3', 'ff'}
  assert set(block['ff']) == {'net_0', 'net_2'} and 'to_out_0' in block['attn1']
  assert set(abstract['time_embedding']) == {'linear_1', 'linear_2'}


def test_config_round_trips_through_diffusers_json():
  for config in (unet.UNetConfig.sd15(), unet.UNetConfig.sd21(), unet.UNetConfig.tiny()):
    raw = config.to_diffusers()
    assert raw['attention_head_dim'] == list(config.num_attention_heads)
    assert unet.UNetConfig.from_diffusers(raw) == config
  assert vae.VAEConfig.from_diffusers(vae.VAEConfig.sd15().to_diffusers()) == vae.VAEConfig.sd15()
  te = text_encoder.TextEncoderConfig.openclip_h()
  assert text_encoder.TextEncoderConfig.from_transformers(te.to_transformers()) == te


def test_unknown_block_type_is_a_clear_error():
  raw = unet.UNetConfig.tiny().to_diffusers()
  raw['down_block_types'] = ['CrossAttnDownBlock2D', 'SimpleCrossAttnDownBlock2D']
  with pytest.raises(ValueError, match="unknown block type 'SimpleCrossAttnDownBlock2D'"):
    unet.UNetConfig.from_diffusers(raw)


def test_unsupported_features_are_refused_by_name():
  raw = unet.UNetConfig.tiny().to_diffusers() | {
      'addition_embed_type': 'text_image', 'some_future_key': 1}
  with pytest.raises(ValueError, match="addition_embed_type='text_image'.*some_future_key"):
    unet.UNetConfig.from_diffusers(raw)


def _tiny_models(**kw):
  return [unet.UNet2DConditionModel(unet.UNetConfig.tiny(**kw)),
          vae.AutoencoderKL(vae.VAEConfig.tiny(**kw)),
          text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.tiny(**kw))]


def _inputs(module):
  rng = np.random.default_rng(0)
  if isinstance(module, unet.UNet2DConditionModel):
    return (rng.standard_normal((2, 8, 8, 4), np.float32), np.array([1, 999]),
            rng.standard_normal((2, 77, 32), np.float32))
  if isinstance(module, vae.AutoencoderKL):
    return (rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32),)
  return (rng.integers(0, 1000, (2, 77)),)


def _main_output(out):
  if isinstance(out, tuple):  # the VAE: (decoded, mean, logvar)
    return out[0]
  return getattr(out, 'last_hidden_state', out)


def _apply(module, params, *args, method=None):
  """A jitted apply: on CPU, eager op-by-op dispatch is ~100x slower than compiling."""
  return jax.jit(lambda p, *a: module.apply({'params': p}, *a, method=method))(params, *args)


def _bf16_outputs(module, module_bf16, params):
  """(float32, bf16) outputs of each network; the VAE's encoder and decoder count separately."""
  args = _inputs(module)
  if not isinstance(module, vae.AutoencoderKL):
    return [(_main_output(_apply(module, params, *args)),
             _main_output(_apply(module_bf16, params, *args)))]
  mean, _ = _apply(module, params, *args, method='encode')
  mean_bf16, _ = _apply(module_bf16, params, *args, method='encode')
  return [(mean, mean_bf16), (_apply(module, params, mean, method='decode'),
                              _apply(module_bf16, params, mean, method='decode'))]


def test_bf16_compute_stays_close_to_float32():
  # PyTorch diffusers in bf16 lands at 1.6e-2 (U-Net) and 1.8e-2 (VAE decoder) on these configs.
  for module, module_bf16 in zip(_tiny_models(), _tiny_models(dtype=jnp.bfloat16)):
    params = build.random_params(module, 0)
    for ref, out in _bf16_outputs(module, module_bf16, params):
      assert out.dtype == jnp.bfloat16 or out.dtype == jnp.float32  # VAE moments are float32
      err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
      assert err <= 2e-2, (type(module).__name__, err)


def test_bf16_param_storage():
  module = unet.UNet2DConditionModel(unet.UNetConfig.tiny(param_dtype=jnp.bfloat16))
  abstract = build.abstract_params(module)
  assert {x.dtype for x in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.bfloat16)}


def test_remat_keeps_paths_outputs_and_gradients():
  for module, module_remat in zip(_tiny_models(), _tiny_models(remat=True)):
    params = build.random_params(module, 1)
    assert jax.tree.structure(build.abstract_params(module_remat)) == jax.tree.structure(params)
    args = _inputs(module)
    loss = lambda m, p: jnp.mean(jnp.square(_main_output(m.apply({'params': p}, *args))))
    value, g = jax.jit(jax.value_and_grad(lambda p: loss(module, p)))(params)
    value_remat, g_remat = jax.jit(jax.value_and_grad(lambda p: loss(module_remat, p)))(params)
    np.testing.assert_allclose(value, value_remat, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g, g_remat)


def test_attention_implementations_agree():
  module = unet.UNet2DConditionModel(unet.UNetConfig.tiny())
  module_jax = unet.UNet2DConditionModel(unet.UNetConfig.tiny(attention_impl='jax'))
  params = build.random_params(module, 2)
  args = _inputs(module)
  np.testing.assert_allclose(_apply(module, params, *args), _apply(module_jax, params, *args),
                             rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='attention_impl'):
    unet.UNetConfig.tiny(attention_impl='flash')


def test_text_encoder_rejects_too_long_input():
  module = text_encoder.CLIPTextModel(text_encoder.TextEncoderConfig.tiny())
  params = build.random_params(module, 0)
  with pytest.raises(ValueError, match='at most 77'):
    module.apply({'params': params}, jnp.zeros((1, 78), jnp.int32))
