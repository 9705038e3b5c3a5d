"""The training loop: `setup` (mesh, data, stage and optimizer, step, resume) returns a `Run`;
`run` takes its steps, logs, checkpoints, previews and exports."""

import dataclasses
import json
import logging
import os
import signal
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ldm_jax import checkpoint
from ldm_jax import distributed
from ldm_jax import sharding
from ldm_jax import weights
from ldm_jax.data import pipeline
from ldm_jax.data import prefetch
from ldm_jax.train import clock as clock_lib
from ldm_jax.train import evaluate
from ldm_jax.train import export
from ldm_jax.train import logger as logger_lib
from ldm_jax.train import preflight
from ldm_jax.train import stages
from ldm_jax.train import state as state_lib
from ldm_jax.train import step as step_lib


class NonFiniteError(RuntimeError):
  """The loss, the gradients or the weights went NaN/inf; the message names the step and the
  last good checkpoint."""


# Each step's metrics that must be finite: a loss can stay finite while the gradients overflow.
_MUST_BE_FINITE = ('loss', 'grad_norm', 'param_norm', 'update_norm')


@dataclasses.dataclass
class Run:
  """A training run, set up: everything its steps need."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  loader: pipeline.Loader
  stage: stages.Stage
  update: Callable[..., Any]  # jitted `update(state, frozen, batch, rng)`, compiled at step 1
  frozen: dict  # placed on the mesh
  state: dict  # placed on the mesh: restored, pretrained or random
  ckpt: checkpoint.Checkpointer
  rng: jax.Array
  # `update` compiled per batch shape (one, or one per aspect-ratio bucket met), at first sight
  compiled: dict = dataclasses.field(default_factory=dict)
  clock: clock_lib.Clock = dataclasses.field(default_factory=clock_lib.Clock)


def train(config, workdir):
  """Trains `config.stage` in `workdir`; returns the final step."""
  try:
    return run(setup(config, workdir))
  except Exception as e:
    distributed.report_failure(e)  # the other processes stop now, naming this one and why
    raise


def setup(config, workdir):
  """Everything before the first step, in order; returns the Run."""
  try:
    distributed.initialize(config.distributed)  # before anything starts a JAX backend
  except ValueError as e:  # a bad distributed group
    raise preflight.ConfigError([str(e)]) from e
  preflight.check(config, workdir)  # every user error, before anything is written
  step_lib.use_compilation_cache(config.get('compilation_cache_dir', 'auto'))  # before compiles
  os.makedirs(workdir, exist_ok=True)
  rng = jax.random.key(config.seed)
  mesh = sharding.make_mesh([tuple(a) for a in config.mesh])
  tok = weights.tokenizer(config, os.path.join(workdir, 'tokenizer')
                          if distributed.is_main() else None)
  weights.fill_vocab_size(config, tok)
  stage = stages.build_stage(config, tok)
  tx, lr_schedule = state_lib.make_optimizer(config.optim, config.num_steps)
  abstract, frozen_shardings, update = step_lib.make_step(config, stage, tx, lr_schedule, mesh,
                                                          rng)
  unmatched = sharding.unmatched_rules([tuple(r) for r in config.sharding.rules], abstract,
                                       stage.frozen)
  if unmatched:  # a typo in a rule: before the data is read or encoded
    raise preflight.ConfigError(unmatched)
  data_config = pipeline.LoaderConfig.from_config(config.data)
  loader = pipeline.Loader(stage.training_data(data_config, workdir), tok)
  _log_setup(abstract, mesh)
  frozen = sharding.put_host_tree(stage.frozen, frozen_shardings)
  distributed.barrier('ldm_jax_setup')  # orbax's collectives follow
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  distributed.note_checkpoints(ckpt.directory)  # named when a lost process stops the run
  state = _restore_or_init(config, stage, tx, abstract, ckpt, loader, rng)
  return Run(config, workdir, mesh, loader, stage, update, frozen, state, ckpt, rng)


def run(r):
  """Steps `r.state` to `config.num_steps` (or a stop signal), leaving the trained state in
  `r.state`; returns the final step."""
  c = r.config
  done = int(r.state['step'])
  log = logger_lib.Logger(r.workdir, c.num_steps, enabled=distributed.is_main(), start_step=done)
  reader = _MetricsReader(log, c, r.workdir, r.ckpt.latest_step(), r.clock)
  previewer = export.Previewer(r.stage, r.workdir, r.mesh)
  evaluator = evaluate.Evaluator(r.stage, c, r.workdir, r.mesh)
  feed = prefetch.Prefetcher(r.loader, lambda b: sharding.put_batch(b, r.mesh),
                             r.loader.config.prefetch)
  state = r.state
  try:
    with _Stop() as stop:
      for step in range(done, c.num_steps):
        with r.clock.phase('data'):
          batch = next(feed)
        previewer.remember(batch.host)
        state, metrics = _step(r, state, batch)
        done = step + 1
        r.clock.steps += r.clock.started  # the steps the loop's own time is counted over
        reader.push(done, metrics, batch.position['stats'])
        with r.clock.phase('checkpoint'):
          r.ckpt.check()  # a failed background save stops the run now, not at the next save
        last = done == c.num_steps or stop.requested
        if done % c.ckpt_every == 0 or last:
          reader.flush()  # a non-finite step stops here, before its state is saved
          with r.clock.phase('checkpoint'):
            _save(r, reader, done, state, batch.position)
        if c.sample_every and (done % c.sample_every == 0 or last):
          with r.clock.phase('preview'):
            previewer.preview(state['ema_params'], r.frozen, done)
        if evaluator.due(done, last):
          with r.clock.phase('eval'):
            _evaluate(evaluator, log, state, r.frozen, done)
        if not r.clock.started:  # the first step compiled: the loop's own time starts now
          r.clock.start(done)
        if stop.requested:
          break
      reader.flush()
      r.clock.stop()
      r.ckpt.wait()  # the last save is complete (or its failure raised) before the export
  finally:  # an in-flight async save completes even when the run stops on an error
    feed.close()  # the loader is free again (the vae export reads a few batches)
    r.ckpt.close()
    log.close()
  r.clock.input_ms = {'load': 1e3 * feed.load_s / max(feed.made, 1),
                      'place': 1e3 * feed.place_s / max(feed.made, 1)}
  logging.info('training loop, %s; the input thread spent %.1f ms loading and %.1f ms placing '
               'each batch; the step was compiled for %d batch shape(s)', r.clock.summary(),
               r.clock.input_ms['load'], r.clock.input_ms['place'], len(r.compiled))
  r.state = state  # the Run holds the trained state (its first state was donated to the step)
  if done == c.num_steps:
    export.export(r.stage, state, r.frozen, r.workdir, r.loader)
  return int(state['step'])


def _evaluate(evaluator, log, state, frozen, step):
  """Samples and scores the EMA weights (every process takes part); process 0 logs."""
  result = evaluator.evaluate(state['ema_params'], frozen, step)
  if result is not None:
    log.log_eval(step, *result)


def _step(r, state, batch):
  """One update on `batch` (compiling the step first if it is not yet); (state, metrics)."""
  step = compiled_step(r, state, batch.placed)
  with r.clock.phase('dispatch'):
    state, metrics = step(state, r.frozen, batch.placed, r.rng)
  if blocks_each_step():
    with r.clock.phase('device'):
      jax.block_until_ready(metrics)
  return state, metrics


def compiled_step(r, state, placed):
  """The update compiled for the shapes of batch `placed`, compiled now if they are new (before
  the first step, and at a new aspect-ratio bucket's first batch): a step that cannot fit
  fails here. All hosts meet a bucket at the same step (buckets.Plan), so they compile
  together."""
  shapes = tuple((k, v.shape) for k, v in sorted(placed.items()))
  if shapes not in r.compiled:
    if r.compiled:
      logging.info('a new batch shape (%s): compiling the step for it, %d shapes so far',
                   ', '.join(f'{k} {"x".join(map(str, s))}' for k, s in shapes
                             if len(s) > 2), len(r.compiled) + 1)
    r.compiled[shapes], _ = step_lib.compile_ahead(r.update, state, r.frozen, placed, r.rng)
    distributed.barrier('ldm_jax_step_compiled')
  return r.compiled[shapes]


def blocks_each_step():
  """Whether a step is waited for before the next is dispatched: XLA:CPU's all-reduce can
  deadlock with several steps in flight, so on the CPU with several devices (only there)."""
  return jax.default_backend() == 'cpu' and jax.device_count() > 1


def _save(r, reader, step, state, position):
  """Checkpoints `state` (its metrics read: finite) with the data position of the last batch it
  consumed (not of the batches made ahead)."""
  try:
    r.ckpt.save(step, state, position, json.loads(r.config.to_json_best_effort()))
  except checkpoint.NonFiniteStateError as e:
    raise NonFiniteError(f'{e}. {reader.last_good()}') from e
  reader.good_step = step


class _MetricsReader:
  """Reads each step's metrics one step late, so that logging never stalls the device; stops the
  run at a non-finite loss, gradient or weight norm, naming the last good checkpoint."""

  def __init__(self, log, config, workdir, good_step, clock):
    self.log, self.config, self.workdir, self.clock = log, config, workdir, clock
    self.good_step = good_step  # the newest checkpoint saved from finite metrics
    self._pending = None  # (step, metrics on the device, data stats) not yet read

  def last_good(self):
    """Where a rerun restarts, and what to change."""
    if self.good_step is None:
      where = (f'No checkpoint was saved before it (the first is due at step '
               f'{self.config.ckpt_every}): a rerun starts from the beginning')
    else:
      where = (f'The last good checkpoint is step {self.good_step} in '
               f'{os.path.join(self.workdir, "checkpoints")} (resuming restarts there)')
    return f'{where}; lower optim.lr, check the data, or train in float32'

  def push(self, step, metrics, data_stats):
    """Reads the previous step's metrics (done by now) and keeps these for the next call."""
    self.flush()
    self._pending = (step, metrics, data_stats)

  def flush(self):
    """Reads the pending step's metrics now."""
    if self._pending is None:
      return
    (step, metrics, data_stats), self._pending = self._pending, None
    with self.clock.phase('device'):
      values = jax.device_get(metrics)
    bad = [k for k in _MUST_BE_FINITE if k in values and not np.isfinite(values[k])]
    if bad:
      what = (f'loss is {float(values["loss"])}' if 'loss' in bad else
              f'the loss is finite ({float(values["loss"]):.4g}) but '
              + ', '.join(f'{k} is {float(values[k])}' for k in bad)
              + ' (the gradients or the updated weights are not finite)')
      raise NonFiniteError(f'{what} at step {step}: stopped. {self.last_good()}')
    if step % self.config.log_every == 0 or step == self.config.num_steps:
      with self.clock.phase('log'):
        host = {k: round(v, 2) for k, v in self.clock.window(step).items()}
        self.log.log(step, values, self.config.data.batch_size,
                     extra={'data': data_stats, 'host_ms': host})


def _restore_or_init(config, stage, tx, abstract, ckpt, loader, rng):
  """The state to start from.

  Resume order: this workdir's newest good checkpoint (state and data position), then
  `config.resume` (another run's checkpoint: its state, the data starts over), then
  `config.init` (pretrained weights, loaded by the stage), then scratch.
  """
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  found = ckpt.restore_newest_good(abstract)  # corrupt steps are reported and set aside
  if found is not None:
    step, state, data_state = found
    if step > config.num_steps:
      raise preflight.ConfigError([
          f'the workdir\'s checkpoint is at step {step}, past num_steps={config.num_steps}: '
          f'nothing to train. Raise --config.num_steps above {step} to train on, or give '
          'another --workdir'])
    if data_state is not None:
      loader.set_state(data_state)
    logging.info('resumed from step %d of this workdir', step)
    return state
  if config.resume:
    directory = checkpoint.latest_checkpoint_dir(config.resume)
    if directory is None:
      raise FileNotFoundError(f'config.resume={config.resume!r} holds no checkpoint')
    other = checkpoint.Checkpointer(None, async_save=False, directory=directory)
    try:  # another run's: its bad steps are skipped, not moved
      step, state, _ = other.restore_newest_good(abstract, set_aside=False)
    finally:
      other.close()
    logging.info('resumed the state of %s at step %d', config.resume, step)
    return state
  if stage.pretrained is not None:
    logging.info('initialised from %s', config.init)
    arg = sharding.put_host_tree(stage.pretrained, shardings['params'])
    init = jax.jit(lambda p: state_lib.init_state(p, tx), out_shardings=shardings)
  else:
    arg = rng
    init = jax.jit(lambda r: state_lib.init_state(stage.init_params(r), tx),
                   out_shardings=shardings)
  compiled = init.lower(arg).compile()
  # Its run may hold collectives: the CPU backend's (gloo) wait only 30 s for a slower peer.
  distributed.barrier('ldm_jax_init_compiled')
  return compiled(arg)


def _log_setup(abstract, mesh):
  """Logs parameter counts and per-device bytes; with FSDP, checks that the bytes are sharded."""
  for name, tree in abstract['params'].items():
    logging.info('trainable %s: %.2fM parameters', name,
                 sum(np.prod(x.shape) for x in jax.tree.leaves(tree)) / 1e6)
  for name, (total, per_device) in state_lib.state_bytes(abstract).items():
    logging.info('%s: %.1f MB, %.1f MB per device', name, total / 2 ** 20, per_device / 2 ** 20)
  sharded = sharding.check_fsdp_sharded(abstract, mesh)  # raises if FSDP leaves large arrays
  if mesh.shape.get('fsdp', 1) > 1:
    logging.info('%.1f%% of the state\'s bytes are sharded over %s', 100 * sharded,
                 dict(mesh.shape))


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
