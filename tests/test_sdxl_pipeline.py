"""The jitted pipeline on SDXL components against diffusers' StableDiffusionXL pipelines.

Tiny random SDXL base and refiner folders written by diffusers, loaded by `convert.load_diffusers`;
same prompts, same initial noise: txt2img with CFG and micro-conditioning for two samplers,
force_zeros_for_empty_prompt, img2img on the refiner (aesthetic-score time ids) and the base ->
refiner hand-off (denoising_end / denoising_start). Tolerance: max abs difference <= 2e-3 on
[0, 1] images. Five functions compile in all; the rest reuse them.
"""

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as tr
from ldm_jax import convert
from ldm_jax import sharding
from ldm_jax.diffusion import conditioning
from ldm_jax.diffusion import pipeline
from ldm_jax.sampling import run

torch = tr.torch
ATOL = 2e-3
PROMPTS = ['abc', 'a b c d e f']
SIZE = 16  # pixels; the tiny VAE downsamples by 2, so latents are 8x8
MICRO = dict(original_size=(40, 48), crops_coords_top_left=(4, 2), target_size=(24, 32))


def _save(path, refiner):
  """A tiny SDXL folder whose VAE posterior std is ~3e-7 (as test_pipeline's): diffusers'
  posterior samples then use no noise that would differ from ours."""
  pipe = tr.save_sdxl_pipeline(path, refiner=refiner)
  with torch.no_grad():
    pipe.vae.quant_conv.bias[4:] -= 100.0  # logvar clipped at -30
  pipe.vae.save_pretrained(os.path.join(path, 'vae'))
  return path


@pytest.fixture(scope='module')
def xl_dirs(tmp_path_factory):
  return (_save(str(tmp_path_factory.mktemp('sdxl')), False),
          _save(str(tmp_path_factory.mktemp('sdxl_refiner')), True))


@pytest.fixture(scope='module')
def ours(xl_dirs):
  mesh = sharding.make_mesh([('data', -1)], jax.devices()[:2])  # batch 2: no padding to 8
  return [pipeline.StableDiffusion(convert.load_diffusers(d), mesh) for d in xl_dirs]


@pytest.fixture(scope='module')
def refs(xl_dirs):
  """diffusers' base (StableDiffusionXLPipeline) and refiner (its Img2Img pipeline), loaded once."""
  return (tr.diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dirs[0]),
          tr.diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(xl_dirs[1]))


def _reference(loaded, scheduler=None):
  """A fresh pipeline on the loaded networks (its own config), with another scheduler class."""
  kw = {}
  if scheduler:
    kw['scheduler'] = getattr(tr.diffusers, scheduler).from_config(loaded.scheduler.config)
  return type(loaded).from_pipe(loaded, **kw)


def _noise(seed=0, n=2):
  shape = (n, SIZE // 2, SIZE // 2, 4)
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _images(n=2):
  return np.random.default_rng(5).uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.mark.parametrize('sampler, scheduler', [('euler', 'EulerDiscreteScheduler'),
                                                ('dpmpp_2m', 'DPMSolverMultistepScheduler')])
def test_txt2img_with_cfg_and_micro_conditioning_matches_diffusers(refs, ours, sampler, scheduler):
  latents = _noise()
  images = ours[0].generate(PROMPTS, negative_prompts=['', 'x y'], steps=4, sampler=sampler,
                            guidance_scale=5.0, latents=latents, output='float', **MICRO)
  expected = _reference(refs[0], scheduler)(
      PROMPTS, negative_prompt=['', 'x y'], num_inference_steps=4, guidance_scale=5.0,
      latents=tr.nchw(latents), height=SIZE, width=SIZE, output_type='np', **MICRO).images
  assert images.shape == (2, SIZE, SIZE, 3)
  assert np.max(np.abs(images - expected)) <= ATOL


@pytest.mark.parametrize('force_zeros', [True, False])
def test_empty_negative_prompt_and_negative_sizes_match_diffusers(refs, ours, force_zeros):
  """No negative prompt: zeros (force_zeros_for_empty_prompt) or the empty prompt's encoding;
  the negative sizes condition the unconditional half. New sizes and options do not recompile.

  diffusers' txt2img pipeline repeats [negative, positive] time ids over a batch after
  concatenating them (rows uncond 1, uncond 2, cond 1, cond 2 get neg, pos, neg, pos), so with
  distinct negative sizes only its batches of one are right: it runs one prompt."""
  sd, latents = ours[0], _noise(1)
  sizes = dict(original_size=(64, 32), target_size=(16, 16), negative_original_size=(8, 8),
               negative_crops_coords_top_left=(1, 3), negative_target_size=(12, 20))
  sd.generate(PROMPTS, steps=4, sampler='euler', guidance_scale=5.0, latents=latents, **MICRO)
  count = sd.compile_count
  sd.xl_text.force_zeros = force_zeros
  try:
    images = sd.generate(PROMPTS, steps=4, sampler='euler', guidance_scale=5.0, latents=latents,
                         output='float', **sizes)
  finally:
    sd.xl_text.force_zeros = True
  assert sd.compile_count == count
  ref = _reference(refs[0])
  ref.register_to_config(force_zeros_for_empty_prompt=force_zeros)
  k = int(force_zeros)  # one row each: both rows are checked, one diffusers call a case
  expected = ref(PROMPTS[k], num_inference_steps=4, guidance_scale=5.0,
                 latents=tr.nchw(latents[k:k + 1]), height=SIZE, width=SIZE, output_type='np',
                 **sizes).images
  assert np.max(np.abs(images[k:k + 1] - expected)) <= ATOL


def test_refiner_img2img_with_aesthetic_scores_matches_diffusers(refs, ours):
  g = torch.Generator().manual_seed(0)
  torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=g)  # diffusers' posterior sample draw
  noise = tr.nhwc(torch.randn((2, 4, SIZE // 2, SIZE // 2), generator=g))
  kw = dict(aesthetic_score=7.5, negative_aesthetic_score=1.5, original_size=(32, 24),
            crops_coords_top_left=(2, 6))
  images = ours[1].generate(PROMPTS, negative_prompts='x', steps=5, strength=0.6,
                            sampler='euler', guidance_scale=4.0, init_images=_images() * 2 - 1,
                            latents=noise, output='float', **kw)
  expected = _reference(refs[1])(
      PROMPTS, negative_prompt=['x'] * 2, image=_images(), strength=0.6, num_inference_steps=5,
      guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type='np',
      **kw).images
  assert np.max(np.abs(images - expected)) <= ATOL


def test_base_to_refiner_hand_off_matches_diffusers(refs, ours):
  """The base denoises to 0.8 and returns latents; the refiner continues from them."""
  base, refiner = ours
  noise, kw = _noise(2), dict(num_inference_steps=4, guidance_scale=5.0)
  latents = base.generate(PROMPTS, steps=4, sampler='euler', guidance_scale=5.0, latents=noise,
                          denoising_end=0.8, output='latent')
  images = pipeline.base_and_refiner(base, refiner, PROMPTS, high_noise_frac=0.8, steps=4,
                                     sampler='euler', guidance_scale=5.0, latents=noise,
                                     output='float')
  ref_latents = _reference(refs[0])(PROMPTS, latents=tr.nchw(noise), height=SIZE, width=SIZE,
                                       denoising_end=0.8, output_type='latent', **kw).images
  expected = _reference(refs[1])(
      PROMPTS, image=ref_latents, denoising_start=0.8, output_type='np', **kw).images
  assert latents.shape == (2, SIZE // 2, SIZE // 2, 4)
  assert tr.rel_err(latents, tr.nhwc(ref_latents)) <= 1e-4
  assert np.max(np.abs(images - expected)) <= ATOL


def test_bad_sdxl_input(ours):
  base, refiner = ours
  with pytest.raises(ValueError, match='denoising_start needs init_images'):
    refiner.generate(['abc'], denoising_start=0.8)
  with pytest.raises(ValueError, match='denoising_start 0.8 is not below denoising_end 0.5'):
    refiner.generate(['abc'], init_images=_images(1), denoising_start=0.8, denoising_end=0.5)
  with pytest.raises(ValueError, match=r'denoising_end 1.0 is outside \(0, 1\)'):
    base.generate(['abc'], denoising_end=1.0)
  with pytest.raises(ValueError, match=r'original_size \(3,\) is not a pair'):
    base.generate(['abc'], original_size=(3,))
  with pytest.raises(ValueError, match="output 'pil' is not one of"):
    base.generate(['abc'], output='pil')
  with pytest.raises(ValueError, match=r'latents of shape \(1, 4, 4, 4\); expected \(1, 8, 8, 4\)'):
    base.generate(['abc'], init_images=np.zeros((1, 4, 4, 4)), height=SIZE, width=SIZE)
  assert pipeline.default_strength(False, xl=True) == 0.3
  assert pipeline.default_strength(True, xl=True) == 0.9999


def test_the_vae_runs_in_float32_where_diffusers_upcasts_it(ours):
  """force_upcast (SDXL's VAE): decode in float32 under float16, encode in float32 under any
  lower precision; the fp16-fix VAE (force_upcast false) and float32 run as configured."""
  sd = copy.copy(ours[0])
  f16, bf16, f32 = jnp.float16, jnp.bfloat16, jnp.float32
  for dtype, force_upcast, decode, encode in [(f16, True, f32, f32), (bf16, True, bf16, f32),
                                              (f16, False, f16, f16), (f32, True, f32, f32)]:
    config = dataclasses.replace(ours[0].vae.config, dtype=dtype, force_upcast=force_upcast)
    sd.vae = type(ours[0].vae)(config)
    assert (sd._vae(decode=True).config.dtype, sd._vae(decode=False).config.dtype) == (
        decode, encode)


def test_time_ids_follow_each_diffusers_pipeline():
  sizes = conditioning.Sizes(original_size=(40, 48), crops_coords_top_left=(4, 2),
                             negative_original_size=(8, 8))
  cond, uncond = conditioning.time_ids(sizes, 16, 24, 'txt2img', aesthetics=False)
  assert cond.tolist() == [40, 48, 4, 2, 16, 24] and uncond.tolist() == cond.tolist()
  # Img2Img/Inpaint: the negative sizes default to the positive ones, with the positive crops.
  _, uncond = conditioning.time_ids(sizes, 16, 24, 'img2img', aesthetics=False)
  assert uncond.tolist() == [8, 8, 4, 2, 16, 24]
  cond, uncond = conditioning.time_ids(sizes, 16, 24, 'inpaint', aesthetics=True)
  assert cond.tolist() == [40, 48, 4, 2, 6.0] and uncond.tolist() == [8, 8, 0, 0, 2.5]


def test_run_passes_size_conditioning_only_when_given(monkeypatch):
  monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  request = run.Request(prompts=('a',), original_size=(1024, 768), crops_coords_top_left=(0, 64))
  batch = run.plan_batches(request)[0]
  cond = {'height': None, 'width': None, 'init_image': None, 'mask': None}
  kw = run.generate_kwargs(request, batch, cond)
  assert kw['original_size'] == (1024, 768) and kw['crops_coords_top_left'] == (0, 64)
  assert 'target_size' not in kw and 'aesthetic_score' not in kw
  assert 'original_size' not in run.generate_kwargs(run.Request(prompts=('a',)), batch, cond)
  assert run.records(request, batch, cond)[0]['original_size'] == [1024, 768]
  with pytest.raises(ValueError, match='--original_size is SDXL'):
    run.validate(request, pipeline.SAMPLERS, 8, xl=False)
  run.validate(request, pipeline.SAMPLERS, 8, xl=True)
  img2img = run.Request(prompts=('a',), init_image='README.md', steps=3)
  run.validate(img2img, pipeline.SAMPLERS, 8, xl=False)  # strength 0.8: 2 steps
  with pytest.raises(ValueError, match=r'--strength 0.3 with --steps 3 runs no denoising step'):
    run.validate(img2img, pipeline.SAMPLERS, 8, xl=True)  # SDXL's default strength
  assert run.parse_pair('1024,768', 'original_size') == (1024, 768)
  with pytest.raises(ValueError, match='--target_size 7 is not two integers'):
    run.parse_pair('7', 'target_size')
