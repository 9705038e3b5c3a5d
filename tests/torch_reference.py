"""Tiny PyTorch reference models (diffusers / transformers), saved as a diffusers folder: test oracles."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')

# A tiny byte-level BPE vocabulary: enough for the pipeline folder to carry a real tokenizer.
_CHARS = 'abcdefghijklmnopqrstuvwxyz'
TINY_VOCAB_SIZE = 1000

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=2,
    cross_attention_dim=32, norm_num_groups=8)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                latent_channels=4, sample_size=32,
                down_block_types=('DownEncoderBlock2D',) * 2,
                up_block_types=('UpDecoderBlock2D',) * 2)
TINY_TEXT = dict(vocab_size=TINY_VOCAB_SIZE, hidden_size=32, intermediate_size=37,
                 num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                 hidden_act='quick_gelu', eos_token_id=2, bos_token_id=0, pad_token_id=1)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                 num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False)


def perturb(model, seed=0, scale=0.05):
  """Adds noise to every parameter so that norms' scales and biases are not 1 and 0."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(scale * torch.randn(p.shape, generator=g))
  return model.eval()


def tiny_unet(seed=0, **kw):
  torch.manual_seed(seed)
  return perturb(diffusers.UNet2DConditionModel(**(TINY_UNET | kw)), seed)


def tiny_vae(seed=0, **kw):
  torch.manual_seed(seed)
  return perturb(diffusers.AutoencoderKL(**(TINY_VAE | kw)), seed)


def tiny_text_encoder(seed=0, **kw):
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(**(TINY_TEXT | kw))
  return perturb(transformers.CLIPTextModel(config), seed)


def tiny_tokenizer():
  """A CLIP tokenizer over single letters: a real transformers tokenizer, 1000-entry vocab."""
  vocab = {}
  for c in _CHARS:
    vocab[c] = len(vocab)
    vocab[c + '</w>'] = len(vocab)
  while len(vocab) < TINY_VOCAB_SIZE - 2:
    vocab[f'x{len(vocab)}'] = len(vocab)
  vocab['<|startoftext|>'] = len(vocab)
  vocab['<|endoftext|>'] = len(vocab)
  return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def save_pipeline(path, unet=None, vae=None, text_encoder=None):
  """Writes a diffusers Stable Diffusion folder of tiny random models; returns the models."""
  unet = unet or tiny_unet()
  vae = vae or tiny_vae()
  text_encoder = text_encoder or tiny_text_encoder()
  unet.save_pretrained(os.path.join(path, 'unet'))
  vae.save_pretrained(os.path.join(path, 'vae'))
  text_encoder.save_pretrained(os.path.join(path, 'text_encoder'))
  tiny_tokenizer().save_pretrained(os.path.join(path, 'tokenizer'))
  diffusers.DDIMScheduler(**SCHEDULER).save_pretrained(os.path.join(path, 'scheduler'))
  with open(os.path.join(path, 'model_index.json'), 'w') as f:
    json.dump({'_class_name': 'StableDiffusionPipeline', '_diffusers_version': '0.42.1',
               'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
               'text_encoder': ['transformers', 'CLIPTextModel'],
               'tokenizer': ['transformers', 'CLIPTokenizer'],
               'scheduler': ['diffusers', 'DDIMScheduler'], 'safety_checker': [None, None],
               'feature_extractor': [None, None], 'requires_safety_checker': False}, f)
  return unet, vae, text_encoder


# The tiny SDXL U-Net of diffusers' own SDXL tests: text_time conditioning, per-level depth.
TINY_XL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), attention_head_dim=(2, 4),
    use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
    transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
    cross_attention_dim=64)
# The refiner: only the second encoder (32 wide) and 5 time ids (aesthetic score).
TINY_XL_REFINER = dict(cross_attention_dim=32, projection_class_embeddings_input_dim=32 + 5 * 8)
# SDXL's scheduler (EulerDiscreteScheduler as stabilityai/stable-diffusion-xl-base-1.0 ships it).
XL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                    num_train_timesteps=1000, steps_offset=1, timestep_spacing='leading',
                    interpolation_type='linear', prediction_type='epsilon',
                    use_karras_sigmas=False)


def tiny_sdxl_unet(seed=0, refiner=False, **kw):
  """diffusers' tiny SDXL U-Net (or the refiner's: 32-wide context, aesthetic-score time ids)."""
  torch.manual_seed(seed)
  config = TINY_XL_UNET | (TINY_XL_REFINER if refiner else {}) | kw
  return perturb(diffusers.UNet2DConditionModel(**config), seed)


def tiny_text_encoder_2(seed=0, **kw):
  """SDXL's second text encoder in tiny: a CLIPTextModelWithProjection, 32 wide."""
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(**(TINY_TEXT | {'projection_dim': 32} | kw))
  return perturb(transformers.CLIPTextModelWithProjection(config), seed)


def save_sdxl_pipeline(path, refiner=False, force_zeros=True):
  """Writes a tiny diffusers SDXL folder (the refiner: an img2img one without the first encoder).

  Returns:
    the diffusers pipeline (StableDiffusionXLPipeline or StableDiffusionXLImg2ImgPipeline).
  """
  parts = dict(vae=tiny_vae(1), text_encoder_2=tiny_text_encoder_2(2),
               tokenizer_2=tiny_tokenizer(), unet=tiny_sdxl_unet(3, refiner=refiner),
               scheduler=diffusers.EulerDiscreteScheduler(**XL_SCHEDULER),
               force_zeros_for_empty_prompt=force_zeros, add_watermarker=False)
  if refiner:
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        text_encoder=None, tokenizer=None, requires_aesthetics_score=True, **parts)
  else:
    pipe = diffusers.StableDiffusionXLPipeline(
        text_encoder=tiny_text_encoder(4), tokenizer=tiny_tokenizer(), **parts)
  pipe.save_pretrained(path, safe_serialization=True)
  return pipe


def nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def rel_err(ours, ref):
  """max |ours - ref| / max |ref|: the error relative to the output's scale."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def assert_same_pipeline_outputs(pipe, unet, vae, text_encoder, context_dim=32):
  """A loaded diffusers pipeline's networks give exactly the originals' outputs."""
  g = torch.Generator().manual_seed(0)
  x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 7, context_dim, generator=g)
  images = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
  ids = torch.randint(0, 998, (2, 77), generator=g)
  with torch.no_grad():
    pairs = [(pipe.unet(x, 10, context).sample, unet(x, 10, context).sample),
             (pipe.vae(images).sample, vae(images).sample),
             (pipe.text_encoder(ids).last_hidden_state, text_encoder(ids).last_hidden_state)]
  for exported, original in pairs:
    torch.testing.assert_close(exported, original, rtol=0, atol=0)
