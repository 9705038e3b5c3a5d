"""Benchmark for one accelerator: the SD 1.5 train step, the training loop at SD scale, and 50-step
txt2img with CFG, each beside its goal; one JSON and one markdown table.

  bash bench/accelerator.sh               # a GPU machine, <= 8 min (the header says how)
  bash bench/accelerator.sh --dry-run     # the same code on CPU at tiny sizes (~2-3 min)
  python bench/accelerator.py --only train --json a.json --markdown a.md [--dry-run]

Everything computes in bfloat16 with float32 master weights, from random weights built from the
presets (`UNetConfig.sd15()`, `VAEConfig.sd15()`, `TextEncoderConfig.sd15()`; tiny ones in the
dry run): nothing is downloaded, no tokenizer vocabulary is needed (the word-level 'shapes'
tokenizer is built on the spot), so it runs on a machine without network.

  train   The ldm stage's own jitted step (`train.step.make_step`: precomputed VAE moments and
          77x768 text states in, posterior sample, noise, U-Net, MSE, clipping, AdamW, EMA) at
          64x64 latents, per-device batch 8, 16, 32: ms/step, images/s, MFU (the step's model
          FLOPs, XLA's cost analysis of the step traced without remat and with the einsum
          attention, as bench/train_step.py counts them, over the time and the device's peak),
          the process's peak device memory (a high-water mark: each batch's value includes the
          ones before) and XLA's memory analysis of the step, and compile time.
  loop    `bench/loop.py`'s `measure` on the same config: `train.loop.setup` on a synthetic
          precomputed dataset in `data.precompute`'s format, the bare compiled step back to
          back, then the real loop; the loop/step ratio and the loop's ms per step by phase.
  sample  `pipeline.StableDiffusion.generate`: 50 DPM-Solver++ (2M) steps, guidance 7.5,
          512x512, batch 1 and 8: seconds per image (median of the timed calls).

The U-Net's attention kernel is `--attention_impl` ('auto': cuDNN flash attention on a GPU
where it takes the call, models/attention.py); one with which a part's set-up and first compile
fail falls back to 'xla' (the JSON keeps the error). Parts run in their own processes under
accelerator.sh; each merges its entry into --json (the other parts' entries kept) and rewrites
--markdown from the whole file.
"""

import argparse
import concurrent.futures
import contextlib
import copy
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position,g-bad-import-order
import common  # first: puts the repository root on sys.path (a bare machine has no install)
from configs import common as config_common
from ldm_jax import checkpoint
from ldm_jax import convert
from ldm_jax import sharding
from ldm_jax import weights
from ldm_jax.data import pipeline as data_pipeline
from ldm_jax.data import precompute
from ldm_jax.data import sources
from ldm_jax.diffusion import pipeline as sd_pipeline
from ldm_jax.models import attention
from ldm_jax.models import build
from ldm_jax.train import export
from ldm_jax.train import loop as train_loop
from ldm_jax.train import stages
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib
# pylint: enable=g-import-not-at-top,wrong-import-position,g-bad-import-order

PARTS = ('train', 'sample', 'loop')
# The goals (issue 15): on an H100-class GPU.
GOALS = {'train_mfu_pct': 45.0, 'loop_ratio': 0.95, 'sample_s_per_image': 0.35}
SIZES = {
    # Stable Diffusion 1.5: 512x512 images, 64x64x4 latents, 77x768 text states.
    'accelerator': dict(preset='sd15', resolution=512, train_batches=(8, 16, 32), warmup=2,
                        steps=5, repeats=3, loop_batch=16, records=256, bare_steps=20,
                        loop_steps=40, sample_batches=(1, 8), sample_steps=50,
                        sample_repeats=(5, 3)),
    # The same code at the tiny presets: 16x16 images, 8x8 latents, 77x32 text states.
    'dry_run': dict(preset='tiny', resolution=16, train_batches=(1, 2), warmup=1, steps=2,
                    repeats=2, loop_batch=2, records=16, bare_steps=3, loop_steps=4,
                    sample_batches=(1, 2), sample_steps=3, sample_repeats=(2, 2)),
}
CAPTIONS = ('a red circle', 'a blue square', 'a green triangle', 'a small yellow star')


def sd_config(size, scratch, per_device_batch, attention_impl, remat):
  """The ldm training config of the benchmark: SD-shaped, bf16 compute, float32 weights.

  The U-Net trains from scratch (no `init`), the text encoder is frozen (a random one saved as a
  clip-stage run, `write_text_encoder_run`), the VAE is random and never runs (the data is
  precomputed: `write_precomputed`), the tokenizer is the word-level 'shapes' one (no files).

  Args:
    size: an entry of SIZES.
    scratch: the folder holding the dataset ('data/') and the text encoder run.
    per_device_batch: examples per device (the global batch is this times the device count).
    attention_impl: the U-Net's attention kernel (the VAE and text encoder keep the config's).
    remat: `model.remat` ('full' is what configs/sd15.py trains with).
  """
  c = config_common.training('ldm', size['preset'], 'precomputed/train',
                             os.path.join(scratch, 'data'), size['resolution'],
                             per_device_batch * jax.device_count())
  c.model.dtype = 'bfloat16'  # compute
  c.model.param_dtype = 'float32'  # master weights
  c.model.remat = remat
  c.model.unet.attention_impl = attention_impl
  c.allow_random_vae = True  # never runs: the latents are precomputed
  c.tokenizer = 'shapes'  # built on the spot: no vocabulary to download
  c.text_encoder.trainable = False
  c.text_encoder.workdir = os.path.join(scratch, 'text_encoder_run')
  c.data.precomputed = True
  c.sample_every = 0  # no previews
  c.ckpt_every = 10 ** 6  # the loop saves at its end only
  return c


def write_text_encoder_run(config, directory):
  """A clip-stage run holding a random text encoder (its EMA tree), for `text_encoder.workdir`."""
  if checkpoint.latest_checkpoint_dir(directory) is not None:
    return directory  # written by an earlier part: the same weights, the same compiled step
  text = build.networks_from_config(config.model)['text_encoder']
  params = build.random_params(text, seed=1)
  ckpt = checkpoint.Checkpointer(directory, async_save=False)
  try:
    ckpt.save(1, {'ema_params': {'text_encoder': params}}, {'position': 0},
              {'stage': 'clip', 'note': 'random weights written by bench/accelerator.py'})
  finally:
    ckpt.close()
  return directory


def random_records(rng, n, side, latent_channels, length, width):
  """(moments, context) of n examples: VAE posterior moments (n, side, side, 2 * channels) with
  SD-like scales (mean ~ N(0, 4^2), log-variance -8) and text states (n, length, width)."""
  mean = 4.0 * rng.standard_normal((n, side, side, latent_channels), dtype=np.float32)
  moments = np.concatenate([mean, np.full_like(mean, -8.0)], axis=-1)
  return moments, rng.standard_normal((n, length, width), dtype=np.float32)


def write_precomputed(config, stage, num_records, seed=0):
  """Writes `num_records` random records in `data.precompute`'s format as the dataset that
  `config.data` names (precomputed/train under data_dir). Returns the seconds it took."""
  if sources.newest_version(config.data.name, config.data.data_dir):
    return 0.0
  t0 = time.perf_counter()
  vae, text = stage.vae, stage.text_encoder
  rng = np.random.default_rng(seed)
  side = config.data.resolution // vae.config.downsample_factor
  records = []
  for k in range(num_records):
    moments, context = random_records(rng, 1, side, vae.config.latent_channels,
                                      config.data.max_length, text.config.hidden_size)
    records.append({'moments': moments[0], 'context': context[0], 'caption': CAPTIONS[k % 4],
                    'input_ids': np.zeros((config.data.max_length,), np.int32),
                    'original_size': np.full(2, config.data.resolution, np.int32),
                    'crop_top_left': np.zeros(2, np.int32)})
  loader_config = data_pipeline.LoaderConfig.from_config(config.data, name='synthetic')
  job = precompute.Job(loader_config, None, (vae, None), (text, None), np.dtype(np.float32),
                       config.data.name.split('/', 1)[1], config.data.data_dir,
                       range(num_records), None, num_records, {})
  job.progress_dir.mkdir(parents=True)
  job.write_shard(0, records, [(config.data.resolution,) * 2] * num_records, {})
  precompute.finalize(job)
  return time.perf_counter() - t0


def build_stage(config, tokenizer_dir):
  """The ldm stage of `config` (its frozen weights loaded) and its tokenizer."""
  tok = weights.tokenizer(config, tokenizer_dir)
  weights.fill_vocab_size(config, tok)
  return stages.build_stage(config, tok), tok


def host_batch(config, stage, batch, seed=0):
  """A global batch as the precomputed loader yields it (moments, context, drop, input_ids)."""
  rng = np.random.default_rng(seed)
  side = config.data.resolution // stage.vae.config.downsample_factor
  moments, context = random_records(rng, batch, side, stage.vae.config.latent_channels,
                                    config.data.max_length, stage.text_encoder.config.hidden_size)
  return {'moments': moments, 'context': context,
          'drop': rng.random(batch) < config.data.caption_dropout,
          'input_ids': np.zeros((batch, config.data.max_length), np.int32)}


def attention_candidates(impl):
  """The U-Net attention kernels to try, in order: `impl`, then 'xla' (which always works)."""
  return [impl] if impl == 'xla' else [impl, 'xla']


def with_fallback(candidates, fn):
  """fn(impl) for the first attention kernel in `candidates` with which it does not raise; an
  error with the last one is raised.

  Returns:
    (fn's result, the kernel used, {kernel: error} of the ones that failed).
  """
  errors = {}
  for impl in candidates[:-1]:
    try:
      return fn(impl), impl, errors
    except Exception as e:  # pylint: disable=broad-except  (cuDNN's checks raise several types)
      errors[impl] = one_line(e)
      logging.warning('attention %r failed here (%s); trying the next', impl, errors[impl])
  return fn(candidates[-1]), candidates[-1], errors


def one_line(error):
  """'TypeName: the first line of the message' (at most 300 characters of it)."""
  text = str(error).strip().splitlines()
  return f'{type(error).__name__}: {text[0][:300] if text else ""}'


def peak_bytes():
  """The process's peak device memory so far (`peak_bytes_in_use`), or None (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('peak_bytes_in_use') if stats else None


@dataclasses.dataclass
class TrainSetup:
  """The train step of one config, ready to lower for any batch."""
  config: object
  stage: object
  tx: object
  lr_schedule: object
  mesh: object
  rng: object
  abstract: object  # the state's ShapeDtypeStructs with their shardings
  update: object  # the jitted step (make_step)
  frozen: object  # placed on the mesh
  init: object  # compiled: rng -> a fresh state
  init_compile_s: float


def train_setup(config, tokenizer_dir):
  """Builds the stage, the jitted step and the compiled state initialiser of `config`."""
  # The cache train.loop.setup uses: the loop part then loads this part's compiled step.
  step_lib.use_compilation_cache(config.compilation_cache_dir)
  stage, _ = build_stage(config, tokenizer_dir)
  tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  rng = jax.random.key(config.seed)
  abstract, frozen_shardings, update = step_lib.make_step(config, stage, tx, lr_schedule, mesh,
                                                          rng)
  frozen = sharding.put_host_tree(stage.frozen, frozen_shardings)
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  t0 = time.perf_counter()
  # As train.loop initialises a run from scratch (the same function: a compilation cache hit).
  init = jax.jit(lambda r: state_lib.init_state(stage.init_params(r), tx),
                 out_shardings=shardings).lower(rng).compile()
  return TrainSetup(config, stage, tx, lr_schedule, mesh, rng, abstract, update, frozen, init,
                    time.perf_counter() - t0)


def abstract_batch(setup, batch):
  """ShapeDtypeStructs of a global batch of `batch` examples, sharded as the loop shards it."""
  data = sharding.batch_sharding(setup.mesh)
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data)
          for k, v in host_batch(setup.config, setup.stage, batch).items()}


def model_flops(setup, batch):
  """The step's model FLOPs at `batch`: XLA's cost analysis of the step traced (not compiled)
  with the U-Net's remat off and einsum attention without CPU query chunks, so that neither
  recomputation nor a kernel XLA cannot see into changes the count (bench/train_step.py's rule)."""
  stage = setup.stage
  _ = stage.empty_context  # computed once, before the copy shares it
  counted = copy.copy(stage)
  counted.unet = stage.unet.clone(config=dataclasses.replace(
      stage.unet.config, remat='none', attention_impl='xla'))
  fn = step_lib.make_update_fn(counted.loss, setup.tx, setup.config.ema,
                               setup.config.optim.grad_accum, setup.lr_schedule)
  budget, attention.CPU_QUERY_CHUNK_LOGITS = attention.CPU_QUERY_CHUNK_LOGITS, float('inf')
  try:
    lowered = jax.jit(fn).lower(setup.abstract, setup.frozen, abstract_batch(setup, batch),
                                setup.rng)
  finally:
    attention.CPU_QUERY_CHUNK_LOGITS = budget
  return common.xla_flops(lowered)


def compile_timed(lowered):
  """(compiled, seconds)."""
  t0 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, time.perf_counter() - t0


def time_steps(setup, compiled, batch, size):
  """Runs `warmup` steps, then `repeats` rounds of `steps` back-to-back steps on a fresh state.

  Returns:
    (seconds per step of each round, the last loss).
  """
  placed = sharding.put_batch(host_batch(setup.config, setup.stage, batch), setup.mesh)
  block = train_loop.blocks_each_step()  # XLA:CPU with several devices, as the loop does
  state, metrics = setup.init(setup.rng), None
  for _ in range(size['warmup']):
    state, metrics = compiled(state, setup.frozen, placed, setup.rng)
  jax.block_until_ready(state)
  rounds = []
  for _ in range(size['repeats']):
    t0 = time.perf_counter()
    for _ in range(size['steps']):
      state, metrics = compiled(state, setup.frozen, placed, setup.rng)
      if block:
        jax.block_until_ready(metrics)
    jax.block_until_ready((state, metrics))
    rounds.append((time.perf_counter() - t0) / size['steps'])
  loss = float(metrics['loss'])
  del state
  return rounds, loss


def train_row(setup, compiled, batch, compile_s, size, peak):
  """One batch's timings and derived numbers (MFU against `peak` TFLOP/s per device)."""
  rounds, loss = time_steps(setup, compiled, batch, size)
  seconds = statistics.median(rounds)
  flops = model_flops(setup, batch)
  row = {'per_device_batch': batch // jax.device_count(), 'global_batch': batch,
         'ms': 1e3 * seconds, 'min_ms': 1e3 * min(rounds),
         'rounds_ms': [round(1e3 * s, 2) for s in rounds], 'images_per_s': batch / seconds,
         'compile_s': compile_s, 'loss': loss, 'peak_bytes': peak_bytes(),
         'step_memory_bytes': step_lib.memory_needs(compiled)['total']}
  if flops:
    row.update(gflop_per_step=flops / 1e9, achieved_tflops=flops / seconds / 1e12)
    if peak:
      row['mfu_pct'] = 100 * row['achieved_tflops'] / (peak * jax.device_count())
  return row


def train_part(args, size, scratch, rec):
  """The train step at each per-device batch (recorded after each)."""
  peak, peak_source = common.peak_tflops('bfloat16', args.peak_tflops)
  batches = [b * jax.device_count() for b in size['train_batches']]
  result = {'peak_tflops_per_device': peak, 'peak_source': peak_source, 'remat': args.remat,
            'goal_mfu_pct': GOALS['train_mfu_pct'], 'rows': []}

  def first(impl):  # any error here with a kernel other than the last: the next one is tried
    config = sd_config(size, scratch, size['train_batches'][0], impl, args.remat)
    write_text_encoder_run(config, config.text_encoder.workdir)
    setup = train_setup(config, os.path.join(scratch, 'train_tokenizer'))
    lowered = setup.update.lower(setup.abstract, setup.frozen, abstract_batch(setup, batches[0]),
                                 setup.rng)
    return (setup,) + compile_timed(lowered)

  first_try = with_fallback(attention_candidates(args.attention_impl), first)
  (setup, compiled, seconds), impl, errors = first_try
  result.update(attention_impl=impl, fallback_errors=errors, init_compile_s=setup.init_compile_s)
  logging.info('train: attention %r, state init compiled in %.1f s, batch %d in %.1f s', impl,
               setup.init_compile_s, batches[0], seconds)
  t0 = time.perf_counter()
  result['rows'].append(train_row(setup, compiled, batches[0], seconds, size, peak))
  rec.save('train', result)
  first_s = seconds + time.perf_counter() - t0
  del compiled
  rest = compile_rest(setup, batches[1:], first_s, args.deadline, args.parallel_compile)
  for batch, compiled, seconds in rest:
    if compiled is None:
      result['rows'].append({'global_batch': batch, 'skipped': 'not enough time left'})
    else:
      logging.info('train: batch %d compiled in %.1f s', batch, seconds)
      result['rows'].append(train_row(setup, compiled, batch, seconds, size, peak))
    rec.save('train', result)
  return result


def compile_rest(setup, batches, estimate_s, deadline, parallel):
  """Yields (batch, compiled or None, compile seconds) for the remaining batches.

  With `parallel`, they compile at once in threads (XLA compiles outside the GIL; their GPU
  autotuning then shares the device, see bench/NOTES.md) when the deadline leaves twice
  `estimate_s` (the first batch's compile and timing); else one at a time while there is 1.2
  times that left, the others skipped (None).
  """
  lowered = [(b, setup.update.lower(setup.abstract, setup.frozen, abstract_batch(setup, b),
                                    setup.rng)) for b in batches]
  left = lambda: float('inf') if deadline is None else deadline - time.time()
  if parallel and len(lowered) > 1 and left() > 2 * estimate_s:
    with concurrent.futures.ThreadPoolExecutor(len(lowered)) as pool:
      done = list(pool.map(lambda item: compile_timed(item[1]), lowered))
    for (batch, _), (compiled, seconds) in zip(lowered, done):
      yield batch, compiled, seconds
    return
  for batch, low in lowered:
    if left() < 1.2 * estimate_s:
      logging.info('train: batch %d skipped: %.0f s left, the first batch took %.0f s', batch,
                   left(), estimate_s)
      yield batch, None, 0.0
      continue
    yield (batch,) + compile_timed(low)


def loop_part(args, size, scratch, rec):
  """`bench/loop.py`'s measure on the SD-shaped config and the synthetic precomputed dataset.

  The U-Net's attention kernel is the one the train part used (the same step: with the
  compilation cache on, its compiled step is loaded, not compiled again); without a train part,
  the candidates in turn.
  """
  trained = rec.results.get('train', {}).get('attention_impl')
  result = {'goal_ratio': GOALS['loop_ratio']}

  def measure(impl):
    config = sd_config(size, scratch, size['loop_batch'], impl, args.remat)
    write_text_encoder_run(config, config.text_encoder.workdir)
    stage, _ = build_stage(config, os.path.join(scratch, 'loop_tokenizer'))
    result.update(dataset_write_s=write_precomputed(config, stage, size['records']),
                  records=size['records'], per_device_batch=size['loop_batch'],
                  global_batch=config.data.batch_size, attention_impl=impl)
    rec.save('loop', result)  # what it got to, should the measurement not finish in time
    workdir = tempfile.mkdtemp(prefix=f'loop_{impl}_', dir=scratch)
    return run_measure(config, workdir, size)

  candidates = [trained] if trained else attention_candidates(args.attention_impl)
  measured, impl, errors = with_fallback(candidates, measure)
  result.update(measured, attention_impl=impl, fallback_errors=errors)
  result.update(without_checkpoint(result))
  rec.save('loop', result)
  return result


def run_measure(config, workdir, size):
  """bench/loop.py's `measure`, without the final export (`no_final_export`)."""
  # Imported here, so that the other parts run whatever state loop.py is in; after jax (module
  # top), so that its JAX_NUM_CPU_DEVICES default does not apply to this process.
  import loop  # pylint: disable=g-import-not-at-top
  with no_final_export():
    return loop.measure(config, workdir, bare_steps=size['bare_steps'],
                        loop_steps=size['loop_steps'])


@contextlib.contextmanager
def no_final_export():
  """Skips the diffusers export that ends a finished run (`train.export.export`): it comes after
  the timed window, and at SD scale writes ~4 GB for nothing here (device time is scarce)."""
  saved = export.export
  export.export = lambda *args, **kwargs: logging.info('final export skipped (benchmark)')
  try:
    yield
  finally:
    export.export = saved


def without_checkpoint(result):
  """The loop/step ratio with the loop's checkpoint time left out (the window's one save of the
  whole state is a host cost a long run pays once per ckpt_every steps, not every step)."""
  phases = result.get('phases_ms') or {}
  if 'wall' not in phases or not result.get('step_images_per_s'):
    return {}
  step_ms = 1e3 * result['global_batch'] / result['step_images_per_s']
  loop_ms = phases['wall'] - phases.get('checkpoint', 0.0)
  return {'step_ms': step_ms, 'loop_ms': phases['wall'],
          'ratio_without_checkpoint': step_ms / loop_ms if loop_ms > 0 else None}


def sample_components(config, impl):
  """Random SD networks of `config.model` (the U-Net with attention `impl`) as Components."""
  config = copy.deepcopy(config)
  config.model.unet.attention_impl = impl
  tok = weights.tokenizer(config)
  weights.fill_vocab_size(config, tok)
  nets = build.networks_from_config(config.model)
  params = {name: build.random_params(net, seed) for seed, (name, net) in enumerate(nets.items())}
  return convert.Components(
      unet=(nets['unet'], params['unet']), vae=(nets['vae'], params['vae']),
      text_encoder=(nets['text_encoder'], params['text_encoder']), tokenizer=tok,
      scheduler_config=weights.scheduler_config(config.diffusion))


def sample_part(args, size, scratch, rec):
  """txt2img with CFG at each batch: the first calls compile (in parallel), then timed calls."""
  side = size['resolution']
  result = {'sampler': 'dpmpp_2m', 'steps': size['sample_steps'], 'guidance': 7.5,
            'image_size': side, 'goal_s_per_image': GOALS['sample_s_per_image'], 'rows': []}
  base = sd_config(size, scratch, 1, 'xla', 'none')

  def call(sd, batch):
    t0 = time.perf_counter()
    sd.generate([CAPTIONS[i % 4] for i in range(batch)], steps=size['sample_steps'],
                sampler='dpmpp_2m', guidance_scale=7.5, seed=0, height=side, width=side)
    return time.perf_counter() - t0

  def first_calls(impl):  # compile every batch's function at once (threads)
    sd = sd_pipeline.StableDiffusion(sample_components(base, impl))
    with concurrent.futures.ThreadPoolExecutor(len(size['sample_batches'])) as pool:
      return sd, list(pool.map(lambda b: call(sd, b), size['sample_batches']))

  first_try = with_fallback(attention_candidates(args.attention_impl), first_calls)
  (sd, firsts), impl, errors = first_try
  result.update(attention_impl=impl, fallback_errors=errors)
  for batch, first, repeats in zip(size['sample_batches'], firsts, size['sample_repeats']):
    times = [call(sd, batch) for _ in range(repeats)]
    median = statistics.median(times)
    result['rows'].append({'batch': batch, 'first_call_s': first, 's_per_call': median,
                           'min_s': min(times), 'all_s': [round(t, 4) for t in times],
                           's_per_image': median / batch, 'images_per_s': batch / median,
                           'peak_bytes': peak_bytes()})
    rec.save('sample', result)
  return result


class Recorder:
  """The results of every part, merged into --json (other parts' entries kept) and rendered
  into --markdown each time a part records something, so that a run stopped by its time limit
  keeps what it measured."""

  def __init__(self, json_path, markdown_path, setup):
    self.json_path, self.markdown_path = json_path, markdown_path
    self.results = read_json(json_path)
    self.results['setup'] = setup
    self._started = {}

  def start(self, part):
    """Notes the part's start; a rerun of a part replaces its old entry."""
    self._started[part] = time.time()
    self.results.pop(part, None)

  def save(self, part, result):
    """Records `result` as the part's entry, with its wall time so far, and writes both files."""
    self.results[part] = dict(result, wall_s=time.time() - self._started.get(part, time.time()))
    if self.json_path:
      write_atomically(self.json_path, json.dumps(self.results, indent=2, default=str))
    if self.markdown_path:
      write_atomically(self.markdown_path, markdown(self.results))


def read_json(path):
  """The results in `path`, or {} when there is none yet."""
  if not path or not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def write_atomically(path, text):
  """Writes through a temporary file: a run killed meanwhile leaves the previous file whole."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=folder, delete=False, suffix='.tmp') as f:
    f.write(text)
  os.replace(f.name, path)


def setup_info(args, size_name):
  """What ran where: device, software versions, settings, load."""
  versions = {}
  for name in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'transformers',
               'grain', 'tensorflow-datasets', 'protobuf'):
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  device = jax.devices()[0]
  return {
      'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      'command': args.command or ' '.join(sys.argv), 'sizes': size_name, 'dry_run': args.dry_run,
      'backend': jax.default_backend(), 'device_kind': device.device_kind,
      'device_count': jax.device_count(), 'python': sys.version.split()[0], 'versions': versions,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'mem_fraction': os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION'),
      'compilation_cache_dir': jax.config.jax_compilation_cache_dir,
      'load_average': os.getloadavg(), 'compute': 'bfloat16, float32 master weights',
  }


def _gib(n):
  return None if n is None else n / 2 ** 30


def _met(value, goal, at_most, setup):
  """'yes' / 'no' against the goal (an H100-class GPU's); in brackets on any other device."""
  if value is None:
    return '-'
  ok = value <= goal if at_most else value >= goal
  word = 'yes' if ok else 'no'
  kind = str(setup.get('device_kind', ''))
  return word if any(k in kind for k in ('H100', 'H200', 'H800')) else f'({word}: not H100-class)'


def _cell(value, fmt):
  return '-' if value is None else format(value, fmt)


def _num(value):
  """A number with 3 significant digits below 100 (the dry run's tiny values), else whole."""
  if value is None:
    return '-'
  return f'{value:.0f}' if abs(value) >= 100 else f'{value:.3g}'


def markdown(results):
  """The tables of whatever parts `results` holds, with the goals beside the numbers."""
  s = results.get('setup', {})
  versions = ', '.join(f'{k} {v}' for k, v in s.get('versions', {}).items() if v)
  lines = [f"**{s.get('device_kind')} x {s.get('device_count')}** ({s.get('backend')}), "
           f"{s.get('date')}, {s.get('compute')}" + (', DRY RUN (tiny sizes)' if s.get('dry_run')
                                                      else ''),
           '', f"Command: `{s.get('command')}`; load {_load(s)}; {versions}", '']
  for part, render in (('train', _md_train), ('loop', _md_loop), ('sample', _md_sample)):
    t = results.get(part)
    if t is None:
      continue
    if set(t) <= {'error', 'wall_s'}:  # failed before it measured anything
      lines += [f"{part}: ERROR {t.get('error')}", '']
    else:
      lines += render(t, s) + ['']
  return '\n'.join(lines)


def _load(s):
  load = s.get('load_average')
  return '-' if not load else f'{load[0]:.2f}'


def _md_train(t, s):
  rows = []
  for r in t.get('rows', []):
    if 'skipped' in r:
      rows.append([str(r['global_batch']), r['skipped']] + [''] * 9)
      continue
    rows.append([str(r['per_device_batch']), str(r['global_batch']),
                 f"{r['ms']:.1f} ({r['min_ms']:.1f})", f"{r['images_per_s']:.1f}",
                 _num(r.get('achieved_tflops')), _cell(r.get('mfu_pct'), '.1f'),
                 _met(r.get('mfu_pct'), GOALS['train_mfu_pct'], False, s),
                 _cell(_gib(r.get('peak_bytes')), '.1f'),
                 _num(_gib(r.get('step_memory_bytes'))), f"{r['compile_s']:.0f}",
                 _num(r.get('gflop_per_step'))])
  head = (f"SD U-Net train step (the ldm stage's step, precomputed latents, remat "
          f"{t.get('remat')!r}, attention {t.get('attention_impl')!r}); MFU against "
          f"{_num(t.get('peak_tflops_per_device'))} TFLOP/s per device "
          f"({t.get('peak_source')}); goal MFU >= {GOALS['train_mfu_pct']:.0f}%; init compile "
          f"{t.get('init_compile_s', 0):.0f} s" + _errors(t))
  return [head, ''] + common.markdown_table(
      ['batch/device', 'global', 'ms/step (min)', 'images/s', 'TFLOP/s', 'MFU %', 'goal met',
       'peak GiB', 'XLA step GiB', 'compile s', 'GFLOP/step'], rows)


def _md_loop(t, s):
  phases = ', '.join(f'{k} {v:.1f}' for k, v in (t.get('phases_ms') or {}).items()
                     if k != 'wall' and v >= 0.05)
  ratio = t.get('ratio')
  row = [str(t.get('per_device_batch')), str(t.get('global_batch')),
         _cell(t.get('step_images_per_s'), '.1f'), _cell(t.get('loop_images_per_s'), '.1f'),
         _cell(ratio, '.3f'), _cell(t.get('ratio_without_checkpoint'), '.3f'),
         _met(ratio, GOALS['loop_ratio'], False, s), phases or '-',
         _cell(t.get('compile_s'), '.0f')]
  head = (f"Training loop vs bare step (bench/loop.py `measure`, {t.get('records')} synthetic "
          f"precomputed records, attention {t.get('attention_impl')!r}); goal: loop within "
          f"{100 * (1 - GOALS['loop_ratio']):.0f}% of the bare step" + _errors(t))
  if t.get('status'):
    head += f"; {t['status']}"
  return [head, ''] + common.markdown_table(
      ['batch/device', 'global', 'step img/s', 'loop img/s', 'ratio', 'ratio w/o ckpt',
       'goal met', 'loop ms/step by phase', 'compile s'], [row])


def _md_sample(t, s):
  rows = []
  for r in t.get('rows', []):
    goal = r['batch'] == 1
    rows.append([str(r['batch']), f"{r['s_per_call']:.3f} ({r['min_s']:.3f})",
                 f"{r['s_per_image']:.3f}", f"{r['images_per_s']:.2f}",
                 f"<= {GOALS['sample_s_per_image']}" if goal else '-',
                 _met(r['s_per_image'], GOALS['sample_s_per_image'], True, s) if goal else '-',
                 f"{r['first_call_s']:.0f}", _cell(_gib(r.get('peak_bytes')), '.1f')])
  side = t.get('image_size')
  head = (f"txt2img {side}x{side}, {t.get('steps')} {t.get('sampler')} steps, CFG "
          f"{t.get('guidance')} (`StableDiffusion.generate`, attention {t.get('attention_impl')!r})"
          + _errors(t))
  return [head, ''] + common.markdown_table(
      ['batch', 's/call (min)', 's/image', 'images/s', 'goal s/image', 'goal met',
       'first call s', 'peak GiB'], rows)


def _errors(t):
  out = ''.join(f"; attention {k!r} failed: {v}" for k, v in t.get('fallback_errors', {}).items())
  return out + (f"; ERROR: {t['error']}" if t.get('error') else '')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dry-run', '--dry_run', dest='dry_run', action='store_true',
                      help='tiny sizes (CPU): the same code path in a few minutes')
  parser.add_argument('--only', choices=PARTS, help='one part (default: all, in this process)')
  parser.add_argument('--json', help='merge the results into this file')
  parser.add_argument('--markdown', help='write the tables of the whole --json here')
  parser.add_argument('--peak_tflops', type=float, help='bf16 peak of one device, for MFU')
  parser.add_argument('--attention_impl', default='auto', choices=attention.IMPLS,
                      help="the U-Net's kernel (models/attention.py); 'xla' if it fails")
  parser.add_argument('--remat', default='full', help="model.remat ('full': configs/sd15.py's)")
  parser.add_argument('--scratch', help='folder for the dataset and text encoder run, shared by '
                      'the parts (default: a new temporary folder)')
  parser.add_argument('--deadline', type=float, help='epoch seconds: later train batches are '
                      'skipped when they would not finish by then')
  parser.add_argument('--command', help='the command to record (accelerator.sh passes its own)')
  parser.add_argument('--no_parallel_compile', dest='parallel_compile', action='store_false',
                      help='compile the train batches after the first one at a time')
  args = parser.parse_args(argv)
  # ldm_jax's own log lines (compile times and cache hits, the loop's phases) but not orbax's,
  # tfds's or grain's per-operation ones (absl's logger).
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', force=True)
  for name in ('absl', 'jax'):
    logging.getLogger(name).setLevel(logging.WARNING)
  size_name = 'dry_run' if args.dry_run else 'accelerator'
  scratch = args.scratch or tempfile.mkdtemp(prefix='ldm_jax_accelerator_')
  rec = Recorder(args.json, args.markdown, setup_info(args, size_name))
  failed = False
  for part in [args.only] if args.only else PARTS:
    rec.start(part)
    print(f'== {part} ({size_name})', flush=True)
    try:
      {'train': train_part, 'loop': loop_part, 'sample': sample_part}[part](
          args, SIZES[size_name], scratch, rec)
    except Exception as e:  # pylint: disable=broad-except  (recorded; the other parts still run)
      traceback.print_exc()
      rec.save(part, dict(rec.results.get(part, {}), error=one_line(e)))
      failed = True
  if args.markdown:
    print(f'wrote {args.markdown}' + (f' and {args.json}' if args.json else ''))
  else:
    print(markdown(rec.results))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
