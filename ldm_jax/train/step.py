"""The update step: loss, gradients (optionally accumulated), AdamW, EMA, the step's metrics; its
shardings and jit, and its ahead-of-time compilation with a memory check.

Written for one global device (no pmap, no pmean): `jax.jit` with shardings partitions it.
Randomness is per example (`fold_in(rng, example index)`), so a step over a batch of 2b equals
two accumulated micro-steps of b.
"""

import logging
import os
import threading
import time

import jax
import jax.numpy as jnp
import optax

from ldm_jax import sharding
from ldm_jax.train import state as state_lib


def example_keys(rng, step, batch_size):
  """One PRNG key per example of this step's global batch."""
  rng = jax.random.fold_in(rng, step)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch_size))


def make_update_fn(loss_fn, tx, ema, grad_accum=1, lr_schedule=None):
  """Builds `update(state, frozen, batch, rng) -> (state, metrics)`.

  Args:
    loss_fn: `(params, frozen, batch, keys, step) -> (scalar loss, dict of scalar metrics)`, a
      mean over the batch's examples; keys holds one PRNG key per example.
    tx: the optax optimizer.
    ema: the config's `ema` group.
    grad_accum: micro-batches per step (the batch is split along its first axis).
    lr_schedule: step -> learning rate, for the metrics.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def gradients(params, frozen, batch, keys, step):
    if grad_accum == 1:
      return grad_fn(params, frozen, batch, keys, step)
    split = lambda x: x.reshape((grad_accum, x.shape[0] // grad_accum) + x.shape[1:])
    micro = jax.tree.map(split, (batch, keys))

    def body(carry, mb):
      (loss, aux), grads = grad_fn(params, frozen, *mb, step)
      return jax.tree.map(jnp.add, carry, ((loss, aux), grads)), None

    zeros = jax.eval_shape(grad_fn, params, frozen, *jax.tree.map(lambda x: x[0], micro), step)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
    total, _ = jax.lax.scan(body, zeros, micro)
    return jax.tree.map(lambda x: x / grad_accum, total)

  def update(state, frozen, batch, rng):
    params = state['params']
    batch_size = jax.tree.leaves(batch)[0].shape[0]
    keys = example_keys(rng, state['step'], batch_size)
    (loss, aux), grads = gradients(params, frozen, batch, keys, state['step'])
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    decay = state_lib.ema_decay(state['step'], ema)
    new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state,
                 'ema_params': state_lib.ema_update(state['ema_params'], new_params, decay)}
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(new_params), update_norm=optax.tree.norm(updates),
                   ema_decay=decay)
    if lr_schedule is not None:
      metrics['learning_rate'] = lr_schedule(state['step'])
    return new_state, metrics

  return update


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
      make_update_fn(stage.loss, tx, config.ema, config.optim.grad_accum, lr_schedule),
      in_shardings=(shardings, frozen_shardings, sharding.batch_sharding(mesh), replicated),
      out_shardings=(shardings, replicated), donate_argnums=0)
  return abstract, frozen_shardings, update


class OutOfMemoryError(RuntimeError):
  """The compiled step needs more device memory than the device has (the message has both)."""


def compile_ahead(jitted, *args, compiler_options=None):
  """Compiles `jitted` for `args` before anything runs, logs its memory and checks that it fits.

  Args:
    jitted: a `jax.jit`-wrapped function with its shardings.
    *args: its arguments: arrays, or `jax.ShapeDtypeStruct`s with shardings (nothing is
      allocated, so a model too big for the host can still be checked).
    compiler_options: XLA options for `.compile()` (tests make CPU compiles cheaper with them).

  Returns:
    (the compiled function, its memory needs: a dict of bytes per device).

  Raises:
    OutOfMemoryError: the device reports its memory and the step needs more.
  """
  start, hits = time.perf_counter(), _CACHE_HITS.count
  compiled = jitted.lower(*args).compile(compiler_options)
  seconds = time.perf_counter() - start
  cache = jax.config.jax_compilation_cache_dir
  logging.info('compiled the step in %.1f s (%s)', seconds,
               'no persistent compilation cache' if not cache else
               f'loaded from the compilation cache {cache}' if _CACHE_HITS.count > hits else
               f'compiled and written to the compilation cache {cache}')
  memory = memory_needs(compiled)
  limit = device_memory_limit()
  logging.info('compiled step, per device: %s; the device has %s',
               ', '.join(f'{k} {v / 2 ** 30:.2f} GiB' for k, v in memory.items()),
               'no reported limit' if limit is None else f'{limit / 2 ** 30:.2f} GiB')
  if limit is not None and memory['total'] > limit:
    raise OutOfMemoryError(
        f'the train step needs {memory["total"] / 2 ** 30:.2f} GiB per device (arguments '
        f'{memory["arguments"] / 2 ** 30:.2f}, new outputs {memory["outputs"] / 2 ** 30:.2f}, '
        f'temporaries {memory["temporaries"] / 2 ** 30:.2f}) but the device has '
        f'{limit / 2 ** 30:.2f} GiB: lower data.batch_size, raise optim.grad_accum, set '
        "model.remat='full', or shard over more devices (mesh fsdp)")
  return compiled, memory


def memory_needs(compiled):
  """Bytes per device of a compiled function (XLA's memory analysis); donated buffers count once."""
  stats = compiled.memory_analysis()
  memory = {'arguments': stats.argument_size_in_bytes,
            'outputs': stats.output_size_in_bytes - stats.alias_size_in_bytes,
            'temporaries': stats.temp_size_in_bytes, 'code': stats.generated_code_size_in_bytes}
  memory['total'] = sum(memory.values())
  return memory


def device_memory_limit():
  """The first local device's memory in bytes, or None where the backend does not say (CPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return stats.get('bytes_limit') if stats else None


class _HitCounter:
  """Counts JAX's persistent compilation cache hits (a monitoring event), for the compile log."""

  def __init__(self):
    self.count = 0
    self._lock = threading.Lock()
    jax.monitoring.register_event_listener(self._event)

  def _event(self, event, **kwargs):
    del kwargs
    if event == '/jax/compilation_cache/cache_hits':
      with self._lock:
        self.count += 1


_CACHE_HITS = _HitCounter()


def use_compilation_cache(setting):
  """Points JAX's persistent compilation cache at `setting` (the config's
  `compilation_cache_dir`); call before the first compilation. Returns the directory or ''.

  'auto': $JAX_COMPILATION_CACHE_DIR when set (JAX has read it), else `ldm_jax/jax` under the
  user's cache directory ($XDG_CACHE_HOME, or ~/.cache); '' turns the cache off. Only
  compilations of 1 s or more are kept (JAX's default), so the cache holds steps, not small ops.
  """
  if setting == 'auto':
    setting = jax.config.jax_compilation_cache_dir or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
        'ldm_jax', 'jax')
  if setting:
    setting = os.path.abspath(os.path.expanduser(setting))
    try:
      os.makedirs(setting, exist_ok=True)
    except OSError as e:
      logging.warning('no persistent compilation cache: cannot create %s (%s); set '
                      'compilation_cache_dir to a writable folder', setting, e.strerror or e)
      setting = ''
  if setting != (jax.config.jax_compilation_cache_dir or ''):
    jax.config.update('jax_compilation_cache_dir', setting or None)
    from jax.experimental import compilation_cache  # pylint: disable=g-import-not-at-top
    compilation_cache.compilation_cache.reset_cache()  # re-read the setting at the next compile
  return setting
