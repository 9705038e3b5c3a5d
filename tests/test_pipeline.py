"""The jitted pipeline against diffusers' StableDiffusion pipelines on the same tiny random model.

Same prompts, same initial noise: txt2img with CFG, img2img and inpainting (the 9-channel
inpainting U-Net, and latent blending with an ordinary one). Tolerance: max abs difference
<= 2e-3 on [0, 1] images.
"""

import threading

import numpy as np
import pytest

import torch_reference as tr
from ldm_jax import convert
from ldm_jax.diffusion import pipeline

torch = tr.torch
ATOL = 2e-3
PROMPTS = ['abc', 'a b c d e f']
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8


def _quiet_vae():
  """A tiny VAE whose posterior std is ~3e-7: diffusers' posterior samples then use no noise
  that would differ from ours (we draw ours from JAX's PRNG, diffusers from torch's)."""
  vae = tr.tiny_vae()
  with torch.no_grad():
    vae.quant_conv.bias[4:] -= 100.0  # logvar clipped at -30
  return vae


@pytest.fixture(scope='module')
def sd_dirs(tmp_path_factory):
  plain = str(tmp_path_factory.mktemp('sd'))
  tr.save_pipeline(plain, vae=_quiet_vae())
  inpaint = str(tmp_path_factory.mktemp('sd_inpaint'))
  tr.save_pipeline(inpaint, unet=tr.tiny_unet(in_channels=9), vae=_quiet_vae())
  return plain, inpaint


@pytest.fixture(scope='module')
def ours(sd_dirs):
  return [pipeline.StableDiffusion(convert.load_diffusers(d)) for d in sd_dirs]


def _noise(seed=0, n=2):
  return np.random.default_rng(seed).standard_normal((n, SIZE // 2, SIZE // 2, 4)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _images(n=2):
  return np.random.default_rng(5).uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _masks(n=2):
  m = np.zeros((n, SIZE, SIZE, 1), np.float32)
  m[:, 4:12, 2:10] = 1.0
  return m


@pytest.mark.parametrize('sampler, scheduler', [('ddim', 'DDIMScheduler'),
                                                ('dpmpp_2m', 'DPMSolverMultistepScheduler')])
def test_txt2img_with_cfg_matches_diffusers(sd_dirs, ours, sampler, scheduler):
  latents = _noise()
  images = ours[0].generate(PROMPTS, negative_prompts=['', 'x y'], steps=4, sampler=sampler,
                            guidance_scale=7.5, latents=latents, output='float')
  ref = tr.diffusers.StableDiffusionPipeline.from_pretrained(sd_dirs[0], safety_checker=None)
  ref.scheduler = getattr(tr.diffusers, scheduler).from_config(ref.scheduler.config)
  expected = ref(PROMPTS, negative_prompt=['', 'x y'], num_inference_steps=4, guidance_scale=7.5,
                 latents=_nchw(latents), height=SIZE, width=SIZE, output_type='np').images
  assert images.shape == (2, SIZE, SIZE, 3)
  assert np.max(np.abs(images - expected)) <= ATOL


def test_img2img_matches_diffusers(sd_dirs, ours):
  g = torch.Generator().manual_seed(0)
  torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=g)  # diffusers' posterior sample draw
  noise = np.transpose(torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=g).numpy(), (0, 2, 3, 1))
  init = _images()
  images = ours[0].generate(PROMPTS, steps=5, strength=0.6, guidance_scale=3.0,
                            init_images=init * 2 - 1, latents=noise, output='float')
  ref = tr.diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(sd_dirs[0], safety_checker=None)
  expected = ref(PROMPTS, image=init, strength=0.6, num_inference_steps=5, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type='np').images
  assert np.max(np.abs(images - expected)) <= ATOL


@pytest.mark.parametrize('which', [0, 1], ids=['blend_4_channels', 'unet_9_channels'])
def test_inpainting_matches_diffusers(sd_dirs, ours, which):
  latents = _noise(3)
  images = ours[which].generate(PROMPTS, steps=4, guidance_scale=5.0, init_images=_images() * 2 - 1,
                                masks=_masks(), latents=latents, output='float')
  ref = tr.diffusers.StableDiffusionInpaintPipeline.from_pretrained(sd_dirs[which],
                                                                    safety_checker=None)
  expected = ref(PROMPTS, image=_images(), mask_image=_masks(), num_inference_steps=4,
                 guidance_scale=5.0, latents=_nchw(latents), height=SIZE, width=SIZE,
                 output_type='np').images
  assert np.max(np.abs(images - expected)) <= ATOL


def test_new_prompts_seeds_and_guidance_do_not_recompile(ours):
  sd = ours[0]
  first = sd.generate(['abc', 'def'], steps=3, seed=1, guidance_scale=4.0)
  count = sd.compile_count
  second = sd.generate(['xyz', 'a b'], steps=3, seed=2, guidance_scale=6.0)
  assert sd.compile_count == count
  assert first.dtype == np.uint8 and first.shape == second.shape == (2, SIZE, SIZE, 3)
  assert not np.array_equal(first, second)


def test_seed_reproducibility_and_progress(ours):
  seen = []
  a = ours[0].generate(['abc'], steps=3, seed=7, progress=lambda i, n: seen.append((i, n)))
  b = ours[0].generate(['abc'], steps=3, seed=7)
  np.testing.assert_array_equal(a, b)
  assert seen == [(1, 3), (2, 3), (3, 3)]


def test_bad_input(ours):
  sd = ours[0]
  with pytest.raises(ValueError, match='height 15 is not a positive multiple of 2 .the VAE '
                     'downsamples by 2.: try 14'):
    sd.generate(['abc'], height=15, width=16)
  with pytest.raises(ValueError, match='width 0 is not a positive multiple of 2'):
    sd.generate(['abc'], width=0)
  with pytest.raises(ValueError, match='unknown sampler'):
    sd.generate(['abc'], sampler='heun')
  with pytest.raises(ValueError, match='no prompts'):
    sd.generate([])
  with pytest.raises(ValueError, match='masks need init_images'):
    sd.generate(['abc'], masks=_masks(1))
  with pytest.raises(ValueError, match=r'strength 0.0 is outside \(0, 1\]'):
    sd.generate(['abc'], init_images=_images(1), strength=0.0)
  with pytest.raises(ValueError, match='2 negative prompts for 1 prompts'):
    sd.generate(['abc'], negative_prompts=['a', 'b'])


def test_progress_is_per_call(ours):
  """Concurrent calls on one instance, and calls on two instances, each see only their steps."""
  seen = {name: [] for name in ('a', 'b', 'other')}
  report = lambda name: lambda i, n: seen[name].append((i, n))
  ours[0].generate(['abc'], steps=3, progress=report('a'))  # compiled before the threads race
  seen['a'].clear()
  threads = [threading.Thread(target=lambda name=name: ours[0].generate(
      ['abc'], steps=3, seed=len(name), progress=report(name))) for name in ('a', 'b')]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  ours[1].generate(['abc'], steps=2, init_images=_images(1), masks=_masks(1),
                   progress=report('other'))
  assert seen == {'a': [(1, 3), (2, 3), (3, 3)], 'b': [(1, 3), (2, 3), (3, 3)],
                  'other': [(1, 2), (2, 2)]}


def test_input_problems_and_default_strength():
  assert pipeline.input_problems() == []
  assert pipeline.input_problems(96, 8, 1.0) == []
  assert pipeline.input_problems(100, 0, 1.5) == [
      'height 100 is not a positive multiple of 8 (the VAE downsamples by 8): try 96',
      'width 0 is not a positive multiple of 8 (the VAE downsamples by 8): try 8',
      'strength 1.5 is outside (0, 1]: 1 repaints fully, small values stay close to the init '
      'image']
  assert pipeline.input_problems(width=6, scale_factor=2) == []
  assert pipeline.input_problems(strength=0.0)[0].startswith('strength 0.0 is outside')
  assert pipeline.default_strength(True) == 1.0 and pipeline.default_strength(False) == 0.8
