"""Samplers as pure step functions over host-built float32 tables, and the jitted denoising loop.

Each sampler reproduces a PyTorch diffusers scheduler step for step (including the final step to
sigma 0), built from the model's scheduler config the way `Scheduler.from_config` would build it:

  ddpm -> DDPMScheduler               ddim -> DDIMScheduler (eta)      pndm -> PNDMScheduler (PLMS)
  dpmpp_2m[_karras] -> DPMSolverMultistepScheduler (dpmsolver++, order 2, midpoint)
  euler -> EulerDiscreteScheduler     euler_a -> EulerAncestralDiscreteScheduler

`REGISTRY` maps each sampler's name to its family's `Sampler`: the table builder `make_plan` calls
(every per-step coefficient, on the host, for a static number of steps) and the family's step.
`step(plan, state, i, model_output, noise, start) -> state` is a pure function that dispatches to
it; `denoise` runs the steps in one `lax.fori_loop`.
"""

import dataclasses
import typing

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import schedules

# Each diffusers class's own defaults for the options it reads: a scheduler config written for
# one class (SD 1.5 ships a PNDM config without `timestep_spacing`) means different things to
# another, exactly as `OtherScheduler.from_config(config)` does in diffusers.
_COMMON = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule='linear',
               trained_betas=None, prediction_type='epsilon', rescale_betas_zero_snr=False,
               steps_offset=0)
_CLASS_DEFAULTS = {
    'ddpm': dict(timestep_spacing='leading', clip_sample=True, clip_sample_range=1.0,
                 variance_type='fixed_small', thresholding=False),
    'ddim': dict(timestep_spacing='leading', clip_sample=True, clip_sample_range=1.0,
                 set_alpha_to_one=True, thresholding=False),
    'pndm': dict(timestep_spacing='leading', set_alpha_to_one=False),
    'dpmpp_2m': dict(timestep_spacing='linspace', use_karras_sigmas=False,
                     final_sigmas_type='zero', lower_order_final=True, euler_at_final=False,
                     thresholding=False),
    'euler': dict(timestep_spacing='linspace', use_karras_sigmas=False, final_sigmas_type='zero',
                  interpolation_type='linear', timestep_type='discrete'),
    'euler_a': dict(timestep_spacing='linspace'),
}
# Options we do not reproduce: any other value is refused by name.
_UNSUPPORTED = {'thresholding': False, 'variance_type': 'fixed_small',
                'interpolation_type': 'linear', 'timestep_type': 'discrete'}

_PLMS_WEIGHTS = np.array([[1, 0, 0, 0], [1 / 2, 1 / 2, 0, 0], [3 / 2, -1 / 2, 0, 0],
                          [23 / 12, -16 / 12, 5 / 12, 0], [55 / 24, -59 / 24, 37 / 24, -9 / 24]])


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
  """One sampler at one step count: everything `step` needs, as host float32 tables.

  Attributes:
    sampler: one of SAMPLERS.
    prediction_type: what the model predicts ('epsilon', 'v_prediction', 'sample').
    timesteps: (n,) float32, what the model is given at step i.
    input_scale: (n,) the factor applied to x before the model (Euler's 1/sqrt(sigma^2+1)).
    noise_scale: (n, 2) `add_noise` at step i: c0 * x0 + c1 * noise (img2img, inpainting).
    init_noise_sigma: the initial noise's standard deviation.
    tables: per-step coefficients of this sampler's update, indexed by step first.
    stochastic: whether `step` consumes fresh noise.
  """
  sampler: str
  prediction_type: str
  timesteps: np.ndarray
  input_scale: np.ndarray
  noise_scale: np.ndarray
  init_noise_sigma: float
  tables: dict
  stochastic: bool = False
  options: dict = dataclasses.field(default_factory=dict)

  @property
  def num_steps(self):
    return len(self.timesteps)


def scheduler_options(sampler, scheduler_config):
  """The options a diffusers scheduler class would read from `scheduler_config`."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; choose one of {", ".join(SAMPLERS)}')
  base = 'dpmpp_2m' if sampler.startswith('dpmpp_2m') else sampler
  opts = dict(_COMMON, **_CLASS_DEFAULTS[base])
  opts.update({k: v for k, v in scheduler_config.items() if k in opts})
  if sampler == 'dpmpp_2m_karras':
    opts['use_karras_sigmas'] = True
  bad = [f'{k}={opts[k]!r}' for k, ok in _UNSUPPORTED.items() if k in opts and opts[k] != ok]
  if bad:
    raise ValueError(f'scheduler config sets {", ".join(bad)}, which the {sampler} sampler does '
                     f'not reproduce; remove it from scheduler_config.json')
  return opts


def make_plan(sampler, scheduler_config, num_steps, *, eta=0.0):
  """Builds the tables of `sampler` for `num_steps` steps from a diffusers scheduler config.

  Args:
    sampler: one of SAMPLERS.
    scheduler_config: the model's scheduler_config.json as a dict.
    num_steps: number of inference steps N (PNDM runs N + 1 model calls, as diffusers does).
    eta: DDIM's noise level (0 is deterministic DDIM).

  Returns:
    Plan.
  """
  opts = scheduler_options(sampler, scheduler_config)
  schedule = schedules.ScheduleConfig.from_diffusers(opts)
  if not 1 <= num_steps <= schedule.num_train_timesteps:
    raise ValueError(f'steps must be in [1, {schedule.num_train_timesteps}], got {num_steps}')
  acp = schedules.alphas_cumprod(schedule).astype(np.float64)
  if opts['rescale_betas_zero_snr'] and sampler not in ('ddpm', 'ddim', 'pndm'):
    acp[-1] = 2.0 ** -24  # diffusers' sigma-space schedulers avoid an infinite sigma so
  plan = REGISTRY[sampler].build(sampler, opts, acp, num_steps, eta)
  return dataclasses.replace(plan, prediction_type=schedule.prediction_type,
                             options=dict(opts, eta=eta))


def _f32(tables):
  return {k: np.asarray(v, np.float32) for k, v in tables.items()}


def _alpha_plan(sampler, ts, acp, tables, stochastic=False):
  """Plan for the alpha-space samplers (DDPM, DDIM, PNDM): no input scaling, sigma 1."""
  a = acp[ts]
  return Plan(sampler, '', ts.astype(np.float32), np.ones(len(ts), np.float32),
              np.stack([np.sqrt(a), np.sqrt(1 - a)], -1).astype(np.float32), 1.0, _f32(tables),
              stochastic)


def _ddpm_plan(sampler, opts, acp, n, eta):
  del eta
  ts = schedules.spaced_timesteps(opts['timestep_spacing'], n, len(acp), opts['steps_offset'])
  prev = np.append(ts[1:], -1)  # diffusers: the next timestep in the list, -1 after the last
  a_t, a_prev = acp[ts], np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0)
  cur_alpha = a_t / a_prev
  cur_beta = 1 - cur_alpha
  variance = np.maximum((1 - a_prev) / (1 - a_t) * cur_beta, 1e-20)
  tables = dict(alpha=a_t, c_x0=np.sqrt(a_prev) * cur_beta / (1 - a_t),
                c_x=np.sqrt(cur_alpha) * (1 - a_prev) / (1 - a_t),
                std=np.where(ts > 0, np.sqrt(variance), 0.0))
  return _alpha_plan(sampler, ts, acp, tables, stochastic=True)


def _ddim_plan(sampler, opts, acp, n, eta):
  ts = schedules.spaced_timesteps(opts['timestep_spacing'], n, len(acp), opts['steps_offset'])
  prev = ts - len(acp) // n  # diffusers keeps the T // N offset for every spacing
  final = 1.0 if opts['set_alpha_to_one'] else acp[0]
  a_t, a_prev = acp[ts], np.where(prev >= 0, acp[np.maximum(prev, 0)], final)
  variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
  std = eta * np.sqrt(variance)
  tables = dict(alpha=a_t, sqrt_alpha_prev=np.sqrt(a_prev),
                c_eps=np.sqrt(np.maximum(1 - a_prev - std ** 2, 0)), std=std)
  return _alpha_plan(sampler, ts, acp, tables, stochastic=eta > 0)


def _pndm_plan(sampler, opts, acp, n, eta):
  """PLMS (PNDMScheduler with skip_prk_steps): N + 1 model calls, the second step repeated."""
  del eta
  ratio = len(acp) // n
  base = schedules.spaced_timesteps(opts['timestep_spacing'], n, len(acp), opts['steps_offset'])
  base = np.sort(base)  # PNDM keeps its own ascending list
  ts = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1].copy()
  final = 1.0 if opts['set_alpha_to_one'] else acp[0]
  alpha = lambda t: np.where(t >= 0, acp[np.clip(t, 0, None)], final)
  # Step c (counted from the first step run) goes from t to t - ratio, except c == 1, which
  # redoes the first interval from t + ratio to t with the averaged output.
  t_from = np.stack([ts, ts + ratio], -1)
  t_to = np.stack([ts - ratio, ts], -1)
  tables = dict(a_from=alpha(np.minimum(t_from, len(acp) - 1)), a_to=alpha(t_to))
  return _alpha_plan(sampler, ts, acp, tables)


def _sigma_to_t(sigma, log_sigmas):
  """diffusers' inverse of the sigma table: a fractional timestep by log-linear interpolation."""
  log_sigma = np.log(np.maximum(sigma, 1e-10))
  dists = log_sigma - log_sigmas[:, None]
  low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
  w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
  return (1 - w) * low + w * (low + 1)


def _karras(sigmas, n, rho=7.0):
  lo, hi = sigmas[-1] ** (1 / rho), sigmas[0] ** (1 / rho)
  return (hi + np.linspace(0, 1, n) * (lo - hi)) ** rho


def _sigma_timesteps(sampler, opts, acp, n):
  """(timesteps, sigmas + final sigma) for the sigma-space samplers, as diffusers builds them."""
  t_max = len(acp)
  all_sigmas = np.sqrt((1 - acp.astype(np.float32)) / acp.astype(np.float32))  # torch float32
  spacing = opts['timestep_spacing']
  if sampler.startswith('dpmpp'):
    # DPM-Solver spaces N + 1 points and drops the last (lambda_min_clipped = -inf).
    if spacing == 'linspace':
      ts = np.linspace(0, t_max - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == 'leading':
      ts = (np.arange(n + 1) * (t_max // (n + 1))).round()[::-1][:-1].astype(np.int64)
      ts = ts + opts['steps_offset']
    else:
      ts = schedules.spaced_timesteps(spacing, n, t_max)
  elif spacing == 'linspace':  # Euler keeps fractional timesteps
    ts = np.linspace(0, t_max - 1, n, dtype=np.float32)[::-1].copy()
  else:
    ts = schedules.spaced_timesteps(spacing, n, t_max, opts['steps_offset']).astype(np.float32)
  sig = np.interp(ts, np.arange(t_max), all_sigmas)
  if opts.get('use_karras_sigmas'):
    # DPM derives Karras sigmas from the full table, Euler from the interpolated ones.
    sig = _karras(all_sigmas[::-1] if sampler.startswith('dpmpp') else sig, n)
    ts = _sigma_to_t(sig, np.log(all_sigmas))
    if sampler.startswith('dpmpp') and opts['beta_schedule'] != 'squaredcos_cap_v2':
      ts = ts.round()
  last = all_sigmas[0] if opts.get('final_sigmas_type') == 'sigma_min' else 0.0
  sig = np.concatenate([sig, [last]]).astype(np.float32)
  if sampler.startswith('dpmpp'):
    ts = ts.astype(np.int64)
  return ts.astype(np.float32), sig.astype(np.float64)


def _dpm_plan(sampler, opts, acp, n, eta):
  del eta
  ts, sig = _sigma_timesteps(sampler, opts, acp, n)
  alpha = 1 / np.sqrt(sig ** 2 + 1)
  sigma = sig * alpha
  with np.errstate(divide='ignore'):
    lam = np.log(alpha) - np.log(sigma)  # +inf at sigma 0
  h = lam[1:] - lam[:-1]
  em1 = np.expm1(-h)  # exp(-h) - 1, exactly -1 when the target sigma is 0
  ratio = sigma[1:] / sigma[:-1]
  b = -alpha[1:] * em1
  r0 = np.ones(n)
  r0[1:] = (lam[1:-1] - lam[:-2]) / h[1:]
  first = np.zeros(n, bool)  # steps forced to first order, besides the first one run
  if opts['euler_at_final'] or (opts['lower_order_final'] and n < 15) or sig[-1] == 0:
    first[-1] = True
  with np.errstate(divide='ignore', invalid='ignore'):
    c_d1 = np.where(first, 0.0, 0.5 * b / r0)
  tables = dict(alpha_s=alpha[:-1], sigma_s=sigma[:-1], c_x=ratio, c_d0=b, c_d1=c_d1)
  return Plan(sampler, '', ts, np.ones(n, np.float32),
              np.stack([alpha[:-1], sigma[:-1]], -1).astype(np.float32), 1.0, _f32(tables))


def _euler_plan(sampler, opts, acp, n, eta):
  del eta
  ts, sig = _sigma_timesteps(sampler, opts, acp, n)
  sig32 = sig.astype(np.float32)
  max_sigma = float(sig32.max())
  init = max_sigma if opts['timestep_spacing'] in ('linspace', 'trailing') else (
      (max_sigma ** 2 + 1) ** 0.5)
  s, s_next = sig32[:-1].astype(np.float64), sig32[1:].astype(np.float64)
  # x0 in alpha/sigma form: the model sees alpha * x, with alpha^2 + (sigma * alpha)^2 = 1.
  tables = dict(sigma=s, sigma_next=s_next, alpha=1 / np.sqrt(s ** 2 + 1),
                vp_sigma=s / np.sqrt(s ** 2 + 1))
  if sampler == 'euler_a':
    up = np.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2)
    tables.update(sigma_next=np.sqrt(s_next ** 2 - up ** 2), sigma_up=up)
  return Plan(sampler, '', ts, (1 / np.sqrt(s ** 2 + 1)).astype(np.float32),
              np.stack([np.ones(n), s], -1).astype(np.float32), init, _f32(tables),
              stochastic=sampler == 'euler_a')


def initial_state(plan, x):
  """The sampler's state around the sample x: multistep history where the sampler keeps one."""
  x = x.astype(jnp.float32)
  return dict(REGISTRY[plan.sampler].history(x), x=x)


def step(plan, state, i, model_output, noise=None, start=0):
  """One sampler step from step index i to i + 1.

  Args:
    plan: the sampler's tables.
    state: from `initial_state` or the previous step; state['x'] is the current sample.
    i: step index (may be traced).
    model_output: the model's prediction for `plan.input_scale[i] * x` at `plan.timesteps[i]`.
    noise: standard normal noise shaped like x, for stochastic samplers.
    start: the first step index of this run (img2img starts late); multistep samplers restart
      their history there.

  Returns:
    The new state.
  """
  tab = {k: jnp.asarray(v)[i] for k, v in plan.tables.items()}
  return REGISTRY[plan.sampler].step(plan, tab, state, model_output.astype(jnp.float32), noise,
                                     i - start)


# Step functions: (plan, tables at step i, state, float32 model output, noise, c) -> state, where
# c = i - start counts the steps of this run.


def _ddpm_step(plan, tab, state, out, noise, c):
  del c
  x0, _ = schedules.to_x0_eps(plan.prediction_type, out, state['x'], tab['alpha'])
  x = tab['c_x0'] * _clip(plan, x0) + tab['c_x'] * state['x']
  if noise is not None:  # the last step (t = 0) adds none
    x = x + tab['std'] * noise
  return {'x': x}


def _ddim_step(plan, tab, state, out, noise, c):
  del c
  x0, eps = schedules.to_x0_eps(plan.prediction_type, out, state['x'], tab['alpha'])
  x = tab['sqrt_alpha_prev'] * _clip(plan, x0) + tab['c_eps'] * eps
  if plan.stochastic:
    x = x + tab['std'] * noise
  return {'x': x}


def _clip(plan, x0):
  if plan.options.get('clip_sample'):
    r = plan.options['clip_sample_range']
    return jnp.clip(x0, -r, r)
  return x0


def _pndm_step(plan, tab, state, out, noise, c):
  """PLMS: a linear multistep combination of the last four outputs (c == 1 redoes step 0)."""
  del noise
  case = jnp.where(c == 1, 1, 0)
  a_from, a_to = tab['a_from'][case], tab['a_to'][case]
  pushed = jnp.concatenate([state['ets'][1:], out[None]])
  w = jnp.asarray(_PLMS_WEIGHTS, jnp.float32)[jnp.minimum(c, 4)]
  combined = jnp.tensordot(w, pushed[::-1], axes=1)
  sample = jnp.where(c == 1, state['cur_sample'], state['x'])
  if plan.prediction_type == 'v_prediction':
    combined = jnp.sqrt(a_from) * combined + jnp.sqrt(1 - a_from) * sample
  denom = a_from * jnp.sqrt(1 - a_to) + jnp.sqrt(a_from * (1 - a_from) * a_to)
  x = jnp.sqrt(a_to / a_from) * sample - (a_to - a_from) * combined / denom
  return {'x': x,
          'ets': jnp.where(c == 1, state['ets'], pushed),  # the repeated step is not stored
          'cur_sample': jnp.where(c == 0, state['x'], state['cur_sample'])}


def _pndm_history(x):
  return {'ets': jnp.zeros((4,) + x.shape, x.dtype), 'cur_sample': jnp.zeros_like(x)}


def _dpm_step(plan, tab, state, out, noise, c):
  del noise
  x0 = schedules.to_x0(plan.prediction_type, out, state['x'], tab['alpha_s'], tab['sigma_s'])
  c_d1 = jnp.where(c == 0, 0.0, tab['c_d1'])  # the first step run is first order
  x = tab['c_x'] * state['x'] + tab['c_d0'] * x0 + c_d1 * (x0 - state['prev_x0'])
  return {'x': x, 'prev_x0': x0}


def _euler_step(plan, tab, state, out, noise, c):
  """Euler (ancestral): x0 from the model, then along the ODE direction to the next sigma."""
  del c
  x, sigma = state['x'], tab['sigma']
  x0 = schedules.to_x0(plan.prediction_type, out, tab['alpha'] * x, tab['alpha'], tab['vp_sigma'])
  x = x + (x - x0) / sigma * (tab['sigma_next'] - sigma)
  if plan.stochastic:
    x = x + noise * tab['sigma_up']
  return {'x': x}


@dataclasses.dataclass(frozen=True)
class Sampler:
  """One sampler family: its table builder, its step and the history its state keeps.

  Attributes:
    build: (name, options, alphas_cumprod, num_steps, eta) -> Plan.
    step: (plan, tables at step i, state, model output, noise, steps run so far) -> state.
    history: x -> the state's entries besides x (multistep samplers' history).
  """
  build: typing.Callable[..., Plan]
  step: typing.Callable[..., dict]
  history: typing.Callable[[jax.Array], dict] = lambda x: {}


_DPM = Sampler(_dpm_plan, _dpm_step, lambda x: {'prev_x0': jnp.zeros_like(x)})
_EULER = Sampler(_euler_plan, _euler_step)
REGISTRY = {
    'ddpm': Sampler(_ddpm_plan, _ddpm_step),
    'ddim': Sampler(_ddim_plan, _ddim_step),
    'pndm': Sampler(_pndm_plan, _pndm_step, _pndm_history),
    'dpmpp_2m': _DPM,
    'dpmpp_2m_karras': _DPM,
    'euler': _EULER,
    'euler_a': _EULER,
}
SAMPLERS = tuple(REGISTRY)


def add_noise(plan, x0, noise, i):
  """Forward-diffuses clean latents to the noise level of step i (img2img, inpainting)."""
  c = jnp.asarray(plan.noise_scale)[i]
  return c[0] * x0 + c[1] * noise


def denoise(plan, model_fn, x, key, start=0, post_step=None, progress=None, progress_args=(),
            end=None):
  """Runs steps start .. end-1 in one `lax.fori_loop` (call it inside jit).

  Args:
    plan: the sampler's tables.
    model_fn: (scaled x, timestep, i) -> model output.
    x: initial latents, already scaled by `plan.init_noise_sigma` (or noised by `add_noise`).
    key: PRNG key for stochastic samplers; step i uses `fold_in(key, i)`.
    start: first step index (may be traced).
    post_step: optional (x, i) -> x after each step (inpainting's latent blending).
    progress: optional host callback(i, n, *progress_args), called through `jax.debug.callback`
      after step i - 1 (on every device that holds part of the batch).
    progress_args: arrays passed on to `progress` (the pipeline's per-call token).
    end: the step index to stop before (may be traced; SDXL's denoising_end); default n.

  Returns:
    The final latents (float32).
  """
  timesteps, scale = jnp.asarray(plan.timesteps), jnp.asarray(plan.input_scale)

  def body(i, state):
    out = model_fn(state['x'] * scale[i], timesteps[i], i)
    noise = None
    if plan.stochastic:
      noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
    state = step(plan, state, i, out, noise, start)
    if post_step is not None:
      state['x'] = post_step(state['x'], i)
    if progress is not None:
      jax.debug.callback(progress, i + 1, plan.num_steps, *progress_args)
    return state

  end = plan.num_steps if end is None else end
  return jax.lax.fori_loop(start, end, body, initial_state(plan, x))['x']


def strength_start(plan, strength):
  """diffusers' img2img rule: the first step index for `strength` in (0, 1]."""
  n = plan.num_steps - 1 if plan.sampler == 'pndm' else plan.num_steps  # N, not PNDM's N + 1
  return max(n - min(int(n * strength), n), 0)



def _timestep_cutoff(plan, fraction):
  """diffusers' discrete timestep cutoff of denoising_start/end: the fraction of training time."""
  t_max = plan.options.get('num_train_timesteps', 1000)
  return int(round(t_max - fraction * t_max))


def denoising_end_index(plan, fraction, start=0):
  """diffusers' denoising_end: run steps start .. end-1, those at timesteps >= the cutoff.

  Args:
    plan: the sampler's tables.
    fraction: the fraction of the noise schedule to denoise, in (0, 1) (SDXL's base: 0.8).
    start: the first step run (img2img's).

  Returns:
    The step index to stop before.
  """
  cutoff = _timestep_cutoff(plan, fraction)
  return start + int(np.sum(np.asarray(plan.timesteps)[start:] >= cutoff))


def denoising_start_index(plan, fraction):
  """diffusers' denoising_start: the first step whose timestep is below the cutoff (the refiner
  takes over from a base run with denoising_end=fraction); strength plays no part."""
  cutoff = _timestep_cutoff(plan, fraction)
  # diffusers adds one step for second-order schedulers (Heun, KDPM2): none of ours is.
  return plan.num_steps - int(np.sum(np.asarray(plan.timesteps) < cutoff))


def step_range(plan, strength=None, denoising_start=None, denoising_end=None):
  """The steps one run takes, [start, end), by diffusers' img2img and SDXL rules.

  Args:
    plan: the sampler's tables.
    strength: img2img/inpainting strength (None: txt2img, from the first step).
    denoising_start: start where the timesteps fall below this fraction (strength is ignored).
    denoising_end: stop where they fall below this fraction.

  Returns:
    (start, end) step indices.

  Raises:
    ValueError: no step would run, naming the argument to change.
  """
  steps = plan.num_steps - 1 if plan.sampler == 'pndm' else plan.num_steps
  if denoising_start is not None:
    start = denoising_start_index(plan, denoising_start)
    fix = (f'denoising_start {denoising_start} with {steps} steps runs no step; lower it or '
           'raise steps')
  else:
    start = 0 if strength is None else strength_start(plan, strength)
    fix = f'strength {strength} with {steps} steps runs no step; raise either'
  if start >= plan.num_steps:
    raise ValueError(fix)
  end = plan.num_steps
  if denoising_end is not None:
    end = denoising_end_index(plan, denoising_end, start)
    if end <= start:
      raise ValueError(f'denoising_end {denoising_end} with {steps} steps runs no step; raise '
                       'either')
  return start, end
