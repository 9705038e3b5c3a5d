"""The train state pytree, the optimizer from config, and the EMA of the weights."""

import jax
import jax.numpy as jnp
import optax

from ldm_jax import sharding


def learning_rate_schedule(optim, num_steps):
  """Linear warmup from 0, then constant or cosine decay to `optim.final_lr_fraction` * lr."""
  warmup = max(int(optim.warmup_steps), 0)
  if optim.schedule == 'constant':
    after = optax.constant_schedule(optim.lr)
  elif optim.schedule == 'cosine':
    after = optax.cosine_decay_schedule(optim.lr, max(num_steps - warmup, 1),
                                        alpha=optim.final_lr_fraction)
  else:
    raise ValueError(f"optim.schedule {optim.schedule!r} is not 'constant' or 'cosine'")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), after], [warmup])


def make_optimizer(optim, num_steps):
  """AdamW with global-norm clipping and the learning-rate schedule.

  Returns:
    (optax transformation, schedule function step -> lr).
  """
  if optim.name != 'adamw':
    raise ValueError(f"optim.name {optim.name!r} is not supported; use 'adamw'")
  schedule = learning_rate_schedule(optim, num_steps)
  parts = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm else []
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay))
  return optax.chain(*parts), schedule


def ema_decay(step, ema):
  """The EMA decay at `step` (diffusers' EMAModel): min(decay, (1 + step) / (10 + step)) with
  warmup, else the constant decay; 0 before `ema.start_step` (the EMA copies the weights)."""
  step = jnp.asarray(step, jnp.float32)
  decay = jnp.asarray(ema.decay, jnp.float32)
  if ema.warmup:
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jnp.where(step < ema.start_step, 0.0, decay)


def ema_update(ema_params, params, decay):
  """ema <- decay * ema + (1 - decay) * params, in float32."""
  return jax.tree.map(
      lambda e, p: (decay * e.astype(jnp.float32) + (1 - decay) * p.astype(jnp.float32)).astype(
          e.dtype), ema_params, params)


def init_state(params, tx):
  """{'step', 'params', 'opt_state', 'ema_params'}: the whole mutable state of training."""
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params),
          'ema_params': jax.tree.map(jnp.copy, params)}


def state_bytes(abstract):
  """{'params' | 'opt_state' | 'ema_params': (total bytes, bytes per device)} of a placed state."""
  return {name: sharding.sharded_bytes(abstract[name])
          for name in ('params', 'opt_state', 'ema_params')}
