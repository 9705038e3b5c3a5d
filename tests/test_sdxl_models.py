"""SDXL's networks against the PyTorch reference (diffusers / transformers), float32: the U-Net's
text_time conditioning (base and refiner layouts), the second text encoder, preset sizes."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import torch_reference as tr
from ldm_jax.convert import diffusers as convert_diffusers
from ldm_jax.models import build
from ldm_jax.models import text_encoder
from ldm_jax.models import unet
from ldm_jax.models import vae

torch = tr.torch
RTOL = 1e-4  # max abs difference relative to the output's scale, float32

# diffusers' tiny SDXL test U-Net (UNetConfig.tiny_xl) and a tiny refiner layout: DownBlock2D at
# both ends, a 32-wide context, 5 time ids (original size, crop, aesthetic score).
XL_UNETS = {
    'base': dict(unet.UNetConfig.tiny_xl().to_diffusers(), sample_size=8),
    'refiner': dict(
        unet.UNetConfig.tiny_xl().to_diffusers(), block_out_channels=[32, 64, 64],
        layers_per_block=1, attention_head_dim=[2, 4, 4], transformer_layers_per_block=2,
        down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'],
        up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'],
        cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8),
}
TIME_IDS = {  # per batch row, as the SDXL pipelines build them
    'base': [[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]],
    'refiner': [[64, 64, 0, 0, 6.0], [64, 64, 0, 0, 2.5]],
}


@pytest.mark.parametrize('layout', sorted(XL_UNETS))
def test_xl_unet_matches_diffusers(layout, tmp_path):
  torch.manual_seed(0)
  ref = tr.perturb(tr.diffusers.UNet2DConditionModel.from_config(XL_UNETS[layout]))
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_unet(str(tmp_path))
  assert module.config.is_xl and set(params['add_embedding']) == {'linear_1', 'linear_2'}
  c = module.config
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 7, c.cross_attention_dim)).astype(np.float32)
  time_ids = np.array(TIME_IDS[layout], np.float32)
  pooled = rng.standard_normal(
      (2, c.projection_class_embeddings_input_dim - time_ids.shape[1] * 8)).astype(np.float32)
  t = np.array([3, 801])
  added = {'text_embeds': pooled, 'time_ids': time_ids}
  ours = jax.jit(module.apply)({'params': params}, x, t, context, added)
  with torch.no_grad():
    expected = ref(tr.nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                   added_cond_kwargs={k: torch.from_numpy(v) for k, v in added.items()}).sample
    # The conditioning matters: other time ids move the output.
    other = ref(tr.nchw(x), torch.from_numpy(t), torch.from_numpy(context),
                added_cond_kwargs={'text_embeds': torch.from_numpy(pooled),
                                   'time_ids': torch.from_numpy(time_ids[::-1].copy())}).sample
  err = tr.rel_err(ours, tr.nhwc(expected))
  print(f'{layout} xl unet rel err {err:.2e}')
  assert err <= RTOL
  assert tr.rel_err(tr.nhwc(other), tr.nhwc(expected)) > 1e-3


def test_xl_unet_added_cond_kwargs_errors():
  xl = unet.UNet2DConditionModel(unet.UNetConfig.tiny_xl())
  params = build.abstract_params(xl)
  x, t, context = build.example_inputs(xl)[:3]
  shapes = lambda m, *a: jax.eval_shape(lambda p, *a: m.apply({'params': p}, *a), *a)
  with pytest.raises(ValueError, match='needs added_cond_kwargs.*time_ids'):
    shapes(xl, params, x, t, context)
  with pytest.raises(ValueError, match='projection_class_embeddings_input_dim=80'):
    shapes(xl, params, x, t, context, {'text_embeds': jnp.zeros((1, 32)),
                                       'time_ids': jnp.zeros((1, 5))})
  sd = unet.UNet2DConditionModel(unet.UNetConfig.tiny())
  with pytest.raises(ValueError, match='no added conditioning'):
    shapes(sd, build.abstract_params(sd), x, t, jnp.zeros((1, 1, 32)),
           {'text_embeds': jnp.zeros((1, 32)), 'time_ids': jnp.zeros((1, 6))})


def test_text_encoder_with_projection_matches_transformers(tmp_path):
  # SDXL's text_encoder_2 config in tiny: gelu, legacy eos_token_id=2 (pooled at argmax(ids)).
  config = text_encoder.TextEncoderConfig.tiny(with_projection=True, hidden_act='gelu')
  torch.manual_seed(0)
  ref = tr.perturb(tr.transformers.CLIPTextModelWithProjection(
      tr.transformers.CLIPTextConfig(**config.to_transformers())))
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_text_encoder(str(tmp_path))
  assert module.config == config
  ids = np.random.default_rng(2).integers(0, 998, (2, 77))
  ids[:, 0] = 998  # BOS
  ids[0, 9:] = 999  # EOS, then EOS padding
  ids[1, 30:] = 0  # EOS, then "!" padding (SDXL's tokenizer_2)
  ids[1, 30] = 999
  out = jax.jit(module.apply)({'params': params}, jnp.asarray(ids))
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids), output_hidden_states=True)
  errs = {'last': tr.rel_err(out.last_hidden_state, expected.last_hidden_state.numpy()),
          'penultimate': tr.rel_err(out.hidden_states[-2], expected.hidden_states[-2].numpy()),
          'text_embeds': tr.rel_err(out.text_embeds, expected.text_embeds.numpy())}
  print('text encoder 2 rel errs', errs)
  assert len(out.hidden_states) == len(expected.hidden_states)
  assert max(errs.values()) <= RTOL


def _torch_count(model):
  return sum(p.numel() for p in model.parameters())


def test_sdxl_parameter_counts_match_diffusers():
  # Both sides count shapes only: jax.eval_shape, and torch's meta device (nothing allocated).
  te = text_encoder.TextEncoderConfig.openclip_bigg()
  with torch.device('meta'):
    ours_refs = [
        (unet.UNet2DConditionModel(config), tr.diffusers.UNet2DConditionModel.from_config(
            config.to_diffusers()))
        for config in (unet.UNetConfig.sdxl(), unet.UNetConfig.sdxl_refiner())]
    ours_refs.append((vae.AutoencoderKL(vae.VAEConfig.sdxl()),
                      tr.diffusers.AutoencoderKL.from_config(vae.VAEConfig.sdxl().to_diffusers())))
    ours_refs.append((text_encoder.CLIPTextModel(te), tr.transformers.CLIPTextModelWithProjection(
        tr.transformers.CLIPTextConfig(**te.to_transformers()))))
  counts = [(build.count_params(build.abstract_params(ours)), _torch_count(ref))
            for ours, ref in ours_refs]
  print('sdxl, refiner, vae, bigG parameter counts (ours, torch):', counts)
  assert counts[0][0] == 2_567_463_684
  assert all(a == b for a, b in counts), counts


def test_sdxl_presets_round_trip_and_refuse_other_added_conditioning():
  for config in (unet.UNetConfig.sdxl(), unet.UNetConfig.sdxl_refiner(),
                 unet.UNetConfig.tiny_xl()):
    raw = config.to_diffusers()
    assert raw['addition_embed_type'] == 'text_time' and config.is_xl
    assert unet.UNetConfig.from_diffusers(raw) == config
  assert not unet.UNetConfig.sd15().is_xl
  for config in (vae.VAEConfig.sdxl(), vae.VAEConfig.sdxl_fp16_fix()):
    assert config.scaling_factor == 0.13025
    assert vae.VAEConfig.from_diffusers(config.to_diffusers()) == config
  assert vae.VAEConfig.sdxl().force_upcast and not vae.VAEConfig.sdxl_fp16_fix().force_upcast
  te = text_encoder.TextEncoderConfig.openclip_bigg()
  assert te.to_transformers()['architectures'] == ['CLIPTextModelWithProjection']
  assert text_encoder.TextEncoderConfig.from_transformers(te.to_transformers()) == te
  raw = unet.UNetConfig.tiny_xl().to_diffusers() | {'addition_embed_type': 'text_image'}
  with pytest.raises(ValueError, match="addition_embed_type='text_image'"):
    unet.UNetConfig.from_diffusers(raw)
  with pytest.raises(ValueError, match='needs addition_time_embed_dim'):
    unet.UNetConfig.tiny(addition_embed_type='text_time')


@pytest.mark.parametrize('preset, second', [('tiny_xl', 32), ('sdxl', 1280)])
def test_networks_from_config_builds_both_text_encoders(preset, second):
  model = ml_collections.ConfigDict(dict(
      preset=preset, dtype='float32', param_dtype='float32', attention_impl='auto', remat='none'))
  nets = build.networks_from_config(model)
  assert set(nets) == {'unet', 'vae', 'text_encoder', 'text_encoder_2'}
  te1, te2 = nets['text_encoder'].config, nets['text_encoder_2'].config
  assert te2.with_projection and te2.hidden_size == second
  assert te1.hidden_size + te2.hidden_size == nets['unet'].config.cross_attention_dim
  assert nets['unet'].config.is_xl
  if preset == 'tiny_xl':  # abstract_params (init) traces the XL U-Net with added_cond_kwargs
    assert build.count_params(build.abstract_params(nets['unet'])) > 0
