"""The update step: loss, gradients (optionally accumulated), AdamW, EMA, and the step's metrics.

Written for one global device (no pmap, no pmean): `jax.jit` with shardings partitions it.
Randomness is per example (`fold_in(rng, example index)`), so a step over a batch of 2b equals
two accumulated micro-steps of b.
"""

import jax
import jax.numpy as jnp
import optax

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
