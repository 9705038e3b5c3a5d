"""Shared benchmark parts: model specs, threads, peak FLOP/s, interleaved timing, tables, JSON.

The benchmarks compare ldm_jax with diffusers' PyTorch models on the same random weights: a
model is built in PyTorch (tests/torch_reference.py), saved as a diffusers folder and read back
by `ldm_jax.convert`, so both sides compute with identical parameters.
"""

import json
import os
import statistics
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, os.path.join(_ROOT, 'tests'))  # torch_reference
sys.path.insert(0, _ROOT)  # configs

# Models: (U-Net, VAE, text encoder) overrides of tests/torch_reference.py's tiny ones, and the
# latent side. `latent` is the default; the scripts take --latent to change it.
_SD_BLOCKS = dict(down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                  up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
                  layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
                  norm_num_groups=32)
_SD_VAE_BLOCKS = dict(down_block_types=('DownEncoderBlock2D',) * 4,
                      up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=32)
MODELS = {
    'tiny': dict(unet={}, vae={}, text={}, latent=8),
    # SD 1.x layout with reduced widths: 4 levels, 2 layers per block, 8 heads, 768-wide context;
    # 32x32 latents (256x256 images through an f=8 VAE).
    'sd_reduced': dict(
        unet=dict(_SD_BLOCKS, block_out_channels=(64, 128, 256, 256)),
        vae=dict(_SD_VAE_BLOCKS, block_out_channels=(32, 64, 128, 128), layers_per_block=1),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                  num_attention_heads=12),
        latent=32),
    # Stable Diffusion 1.5 at its full size (random weights), 64x64 latents (512x512 images).
    'sd15': dict(
        unet=dict(_SD_BLOCKS, block_out_channels=(320, 640, 1280, 1280), sample_size=64),
        vae=dict(_SD_VAE_BLOCKS, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 sample_size=512),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12),
        latent=64),
}

# Dense peak TFLOP/s per accelerator kind and compute dtype (vendor figures, performance.md).
_ACCELERATOR_PEAKS = {
    'H100': {'bfloat16': 989.4, 'float32': 66.9}, 'H200': {'bfloat16': 989.4, 'float32': 66.9},
    'A100': {'bfloat16': 312.0, 'float32': 19.5}, 'B200': {'bfloat16': 2250.0},
    'L40S': {'bfloat16': 362.0}, 'TPU v5p': {'bfloat16': 459.0}, 'TPU v5 lite': {'bfloat16': 197.0},
    'TPU v6': {'bfloat16': 918.0},
}


def add_common_flags(parser):
  """Flags every peer benchmark takes."""
  parser.add_argument('--model', choices=sorted(MODELS), default='tiny')
  parser.add_argument('--latent', type=int, help='latent side (default: the model\'s)')
  parser.add_argument('--repeats', type=int, default=5,
                      help='timed calls per side, interleaved with the other side\'s')
  parser.add_argument('--threads', type=int,
                      help='CPU threads for both sides (default: all of this process\'s CPUs)')
  parser.add_argument('--skip_torch', action='store_true', help='time ldm_jax only')
  parser.add_argument('--json', help='write the results here')


def set_threads(threads):
  """Gives both sides the same CPU threads; call before JAX starts a backend.

  XLA:CPU sizes its thread pool from the process's CPU affinity, PyTorch from its own setting:
  restricting the affinity to `threads` CPUs and setting torch's count to match makes the
  comparison like for like. Returns the thread count in use.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if threads:
    if threads > len(cpus):
      raise ValueError(f'--threads {threads} but this process may use {len(cpus)} CPUs')
    cpus = cpus[:threads]
    os.sched_setaffinity(0, cpus)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(len(cpus))
  except ImportError:
    pass
  return len(cpus)


def peak_tflops(dtype, given=None):
  """(peak TFLOP/s, where it came from) of device 0 for `dtype`: given, a table, or estimated.

  A CPU's peak is estimated as cores x clock x FLOPs per cycle per core (two AVX-512 FMA units:
  64 float32 FLOPs per cycle, 32 with AVX2), an upper bound that XLA and PyTorch rarely reach.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if given:
    return given, 'given'
  kind = jax.devices()[0].device_kind
  for name, peaks in _ACCELERATOR_PEAKS.items():
    if name.lower() in kind.lower() and dtype in peaks:
      return peaks[dtype], f'{name} {dtype} spec'
  if jax.default_backend() != 'cpu':
    return None, f'unknown for {kind}: pass --peak_tflops'
  flags, mhz = '', 0.0
  with open('/proc/cpuinfo') as f:
    for line in f:
      if line.startswith('flags') and not flags:
        flags = line
      elif line.startswith('cpu MHz') and not mhz:
        mhz = float(line.split(':')[1])
  per_cycle = 64 if 'avx512f' in flags.split() else (32 if 'fma' in flags.split() else 8)
  cores = len(os.sched_getaffinity(0))
  return cores * mhz * 1e6 * per_cycle / 1e12, (
      f'estimated: {cores} cores x {mhz / 1e3:.2f} GHz x {per_cycle} FLOP/cycle')


def interleaved(fns, repeats):
  """Times each callable `repeats` times, alternating between them so that load spikes on a
  shared machine hit all sides alike. Returns {name: [seconds, ...]}."""
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return times


def summary(seconds):
  """Median and minimum of a list of durations, in ms."""
  return dict(ms=1e3 * statistics.median(seconds), min_ms=1e3 * min(seconds),
              all_ms=[round(1e3 * s, 2) for s in seconds])


def load_average():
  return os.getloadavg()


def print_table(title, results, columns):
  """One row per side. columns: (header, key, format) triples; missing keys print '-'."""
  print(title)
  print(f"{'':16s}" + ''.join(f' {h:>12s}' for h, _, _ in columns))
  for name in ('ldm_jax', 'diffusers_torch'):
    if name not in results:
      continue
    cells = []
    for _, key, fmt in columns:
      value = results[name].get(key)
      cells.append(f' {format(value, fmt) if value is not None else "-":>12s}')
    print(f'{name:16s}' + ''.join(cells))
  if 'ratio' in results:
    print(f"ratio ldm_jax / torch: {results['ratio']:.2f} (medians), "
          f"{results['ratio_min']:.2f} (minima)")


def finish(results, json_path):
  """Adds the ratios when both sides ran and writes the JSON file if asked."""
  if 'diffusers_torch' in results:
    results['ratio'] = results['ldm_jax']['ms'] / results['diffusers_torch']['ms']
    results['ratio_min'] = results['ldm_jax']['min_ms'] / results['diffusers_torch']['min_ms']
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(results, f, indent=2)
  return results


def xla_flops(stage):
  """The FLOP count of XLA's cost analysis of a lowered or compiled computation, or None."""
  cost = stage.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops']) if cost and 'flops' in cost else None


def markdown_table(headers, rows):
  """A markdown table (a list of lines): `headers` and `rows` of cells, as strings."""
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + ' --- |' * len(headers)]
  return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
