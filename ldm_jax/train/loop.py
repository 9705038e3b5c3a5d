"""The training loop: setup, mesh, data, stage and optimizer, shardings, step, resume, loop."""

import json
import logging
import os
import signal
import tempfile

import jax
import ml_collections
import numpy as np

from ldm_jax import checkpoint
from ldm_jax import distributed
from ldm_jax import sharding
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax.data import pipeline
from ldm_jax.data import shapes as shapes_lib
from ldm_jax.train import export
from ldm_jax.train import logger as logger_lib
from ldm_jax.train import stages
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


class NonFiniteLossError(RuntimeError):
  """The loss went NaN/inf; the message names the step and the last good checkpoint."""


class _Stop:
  """SIGTERM/SIGINT set a flag; the loop saves a checkpoint and leaves at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning('signal %d: saving a checkpoint and stopping', signum)
    self.requested = True

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def resolve_tokenizer(config, workdir):
  """The tokenizer named by `config.tokenizer`, also saved under `<workdir>/tokenizer`.

  Process 0 writes the workdir's copy; other hosts (which may share the workdir) never do.
  """
  folder = os.path.join(workdir, 'tokenizer')
  if not distributed.is_main():
    folder = os.path.join(tempfile.mkdtemp(), 'tokenizer')  # never half-read process 0's copy
  if config.tokenizer == 'shapes':  # a word-level BPE over the shapes captions
    if not os.path.isdir(folder):
      tokenizer_lib.build_caption_tokenizer([' '.join(shapes_lib.caption_words())], folder)
    return tokenizer_lib.load_tokenizer(folder)
  source = config.tokenizer or (os.path.join(config.init, 'tokenizer') if config.init else '')
  if not source:
    raise ValueError("config.tokenizer is empty and there is no config.init to take one from: "
                     "set it to a tokenizer folder (python -m ldm_jax.tokenizer build-clip) or 'shapes'")
  tok = tokenizer_lib.load_tokenizer(source)
  if distributed.is_main() and not os.path.isdir(folder):
    tok.save_pretrained(folder)
  return tok


def _place_initial(tx, shardings, initial):
  placed = sharding.put_host_tree(initial, shardings['params'])
  return jax.jit(lambda p: state_lib.init_state(p, tx), out_shardings=shardings)(placed)


def _restore_or_init(config, stage, tx, abstract, ckpt, loader, rng):
  """The state to start from, and its step.

  Resume order: this workdir's latest checkpoint (state and data position), then
  `config.resume` (another run's checkpoint: its state, the data starts over), then
  `config.init` (a diffusers folder, loaded by the stage), then scratch.
  """
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  if ckpt.latest_step() is not None:
    state, data_state, _ = ckpt.restore(ckpt.latest_step(), abstract)
    if data_state is not None:
      loader.set_state(data_state)
    logging.info('resumed from step %d of this workdir', int(state['step']))
    return state
  if config.resume:
    directory = checkpoint.latest_checkpoint_dir(config.resume)
    if directory is None:
      raise FileNotFoundError(f'config.resume={config.resume!r} holds no checkpoint')
    other = checkpoint.Checkpointer(None, async_save=False, directory=directory)
    state, _, _ = other.restore(other.latest_step(), abstract)
    other.close()
    logging.info('resumed the state of %s at step %d', config.resume, int(state['step']))
    return state
  if stage.initial is not None:
    logging.info('initialised from %s', config.init)
    return _place_initial(tx, shardings, stage.initial)
  return jax.jit(lambda r: state_lib.init_state(stage.init_params(r), tx),
                 out_shardings=shardings)(rng)


def state_bytes(abstract):
  """{'params' | 'opt_state' | 'ema_params': (total bytes, bytes per device)} of a placed state."""
  return {name: sharding.sharded_bytes(abstract[name])
          for name in ('params', 'opt_state', 'ema_params')}


def _log_setup(abstract, mesh):
  """Logs parameter counts and per-device bytes; with FSDP, checks that the bytes are sharded."""
  for name, tree in abstract['params'].items():
    logging.info('trainable %s: %.2fM parameters', name,
                 sum(np.prod(x.shape) for x in jax.tree.leaves(tree)) / 1e6)
  for name, (total, per_device) in state_bytes(abstract).items():
    logging.info('%s: %.1f MB, %.1f MB per device', name, total / 2 ** 20, per_device / 2 ** 20)
  sharded = sharding.check_fsdp_sharded(abstract, mesh)  # raises if FSDP leaves large arrays
  if mesh.shape.get('fsdp', 1) > 1:
    logging.info('%.1f%% of the state\'s bytes are sharded over %s', 100 * sharded,
                 dict(mesh.shape))


def make_step(config, stage, tx, lr_schedule, mesh, rng):
  """The state's shapes with their shardings, the frozen trees' shardings, and the jitted update.

  Returns:
    (abstract state: ShapeDtypeStructs with shardings, frozen shardings, the jitted
    `update(state, frozen, batch, rng) -> (state, metrics)` with the state donated).
  """
  abstract = jax.eval_shape(lambda r: state_lib.init_state(stage.init_params(r), tx), rng)
  rules = [tuple(r) for r in config.sharding.rules]
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  frozen_shardings = sharding.tree_shardings(stage.frozen, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, sharding.P())
  update = jax.jit(
      step_lib.make_update_fn(stage.loss, tx, config.ema, config.optim.grad_accum, lr_schedule),
      in_shardings=(shardings, frozen_shardings, sharding.batch_sharding(mesh), replicated),
      out_shardings=(shardings, replicated), donate_argnums=0)
  return abstract, frozen_shardings, update


def train(config, workdir):
  """Trains `config.stage` in `workdir`; returns the final step."""
  # Setup.
  distributed.initialize(config.distributed)  # before anything starts a JAX backend
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.key(config.seed)
  # Mesh.
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  block_each_step = jax.default_backend() == 'cpu' and jax.device_count() > 1
  # Data.
  tok = resolve_tokenizer(config, workdir)
  data_config = pipeline.LoaderConfig.from_config(config.data)
  if data_config.batch_size % mesh.size:
    raise ValueError(f'global batch {data_config.batch_size} is not divisible by {mesh.size} '
                     f'devices (mesh {dict(mesh.shape)})')
  loader = pipeline.Loader(data_config, tok)
  # Model and optimizer.
  if not dict(config.model.text_encoder).get('vocab_size', 1):  # 0: as many as the tokenizer has
    with config.unlocked():
      config.model.text_encoder.vocab_size = len(tok)
  stage = stages.build_stage(config, tok)
  if config.precompute_latents:  # encode once, train from the encodings
    if stage.name != 'ldm':
      raise ValueError(f'precompute_latents is for the ldm stage, not {stage.name!r}')
    loader = pipeline.Loader(stage.precompute(data_config, os.path.join(workdir, 'precomputed')),
                             tok)
  tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
  # Shardings and step.
  abstract, frozen_shardings, update = make_step(config, stage, tx, lr_schedule, mesh, rng)
  _log_setup(abstract, mesh)
  frozen = sharding.put_host_tree(stage.frozen, frozen_shardings)
  # Resume.
  distributed.barrier('ldm_jax_setup')  # orbax's collectives follow
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  state = _restore_or_init(config, stage, tx, abstract, ckpt, loader, rng)
  config_dict = json.loads(config.to_json_best_effort())
  # Loop.
  log = logger_lib.Logger(workdir, config.num_steps, enabled=distributed.is_main())
  previewer = export.Previewer(stage, config, workdir, mesh)
  start = done = int(state['step'])
  pending, good_step, compiled = None, ckpt.latest_step(), None
  try:
    with _Stop() as stop:
      for step in range(start, config.num_steps):
        host_batch = next(loader)
        previewer.remember(host_batch)
        batch = sharding.put_batch(host_batch, mesh)
        if compiled is None:  # before the first step: a step that cannot fit fails here
          compiled, _ = step_lib.compile_ahead(update, state, frozen, batch, rng)
          distributed.barrier('ldm_jax_step_compiled')
        state, metrics = compiled(state, frozen, batch, rng)
        if block_each_step:  # XLA:CPU all-reduce can deadlock with several steps in flight
          jax.block_until_ready(metrics)
        if pending is not None:  # read back one step late: logging never stalls the device
          _check_and_log(log, *pending, loader, config, good_step, workdir)
        done = step + 1
        pending = (done, metrics)
        last = done == config.num_steps or stop.requested
        if done % config.ckpt_every == 0 or last:
          _check_and_log(log, *pending, loader, config, good_step, workdir)
          pending = None
          ckpt.save(done, state, loader.get_state(), config_dict)
          good_step = done
        if config.sample_every and (done % config.sample_every == 0 or last):
          previewer.preview(state['ema_params'], frozen, done)
        if stop.requested:
          break
      if pending is not None:
        _check_and_log(log, *pending, loader, config, good_step, workdir)
  finally:  # an in-flight async save completes even when the run stops on an error
    ckpt.close()
    log.close()
  if done == config.num_steps:
    ema_params = distributed.to_host(state['ema_params'])  # every process takes part
    frozen = export.host_frozen(stage, frozen)
    if distributed.is_main():
      export.export(stage, jax.device_get(ema_params), jax.device_get(frozen),
                    os.path.join(workdir, 'export'), loader)
  return int(state['step'])


def _check_and_log(log, step, metrics, loader, config, good_step, workdir):
  values = jax.device_get(metrics)
  if not logger_lib.finite({'loss': values['loss']}):
    raise NonFiniteLossError(
        f'loss is {float(values["loss"])} at step {step}: stopped. The last good checkpoint is '
        f'step {good_step} in {os.path.join(workdir, "checkpoints")} (resuming restarts there); '
        'lower optim.lr, check the data, or train in float32')
  if step % config.log_every == 0 or step == config.num_steps:
    log.log(step, values, config.data.batch_size, extra={'data': loader.stats})


def config_from_checkpoint(workdir):
  """The ConfigDict a workdir was trained with (saved in every checkpoint)."""
  _, raw = checkpoint.read_checkpoint(workdir, item='config')
  return ml_collections.ConfigDict(raw)

