"""Benchmark: the U-Net training step, ldm_jax vs diffusers PyTorch, same weights, batch and dtype.

  python bench/train_step.py --model tiny --batch 4
  python bench/train_step.py --model sd_reduced --batch 4 --json out.json
  python bench/train_step.py --model sd15 --batch 16 --dtype bfloat16 --skip_torch   # on a GPU

One step is what a fine-tuning run with precomputed latents and text embeddings does: draw
timesteps and noise, noise the latents, U-Net forward, MSE to the noise, backward, global-norm
clipping, AdamW, EMA. ldm_jax runs `ldm_jax.train.step.make_update_fn` with the optimizer of
`ldm_jax.train.state.make_optimizer` and the default training config, jitted with the state
donated as train.py does; PyTorch runs the same step as diffusers' train_text_to_image.py
(torch.optim.AdamW, clip_grad_norm_, an EMA by lerp), with bf16 autocast for --dtype bfloat16.
The two sides' steps are timed alternately. Reports compile time, ms/step (median, and minimum,
of --repeats), images/s, and MFU: the step's model FLOPs (XLA's cost analysis of the step
without attention chunks or remat; the compiled step's own count is in the JSON) over the
time, against --peak_tflops or the device's peak (estimated on CPU). --json writes
{"ldm_jax": {...}, "diffusers_torch": {...}, "ratio": ldm_jax_ms / torch_ms, ...}.
Needs the test extra (torch, diffusers) unless --skip_torch.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

CONTEXT_LENGTH = 77


def build_jax_step(folder, args):
  """(jitted update, initial state, batch, rng) for the U-Net in `folder`, float32 weights."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from ldm_jax.convert import diffusers as convert_diffusers  # pylint: disable=g-import-not-at-top
  from ldm_jax import weights  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import losses  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top

  config = config_common.training('ldm', 'tiny', 'bench', '', 8 * args.latent, args.batch)
  unet, params = convert_diffusers.load_unet(folder, dtype=jnp.dtype(args.dtype),
                                             param_dtype=jnp.float32)
  if args.attention_impl:
    unet = unet.clone(config=dataclasses.replace(unet.config, attention_impl=args.attention_impl))
  schedule = schedules.Schedule.create(schedules.ScheduleConfig.from_diffusers(
      weights.scheduler_config(config.diffusion)))

  def loss_fn(params, frozen, batch, keys, step):
    del frozen, step
    k_t, k_noise = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(2))
    latents = batch['latents']
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, schedule.num_train_timesteps))(k_t)
    noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:]))(k_noise)
    pred = unet.apply({'params': params['unet']}, schedules.q_sample(schedule, latents, noise, t),
                      t, batch['context'])
    return losses.diffusion_mse(pred, noise), {}

  tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
  update_fn = step_lib.make_update_fn(loss_fn, tx, config.ema, 1, lr_schedule)
  update = jax.jit(update_fn, donate_argnums=0)
  state = jax.jit(lambda p: state_lib.init_state({'unet': p}, tx))(params)
  rng = np.random.default_rng(0)
  batch = {'latents': rng.standard_normal((args.batch, args.latent, args.latent, 4), np.float32),
           'context': rng.standard_normal(
               (args.batch, CONTEXT_LENGTH, unet.config.cross_attention_dim), np.float32)}
  return update, update_fn, state, jax.device_put(batch), jax.random.key(0)


class JaxSide:
  """Compiles the step ahead of time (so no call can recompile) and runs it on its own state."""

  def __init__(self, folder, args):
    import jax  # pylint: disable=g-import-not-at-top
    from ldm_jax.models import attention  # pylint: disable=g-import-not-at-top
    update, update_fn, self.state, self.batch, self.rng = build_jax_step(folder, args)
    inputs = (self.state, {}, self.batch, self.rng)
    t0 = time.perf_counter()
    self.compiled = update.lower(*inputs).compile()
    self.compile_s = time.perf_counter() - t0
    self.compiled_flops = common.xla_flops(self.compiled)
    # Model FLOPs for MFU: XLA counts a loop's body once, so the CPU's query-chunked attention
    # (a lax.map) would be undercounted; count the step traced without chunks, before XLA's
    # optimisations (no rematerialisation either, as MFU conventionally counts).
    budget, attention.CPU_QUERY_CHUNK_LOGITS = attention.CPU_QUERY_CHUNK_LOGITS, float('inf')
    try:
      self.flops = common.xla_flops(jax.jit(lambda *a: update_fn(*a)).lower(*inputs))  # a fresh trace
    finally:
      attention.CPU_QUERY_CHUNK_LOGITS = budget

  def step(self):
    self.state, metrics = self.compiled(self.state, {}, self.batch, self.rng)
    return float(metrics['loss'])  # blocks until the step is done


class TorchSide:
  """The same step in PyTorch on diffusers' UNet2DConditionModel."""

  def __init__(self, unet, args):
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference as tr  # pylint: disable=g-import-not-at-top
    self.torch, self.args, self.unet = torch, args, unet.train()
    self.params = [p for p in unet.parameters() if p.requires_grad]
    # The defaults of configs/common.py's optim and ema groups.
    self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=1e-2)
    self.ema = [p.detach().clone() for p in self.params]
    self.scheduler = diffusers.DDPMScheduler.from_config(tr.SCHEDULER)
    g = torch.Generator().manual_seed(0)
    self.latents = torch.randn(args.batch, 4, args.latent, args.latent, generator=g)
    self.context = torch.randn(args.batch, CONTEXT_LENGTH, unet.config.cross_attention_dim,
                               generator=g)
    self.step_count = 0

  def step(self):
    torch = self.torch
    t = torch.randint(0, self.scheduler.config.num_train_timesteps, (self.args.batch,))
    noise = torch.randn_like(self.latents)
    noisy = self.scheduler.add_noise(self.latents, noise, t)
    with torch.autocast('cpu', torch.bfloat16, enabled=self.args.dtype == 'bfloat16'):
      pred = self.unet(noisy, t, self.context).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    self.step_count += 1
    decay = min(0.9999, (1 + self.step_count) / (10 + self.step_count))
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1 - decay)  # pylint: disable=protected-access
    return loss.item()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  common.add_common_flags(parser)
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                      help='compute dtype (weights and optimizer state stay float32)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps per side')
  parser.add_argument('--peak_tflops', type=float, help='peak of one device, for MFU')
  parser.add_argument('--attention_impl', choices=('auto', 'xla', 'jax', 'cudnn', 'pallas'),
                      help='override the U-Net config\'s attention kernel')
  args = parser.parse_args()
  threads = common.set_threads(args.threads)
  spec = common.MODELS[args.model]
  args.latent = args.latent or spec['latent']

  import jax  # pylint: disable=g-import-not-at-top
  import torch_reference as tr  # pylint: disable=g-import-not-at-top
  torch_unet = tr.tiny_unet(**spec['unet'])
  folder = tempfile.mkdtemp(prefix='bench_unet_')
  torch_unet.save_pretrained(folder)
  sides = {'ldm_jax': JaxSide(folder, args)}
  if not args.skip_torch:
    sides['diffusers_torch'] = TorchSide(torch_unet, args)
  for side in sides.values():
    for _ in range(args.warmup):
      side.step()
  load_before = common.load_average()
  times = common.interleaved({name: side.step for name, side in sides.items()}, args.repeats)
  peak, peak_source = common.peak_tflops(args.dtype, args.peak_tflops)
  results = {}
  for name, side in sides.items():
    r = common.summary(times[name])
    r['images_per_s'] = args.batch / (r['ms'] / 1e3)
    flops = sides['ldm_jax'].flops  # the same model FLOPs for both sides
    if flops:
      r['gflop_per_step'] = flops / 1e9
      r['achieved_tflops'] = flops / (r['ms'] / 1e3) / 1e12
      if peak:
        r['mfu'] = r['achieved_tflops'] / peak
        r['mfu_pct'] = 100 * r['mfu']
    results[name] = r
  results['ldm_jax']['compile_s'] = sides['ldm_jax'].compile_s
  if sides['ldm_jax'].compiled_flops:
    results['ldm_jax']['compiled_gflop_per_step'] = sides['ldm_jax'].compiled_flops / 1e9
  if 'diffusers_torch' in sides:
    results['diffusers_torch']['threads'] = torch_threads()
  results['setup'] = dict(
      vars(args), backend=jax.default_backend(), device=str(jax.devices()[0].device_kind),
      threads=threads, peak_tflops=peak, peak_source=peak_source,
      load_average=dict(before=load_before, after=common.load_average()))
  common.finish(results, args.json)
  common.print_table(
      f'U-Net train step, model {args.model}, batch {args.batch}, latents {args.latent}x'
      f'{args.latent}, {args.dtype}, backend {jax.default_backend()}, {threads} threads, '
      f'{args.repeats} interleaved steps per side, load {load_before[0]:.2f}', results,
      [('ms/step', 'ms', '.1f'), ('min ms', 'min_ms', '.1f'), ('images/s', 'images_per_s', '.2f'),
       ('GFLOP/step', 'gflop_per_step', '.1f'), ('TFLOP/s', 'achieved_tflops', '.4f'),
       ('MFU %', 'mfu_pct', '.2f'), ('compile s', 'compile_s', '.1f')])
  print(f'peak {peak} TFLOP/s ({peak_source})' if peak else f'peak: {peak_source}')


def torch_threads():
  import torch  # pylint: disable=g-import-not-at-top
  return torch.get_num_threads()


if __name__ == '__main__':
  main()
