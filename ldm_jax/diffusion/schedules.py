"""Noise schedules: betas, alphas_cumprod, sigmas, SNR, forward diffusion and prediction conversions.

Tables are float32 whatever the model computes in (bf16 tables give black or NaN images). They
are built on the host the way PyTorch diffusers builds them (float32 cumprod), so that samplers
reproduce diffusers step for step.
"""

import dataclasses
import math

import flax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
  """The training noise schedule, with diffusers' scheduler_config.json names."""
  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = 'scaled_linear'
  trained_betas: tuple | None = None
  prediction_type: str = 'epsilon'
  rescale_betas_zero_snr: bool = False

  def __post_init__(self):
    if self.beta_schedule not in BETA_SCHEDULES and self.trained_betas is None:
      raise ValueError(f'beta_schedule {self.beta_schedule!r} is not one of {BETA_SCHEDULES}')
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f'prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}')

  @classmethod
  def from_diffusers(cls, raw):
    """The schedule part of any diffusers scheduler_config.json (other keys are sampler options)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names}
    return cls(**kw)


def betas(config):
  """(T,) float32 betas, as diffusers computes them (float32 linspace, squared for scaled_linear)."""
  t = config.num_train_timesteps
  if config.trained_betas is not None:
    b = np.asarray(config.trained_betas, np.float32)
  elif config.beta_schedule == 'linear':
    b = _linspace32(config.beta_start, config.beta_end, t)
  elif config.beta_schedule == 'scaled_linear':
    b = _linspace32(config.beta_start ** 0.5, config.beta_end ** 0.5, t) ** 2
  else:  # squaredcos_cap_v2: the cosine schedule (Nichol & Dhariwal), betas capped at 0.999
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    b = np.array([min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), 0.999) for i in range(t)],
                 np.float32)
  if config.rescale_betas_zero_snr:
    b = rescale_zero_terminal_snr(b)
  return b.astype(np.float32)


def _linspace32(start, stop, n):
  # torch.linspace's float32 recipe: start + i * step for the lower half, stop - (n-1-i) * step
  # for the upper half (within 1 ulp of torch).
  step = np.float32((stop - start) / (n - 1))
  i = np.arange(n, dtype=np.float32)
  half = n // 2
  return np.where(i < half, np.float32(start) + step * i,
                  np.float32(stop) - step * (np.float32(n - 1) - i)).astype(np.float32)


def rescale_zero_terminal_snr(b):
  """Rescales betas so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1)."""
  alphas_bar_sqrt = np.sqrt(_cumprod32(1.0 - b.astype(np.float32)))
  a0, at = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
  alphas_bar_sqrt = (alphas_bar_sqrt - at) * (a0 / (a0 - at))
  alphas_bar = alphas_bar_sqrt ** 2
  alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
  return (1 - alphas).astype(np.float32)


def alphas_cumprod(config):
  """(T,) float32 cumulative products of (1 - beta): the signal fraction at each timestep."""
  return _cumprod32(1.0 - betas(config))


def _cumprod32(x):
  # torch's CPU cumprod accumulates float32 in double: this matches it bit for bit.
  return np.cumprod(x.astype(np.float64)).astype(np.float32)


def sigmas(config):
  """(T,) float32 noise-to-signal ratios sqrt((1 - a) / a) (the k-diffusion sigma)."""
  a = alphas_cumprod(config)
  return np.sqrt((1 - a) / a).astype(np.float32)


@flax.struct.dataclass
class Schedule:
  """The training-time tables as device arrays (a pytree), for losses and forward diffusion."""
  alphas_cumprod: jnp.ndarray  # (T,) float32
  prediction_type: str = flax.struct.field(pytree_node=False, default='epsilon')

  @classmethod
  def create(cls, config):
    return cls(jnp.asarray(alphas_cumprod(config)), config.prediction_type)

  @property
  def num_train_timesteps(self):
    return self.alphas_cumprod.shape[0]

  def snr(self, t):
    """Signal-to-noise ratio a / (1 - a) at integer timesteps t."""
    a = self.alphas_cumprod[t]
    return a / (1 - a)


def _bcast(v, x):
  return jnp.reshape(v, v.shape + (1,) * (x.ndim - v.ndim)).astype(jnp.float32)


def q_sample(schedule, x0, noise, t):
  """Forward diffusion: sqrt(a_t) x0 + sqrt(1 - a_t) noise, per example timestep t (B,)."""
  a = _bcast(schedule.alphas_cumprod[t], x0)
  return jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise


def velocity(schedule, x0, noise, t):
  """The v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
  a = _bcast(schedule.alphas_cumprod[t], x0)
  return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0


def to_x0(prediction_type, model_output, x_t, alpha, sigma):
  """The clean sample x0 predicted from a model output at x_t = alpha * x0 + sigma * noise.

  Every sampler converts through here: DDPM/DDIM with alpha = sqrt(a_t), sigma = sqrt(1 - a_t),
  the sigma-space samplers with alpha = 1 / sqrt(s^2 + 1), sigma = s * alpha for their sigma s.

  Args:
    prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    model_output: the network's prediction.
    x_t: the noisy sample.
    alpha, sigma: the signal and noise scales at x_t (broadcastable to x_t).

  Returns:
    The predicted x0.
  """
  if prediction_type == 'epsilon':
    return (x_t - sigma * model_output) / alpha
  if prediction_type == 'v_prediction':
    return alpha * x_t - sigma * model_output
  if prediction_type == 'sample':
    return model_output
  raise ValueError(f'prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}')


def to_x0_eps(prediction_type, model_output, x_t, alpha_cumprod):
  """Converts a model output to (x0, eps) given x_t and a_t (broadcastable to x_t).

  Args:
    prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    model_output: the network's prediction.
    x_t: the noisy sample.
    alpha_cumprod: a_t.

  Returns:
    (predicted x0, predicted noise).
  """
  sa, sb = jnp.sqrt(alpha_cumprod), jnp.sqrt(1 - alpha_cumprod)
  x0 = to_x0(prediction_type, model_output, x_t, sa, sb)
  if prediction_type == 'epsilon':
    return x0, model_output
  if prediction_type == 'v_prediction':
    return x0, sa * model_output + sb * x_t
  return x0, (x_t - sa * model_output) / sb


def training_target(prediction_type, x0, noise, schedule, t):
  """What the network is trained to predict: the noise (eps), v, or x0."""
  if prediction_type == 'epsilon':
    return noise
  if prediction_type == 'v_prediction':
    return velocity(schedule, x0, noise, t)
  return x0


def spaced_timesteps(spacing, num_steps, num_train_timesteps=1000, steps_offset=0):
  """Inference timesteps, descending, as diffusers' DDIM/DDPM/Euler `set_timesteps` space them.

  Args:
    spacing: 'leading' (multiples of T // N, + steps_offset), 'trailing' (ending at T - 1) or
      'linspace' (round(linspace(0, T - 1, N))).
    num_steps: N.
    num_train_timesteps: T.
    steps_offset: added to 'leading' timesteps (SD: 1).

  Returns:
    (N,) int64 timesteps, highest first.
  """
  t = num_train_timesteps
  if spacing == 'linspace':
    return np.linspace(0, t - 1, num_steps).round()[::-1].astype(np.int64)
  if spacing == 'leading':
    return (np.arange(num_steps) * (t // num_steps)).round()[::-1].astype(np.int64) + steps_offset
  if spacing == 'trailing':
    return np.round(np.arange(t, 0, -t / num_steps)).astype(np.int64) - 1
  raise ValueError(f"timestep_spacing {spacing!r} is not one of 'leading', 'trailing', 'linspace'")
