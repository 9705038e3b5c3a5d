"""Benchmark: txt2img with CFG, ldm_jax vs diffusers PyTorch, same random model, batch and steps.

  python bench/sample.py --model tiny --batch 2 --steps 20
  python bench/sample.py --model sd_reduced --batch 4 --steps 10 --json out.json

Both sides load the same random weights (a diffusers folder written by torch, read by
`load_diffusers`) and start from the same latents; the two sides' calls are timed alternately
(text encoding, the denoising loop and the VAE decode, float32). Reports compile time,
end-to-end time per call (median, and minimum, of --repeats), time per denoising step and
images/s; --json writes {"ldm_jax": {...}, "diffusers_torch": {...}, "ratio": ldm_jax_ms /
torch_ms, ...}. Needs the test extra (torch, diffusers).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


class JaxSide:
  """`StableDiffusion.generate` on one device: what sample.py runs."""

  def __init__(self, folder, latents, args):
    import jax  # pylint: disable=g-import-not-at-top
    from ldm_jax import convert  # pylint: disable=g-import-not-at-top
    from ldm_jax.diffusion import pipeline  # pylint: disable=g-import-not-at-top
    self.sd = pipeline.StableDiffusion(convert.load_diffusers(folder), mesh=jax.make_mesh(
        (1,), ('data',), devices=jax.devices()[:1]))
    self.latents, self.args = latents, args
    t0 = time.perf_counter()
    self.run()
    self.first_call_s = time.perf_counter() - t0

  def run(self):
    return self.sd.generate(['a red circle'] * self.args.batch, steps=self.args.steps,
                            sampler=self.args.sampler, guidance_scale=7.5, latents=self.latents)


class TorchSide:
  """diffusers' StableDiffusionPipeline with the matching scheduler, under inference_mode."""

  def __init__(self, folder, latents, args):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    self.torch, self.args = torch, args
    self.pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    self.pipe.scheduler = _torch_scheduler(diffusers, args.sampler, self.pipe.scheduler.config)
    self.pipe.set_progress_bar_config(disable=True)
    self.latents = torch.from_numpy(np.ascontiguousarray(np.transpose(latents, (0, 3, 1, 2))))
    self.side = latents.shape[1] * self.pipe.vae_scale_factor
    self.run()  # warm-up

  def run(self):
    with self.torch.inference_mode():
      return self.pipe(['a red circle'] * self.args.batch, num_inference_steps=self.args.steps,
                       guidance_scale=7.5, latents=self.latents, height=self.side,
                       width=self.side, output_type='np')


def _torch_scheduler(diffusers, sampler, config):
  names = {'ddim': 'DDIMScheduler', 'ddpm': 'DDPMScheduler', 'pndm': 'PNDMScheduler',
           'dpmpp_2m': 'DPMSolverMultistepScheduler', 'euler': 'EulerDiscreteScheduler',
           'euler_a': 'EulerAncestralDiscreteScheduler'}
  return getattr(diffusers, names[sampler]).from_config(config)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--sampler', default='ddim')
  args = parser.parse_args()
  threads = common.set_threads(args.threads)
  spec = common.MODELS[args.model]
  args.latent = args.latent or spec['latent']

  import jax  # pylint: disable=g-import-not-at-top
  import torch_reference as tr  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix='bench_sd_')
  tr.save_pipeline(folder, unet=tr.tiny_unet(**spec['unet']), vae=tr.tiny_vae(**spec['vae']),
                   text_encoder=tr.tiny_text_encoder(**spec['text']))
  latents = np.random.default_rng(0).standard_normal(
      (args.batch, args.latent, args.latent, 4)).astype(np.float32)
  sides = {'ldm_jax': JaxSide(folder, latents, args)}
  if not args.skip_torch:
    sides['diffusers_torch'] = TorchSide(folder, latents, args)
  load_before = common.load_average()
  times = common.interleaved({name: side.run for name, side in sides.items()}, args.repeats)
  results = {}
  for name in sides:
    r = common.summary(times[name])
    r.update(call_ms=r['ms'], step_ms=r['ms'] / args.steps,
             images_per_s=args.batch / (r['ms'] / 1e3))
    results[name] = r
  jax_side = results['ldm_jax']
  jax_side['first_call_s'] = sides['ldm_jax'].first_call_s
  jax_side['compile_s'] = jax_side['first_call_s'] - jax_side['ms'] / 1e3
  if 'diffusers_torch' in sides:
    results['diffusers_torch']['threads'] = sides['diffusers_torch'].torch.get_num_threads()
  results['setup'] = dict(
      vars(args), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
      threads=threads, cfg=True, guidance=7.5,
      load_average=dict(before=load_before, after=common.load_average()))
  common.finish(results, args.json)
  common.print_table(
      f'txt2img + CFG, model {args.model}, batch {args.batch}, {args.steps} {args.sampler} '
      f'steps, latents {args.latent}x{args.latent}, backend {jax.default_backend()}, '
      f'{threads} threads, {args.repeats} interleaved calls per side, load {load_before[0]:.2f}',
      results, [('call ms', 'ms', '.1f'), ('min ms', 'min_ms', '.1f'),
                ('ms/step', 'step_ms', '.2f'), ('images/s', 'images_per_s', '.2f'),
                ('compile s', 'compile_s', '.1f')])


if __name__ == '__main__':
  main()
