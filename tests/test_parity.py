"""Parity of the three networks with the PyTorch reference (diffusers / transformers), float32.

Each test builds a tiny random reference model, saves it with `save_pretrained`, loads it through
ldm_jax.convert and compares outputs. Tolerance: max |ours - ref| <= 1e-4 * max |ref|.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as tr
from ldm_jax.convert import diffusers as convert_diffusers

torch = tr.torch
RTOL = 1e-4  # max abs difference relative to the output's scale, float32

UNET_VARIANTS = {
    'conv_proj_2_levels': {},
    'linear_proj_upcast_3_levels': dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 4),
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
        use_linear_projection=True, upcast_attention=True, transformer_layers_per_block=2),
    'inpainting_9_channels': dict(in_channels=9),
}


@pytest.mark.parametrize('variant', sorted(UNET_VARIANTS))
def test_unet_matches_diffusers(variant, tmp_path):
  ref = tr.tiny_unet(**UNET_VARIANTS[variant])
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_unet(str(tmp_path))
  rng = np.random.default_rng(0)
  # 10x10 latents on 3 levels exercise diffusers' odd-size upsampling (3 -> 5).
  side = 10 if len(module.config.block_out_channels) == 3 else 8
  x = rng.standard_normal((2, side, side, module.config.in_channels)).astype(np.float32)
  context = rng.standard_normal((2, 7, 32)).astype(np.float32)
  t = np.array([3, 801])
  ours = module.apply({'params': params}, x, t, context)
  with torch.no_grad():
    expected = ref(tr.nchw(x), torch.from_numpy(t), torch.from_numpy(context)).sample
  assert ours.shape == x.shape[:3] + (4,)
  assert tr.rel_err(ours, tr.nhwc(expected)) <= RTOL


def test_vae_matches_diffusers(tmp_path):
  ref = tr.tiny_vae()
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_vae(str(tmp_path))
  images = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  mean, logvar = module.apply({'params': params}, images, method='encode')
  decoded = module.apply({'params': params}, mean, method='decode')
  with torch.no_grad():
    posterior = ref.encode(tr.nchw(images)).latent_dist
    expected_decoded = ref.decode(posterior.mean).sample
  assert mean.shape == (2, 8, 8, 4)
  assert tr.rel_err(mean, tr.nhwc(posterior.mean)) <= RTOL
  assert tr.rel_err(logvar, tr.nhwc(posterior.logvar)) <= RTOL
  assert tr.rel_err(decoded, tr.nhwc(expected_decoded)) <= RTOL


TEXT_VARIANTS = {
    'clip_l_style': {},  # quick_gelu, legacy eos_token_id=2: pooled at argmax(ids)
    'openclip_style': dict(hidden_act='gelu', eos_token_id=999),  # pooled at the first EOS
}


@pytest.mark.parametrize('variant', sorted(TEXT_VARIANTS))
def test_text_encoder_matches_transformers(variant, tmp_path):
  ref = tr.tiny_text_encoder(**TEXT_VARIANTS[variant])
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_text_encoder(str(tmp_path))
  ids = np.random.default_rng(2).integers(0, 998, (2, 77))
  ids[:, 0] = 998  # BOS
  ids[0, 9:] = 999  # EOS, then EOS padding (CLIP-L style)
  ids[1, 30] = 999
  out = module.apply({'params': params}, jnp.asarray(ids))
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids), output_hidden_states=True)
  assert len(out.hidden_states) == len(expected.hidden_states) == 4
  assert tr.rel_err(out.last_hidden_state, expected.last_hidden_state.numpy()) <= RTOL
  assert tr.rel_err(out.hidden_states[-2], expected.hidden_states[-2].numpy()) <= RTOL
  assert tr.rel_err(out.pooler_output, expected.pooler_output.numpy()) <= RTOL


def test_text_projection_matches_transformers(tmp_path):
  torch.manual_seed(0)
  config = tr.transformers.CLIPTextConfig(**tr.TINY_TEXT, projection_dim=16)
  ref = tr.perturb(tr.transformers.CLIPTextModelWithProjection(config))
  ref.save_pretrained(tmp_path)
  module, params = convert_diffusers.load_text_encoder(str(tmp_path))
  assert module.config.with_projection
  ids = np.random.default_rng(3).integers(0, 1000, (2, 77))
  out = module.apply({'params': params}, jnp.asarray(ids))
  with torch.no_grad():
    expected = ref(torch.from_numpy(ids)).text_embeds.numpy()
  assert out.text_embeds.shape == (2, 16)
  assert tr.rel_err(out.text_embeds, expected) <= RTOL
