"""Benchmark: the training loop's images/s against the bare compiled step's, same config and batch.

  python bench/loop.py                          # both configs, the table
  python bench/loop.py --json loop.json         # the first config's numbers as JSON
  python bench/loop.py --configs shapes_ldm --loop_steps 1000

Both are measured in one process on the same devices, from one `ldm_jax.train.loop.setup`: the
compiled step called back to back on one batch resident on the devices (blocking on each step
where the loop must: XLA:CPU with several devices), `--bare_steps` in all, half before and half
after the real loop (`loop.run`: input thread, device prefetch, metrics read one step late, logs,
checkpoints at the config's cadence with one at the end of the window) of `--loop_steps` steps.
Previews are off and the final export is outside the window; compilation is outside both (the
loop reuses the compiled step). ratio = loop images/s / step images/s; below 1 the host profile says where the
rest went: per step, the loop thread's time by phase (waiting for data, dispatching, waiting for
the device, logging, checkpoints) and the input thread's load and placement time.

Configs: `shapes_ldm` is `make demo`'s LDM (configs/shapes.py:ldm: precomputed latents, a jointly
trained text encoder, 2 data-parallel CPU devices), `shapes_ldm_online` the same with the VAE
encoding every batch in the step (precompute_latents off). They use the demo's VAE
(runs/demo/vae) when `make demo` has made it, else a random one (same cost). `--json` writes
{"loop_images_per_s", "step_images_per_s", "ratio", ...} of the first config.
"""

import argparse
import json
import os
import sys
import tempfile
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, _ROOT)  # configs

CONFIGS = ('shapes_ldm', 'shapes_ldm_online')


def shapes_config(name, data_dir, vae_workdir):
  """The demo's LDM config (configs/shapes.py:ldm), unlocked; `name` picks the variant."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  config = shapes.get_config('ldm')
  config.data.data_dir = data_dir
  if vae_workdir and os.path.isdir(vae_workdir):
    config.vae_workdir = vae_workdir
  else:
    config.allow_random_vae = True
  config.precompute_latents = name == 'shapes_ldm'
  config.sample_every = 0
  return config


def measure(config, workdir, *, bare_steps, loop_steps):
  """Images/s of the bare step and of the loop (see the module docstring), and where the loop's
  time went.

  Args:
    config: a full training config (not locked); num_steps is set here.
    workdir: an empty directory for the run.
    bare_steps: timed back-to-back calls of the compiled step (after 2 untimed ones), half
      before the loop and half after it (the machine's drift hits both sides alike).
    loop_steps: steps of the real loop (its first, untimed, included).

  Returns:
    dict: loop_images_per_s, step_images_per_s, ratio, compile_s, phases_ms (the loop thread's
    ms per step by phase), input_ms (the input thread's load and place ms per batch), steps.
  """
  from ldm_jax import sharding  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import loop  # pylint: disable=g-import-not-at-top

  config.num_steps = 2 + bare_steps // 2 + loop_steps
  r = loop.setup(config, workdir)
  batch = sharding.put_batch(next(r.loader), r.mesh)
  t0 = time.perf_counter()
  loop.compiled_step(r, r.state, batch)
  compile_s = time.perf_counter() - t0
  first = _bare_steps(r, batch, 2 + bare_steps // 2, warmup=2)
  loop.run(r)
  second = _bare_steps(r, batch, bare_steps - bare_steps // 2)
  bare_s = (first + second) / 2
  images = config.data.batch_size
  result = {
      'loop_images_per_s': images * r.clock.steps / r.clock.wall_s,
      'step_images_per_s': images / bare_s,
      'compile_s': compile_s, 'steps': {'bare': bare_steps, 'loop': r.clock.steps},
      'step_ms_before_after': [round(1e3 * first, 1), round(1e3 * second, 1)],
      'phases_ms': {k: round(v, 2) for k, v in r.clock.per_step_ms().items()},
      'input_ms': {k: round(v, 2) for k, v in r.clock.input_ms.items()},
  }
  result['ratio'] = result['loop_images_per_s'] / result['step_images_per_s']
  return result


def _bare_steps(r, batch, steps, warmup=0):
  """Seconds per step of the compiled step called back to back on one resident batch (after
  `warmup` untimed calls), blocking on each where the loop must (XLA:CPU with several devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  from ldm_jax.train import loop  # pylint: disable=g-import-not-at-top
  block = loop.blocks_each_step()  # as the loop does
  state = r.state
  step = loop.compiled_step(r, state, batch)
  for i in range(steps):
    if i == warmup:
      jax.block_until_ready(state)
      t0 = time.perf_counter()
    state, metrics = step(state, r.frozen, batch, r.rng)
    if block:
      jax.block_until_ready(metrics)
  jax.block_until_ready(state)
  r.state = state
  return (time.perf_counter() - t0) / (steps - warmup)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', nargs='+', choices=CONFIGS, default=list(CONFIGS))
  parser.add_argument('--bare_steps', type=int, default=50)
  parser.add_argument('--loop_steps', type=int, default=500,
                      help='loop steps of the first config (the shapes demo checkpoints every '
                      '500); the online-VAE config runs a fifth of them')
  parser.add_argument('--data_dir', default=os.path.join(_ROOT, 'data'))
  parser.add_argument('--vae_workdir', default=os.path.join(_ROOT, 'runs', 'demo', 'vae'))
  parser.add_argument('--prefetch', type=int, default=None,
                      help='data.prefetch (default: the config\'s, 2); 0: the loop makes each '
                      'batch itself when it needs it')
  parser.add_argument('--json', help='write the first config\'s results here')
  args = parser.parse_args()
  os.environ.setdefault('JAX_NUM_CPU_DEVICES', '2')  # the demo's mesh on a CPU; before JAX starts
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity('info')
  import jax  # pylint: disable=g-import-not-at-top
  results = {}
  for i, name in enumerate(args.configs):
    config = shapes_config(name, args.data_dir, args.vae_workdir)
    if args.prefetch is not None:
      config.data.prefetch = args.prefetch
    with tempfile.TemporaryDirectory() as workdir:
      results[name] = measure(config, workdir, bare_steps=args.bare_steps // (1 + 4 * bool(i)),
                              loop_steps=args.loop_steps // (1 + 4 * bool(i)))
  print(f'\ntraining loop vs bare step, {jax.device_count()} {jax.default_backend()} devices, '
        f'load {os.getloadavg()[0]:.1f}')
  print(f"{'config':20s} {'batch':>6s} {'step img/s':>11s} {'loop img/s':>11s} {'ratio':>6s}  "
        'bare ms/step before, after | loop ms/step by phase (input thread ms/batch)')
  for name, r in results.items():
    phases = ', '.join(f'{k} {v:.1f}' for k, v in r['phases_ms'].items() if v >= 0.05)
    inputs = ', '.join(f'{k} {v:.1f}' for k, v in r['input_ms'].items())
    print(f'{name:20s} {shapes_config(name, "", "").data.batch_size:6d} '
          f'{r["step_images_per_s"]:11.1f} {r["loop_images_per_s"]:11.1f} {r["ratio"]:6.3f}  '
          f'{r["step_ms_before_after"][0]}, {r["step_ms_before_after"][1]} | {phases} ({inputs})')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results[args.configs[0]] | {'config': args.configs[0], 'all': results}, f,
                indent=2)


if __name__ == '__main__':
  main()
