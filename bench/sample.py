"""Benchmark: txt2img with CFG, ldm_jax vs diffusers PyTorch, same random model, batch and steps.

  python bench/sample.py --model tiny --batch 2 --steps 20
  python bench/sample.py --model sd_reduced --batch 1 --steps 10 --json out.json

Both sides load the same random weights (a diffusers folder written by torch, read by
`load_diffusers`) and start from the same latents. Reports compile time, end-to-end time per
call (median of --repeats), time per denoising step and images/s; --json writes
{"ldm_jax": {...}, "diffusers_torch": {...}, "ratio": ldm_jax_ms / torch_ms}.
Needs the test extra (torch, diffusers).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))

# Models: (U-Net, VAE, text encoder) overrides of tests/torch_reference.py's tiny ones.
MODELS = {
    'tiny': dict(unet={}, vae={}, text={}, latent=8),
    # SD 1.x layout with reduced widths: 4 levels, 2 layers per block, 8 heads, 768-wide context;
    # 32x32 latents (256x256 images through an f=8 VAE).
    'sd_reduced': dict(
        unet=dict(block_out_channels=(64, 128, 256, 256), layers_per_block=2,
                  down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                  up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
                  attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32),
        vae=dict(block_out_channels=(32, 64, 128, 128), layers_per_block=1, norm_num_groups=32,
                 down_block_types=('DownEncoderBlock2D',) * 4,
                 up_block_types=('UpDecoderBlock2D',) * 4),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                  num_attention_heads=12),
        latent=32),
}


def _timed(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def bench_ldm_jax(folder, latents, args):
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax import convert  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion import pipeline  # pylint: disable=g-import-not-at-top
  sd = pipeline.StableDiffusion(convert.load_diffusers(folder), mesh=jax.make_mesh(
      (1,), ('data',), devices=jax.devices()[:1]))
  run = lambda: sd.generate(['a red circle'] * args.batch, steps=args.steps, sampler=args.sampler,
                            guidance_scale=7.5, latents=latents)
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  median = _timed(run, args.repeats)
  return dict(first_call_s=first, compile_s=first - median, **_rates(median, args))


def bench_torch(folder, latents, args):
  import torch  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
  pipe.scheduler = _torch_scheduler(diffusers, args.sampler, pipe.scheduler.config)
  pipe.set_progress_bar_config(disable=True)
  lat = torch.from_numpy(np.ascontiguousarray(np.transpose(latents, (0, 3, 1, 2))))
  side = latents.shape[1] * pipe.vae_scale_factor

  def run():
    with torch.inference_mode():
      pipe(['a red circle'] * args.batch, num_inference_steps=args.steps, guidance_scale=7.5,
           latents=lat, height=side, width=side, output_type='np')

  run()  # warm-up
  return dict(threads=torch.get_num_threads(), **_rates(_timed(run, args.repeats), args))


def _torch_scheduler(diffusers, sampler, config):
  names = {'ddim': 'DDIMScheduler', 'ddpm': 'DDPMScheduler', 'pndm': 'PNDMScheduler',
           'dpmpp_2m': 'DPMSolverMultistepScheduler', 'euler': 'EulerDiscreteScheduler',
           'euler_a': 'EulerAncestralDiscreteScheduler'}
  return getattr(diffusers, names[sampler]).from_config(config)


def _rates(seconds, args):
  return dict(call_ms=1e3 * seconds, step_ms=1e3 * seconds / args.steps,
              images_per_s=args.batch / seconds)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='tiny')
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--sampler', default='ddim')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--json', help='write the results here')
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import torch_reference as tr  # pylint: disable=g-import-not-at-top
  spec = MODELS[args.model]
  folder = tempfile.mkdtemp(prefix='bench_sd_')
  tr.save_pipeline(folder, unet=tr.tiny_unet(**spec['unet']), vae=tr.tiny_vae(**spec['vae']),
                   text_encoder=tr.tiny_text_encoder(**spec['text']))
  latents = np.random.default_rng(0).standard_normal(
      (args.batch, spec['latent'], spec['latent'], 4)).astype(np.float32)
  results = {'ldm_jax': bench_ldm_jax(folder, latents, args),
             'diffusers_torch': bench_torch(folder, latents, args)}
  results['ratio'] = results['ldm_jax']['call_ms'] / results['diffusers_torch']['call_ms']
  results['setup'] = dict(vars(args), backend=jax.default_backend(),
                          device=str(jax.devices()[0].device_kind), cfg=True, guidance=7.5)

  print(f"txt2img + CFG, model {args.model}, batch {args.batch}, {args.steps} {args.sampler} "
        f"steps, latents {spec['latent']}x{spec['latent']}, backend {jax.default_backend()}")
  print(f"{'':16s} {'call ms':>10s} {'ms/step':>9s} {'images/s':>9s} {'compile s':>10s}")
  for name in ('ldm_jax', 'diffusers_torch'):
    r = results[name]
    compile_s = f"{r['compile_s']:10.1f}" if 'compile_s' in r else f"{'-':>10s}"
    print(f"{name:16s} {r['call_ms']:10.1f} {r['step_ms']:9.2f} {r['images_per_s']:9.2f} "
          f"{compile_s}")
  print(f"ratio (ldm_jax / torch, call time): {results['ratio']:.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
