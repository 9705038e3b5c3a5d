"""Samplers against PyTorch diffusers' schedulers: same fake denoiser, same injected noise.

Tolerance: the final sample within 1e-5 of diffusers relative to its scale (max |diff| / max |ref|).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import torch_reference as tr
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import schedules

torch = tr.torch
RTOL = 1e-5
SD_CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                 num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                 set_alpha_to_one=False, skip_prk_steps=True)
CLASSES = {'ddpm': 'DDPMScheduler', 'ddim': 'DDIMScheduler', 'pndm': 'PNDMScheduler',
           'dpmpp_2m': 'DPMSolverMultistepScheduler', 'dpmpp_2m_karras': 'DPMSolverMultistepScheduler',
           'euler': 'EulerDiscreteScheduler', 'euler_a': 'EulerAncestralDiscreteScheduler'}
SHAPE = (2, 4, 4, 3)


def fake_denoiser(x, t):
  """A fixed, smooth stand-in for the U-Net (numpy, float32): output depends on x and t."""
  x = np.asarray(x, np.float32)
  return (0.6 * np.tanh(x) + 0.2 * np.sin(np.float32(t) / 97.0 + x)).astype(np.float32)


def _reference(name, config, steps, start, eta, x_init):
  cls = getattr(tr.diffusers, CLASSES[name])
  sched = cls.from_config(config | ({'use_karras_sigmas': True} if 'karras' in name else {}))
  sched.set_timesteps(steps)
  if start and hasattr(sched, 'set_begin_index'):
    sched.set_begin_index(start)
  g = torch.Generator().manual_seed(0)
  x = torch.from_numpy(np.transpose(x_init, (0, 3, 1, 2))) * sched.init_noise_sigma
  kw = {'eta': eta} if name == 'ddim' else {} if name == 'pndm' else {'generator': g}
  for t in sched.timesteps[start:]:
    xin = sched.scale_model_input(x, t).numpy()
    out = torch.from_numpy(fake_denoiser(xin, float(t)))
    if name == 'ddim' and eta > 0:
      kw['variance_noise'] = torch.randn(x.shape, generator=g)
    x = sched.step(out, t, x, **kw).prev_sample
  return sched.timesteps.numpy(), np.transpose(x.numpy(), (0, 2, 3, 1))


def _ours(name, config, steps, start, eta, x_init):
  plan = samplers.make_plan(name, config, steps, eta=eta)
  g = torch.Generator().manual_seed(0)  # replays the reference's draws, in its order
  state = samplers.initial_state(plan, jnp.asarray(x_init) * plan.init_noise_sigma)
  nchw = (SHAPE[0], SHAPE[3], SHAPE[1], SHAPE[2])
  for i in range(start, plan.num_steps):
    xin = state['x'] * plan.input_scale[i]
    out = jnp.asarray(fake_denoiser(np.transpose(xin, (0, 3, 1, 2)), plan.timesteps[i]))
    noise = None
    draws = (name == 'euler_a' or (name == 'ddpm' and plan.timesteps[i] > 0)
             or (name == 'ddim' and eta > 0))
    if draws:
      noise = jnp.asarray(np.transpose(torch.randn(nchw, generator=g).numpy(), (0, 2, 3, 1)))
    state = samplers.step(plan, state, i, jnp.transpose(out, (0, 2, 3, 1)), noise, start)
  return plan.timesteps, np.asarray(state['x'])


CASES = [(name, spacing, pred) for name in samplers.SAMPLERS
         for spacing in ('leading', 'trailing', 'linspace')
         for pred in ('epsilon', 'v_prediction')]


@pytest.mark.parametrize('name, spacing, pred', CASES)
def test_sampler_matches_diffusers(name, spacing, pred):
  config = SD_CONFIG | {'timestep_spacing': spacing, 'prediction_type': pred}
  x_init = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
  ref_ts, ref = _reference(name, config, 10, 0, 0.0, x_init)
  ts, ours = _ours(name, config, 10, 0, 0.0, x_init)
  np.testing.assert_allclose(ts, ref_ts.astype(np.float32), rtol=1e-6)
  assert tr.rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize('name, steps, start, eta', [
    ('ddim', 10, 0, 0.7),  # eta > 0: DDIM with injected variance noise
    ('dpmpp_2m', 25, 0, 0.0),  # >= 15 steps: second order up to the final step
    ('dpmpp_2m_karras', 25, 0, 0.0),
    ('dpmpp_2m', 10, 3, 0.0),  # img2img: the multistep history restarts at `start`
    ('pndm', 10, 4, 0.0),
    ('euler_a', 10, 2, 0.0),
])
def test_sampler_options_match_diffusers(name, steps, start, eta):
  x_init = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
  _, ref = _reference(name, SD_CONFIG, steps, start, eta, x_init)
  _, ours = _ours(name, SD_CONFIG, steps, start, eta, x_init)
  assert tr.rel_err(ours, ref) <= RTOL


@pytest.mark.parametrize('name', ['pndm', 'dpmpp_2m', 'euler_a'])
def test_jitted_loop_equals_stepping(name):
  plan = samplers.make_plan(name, SD_CONFIG, 8)
  x = jax.random.normal(jax.random.key(0), SHAPE)
  key = jax.random.key(1)
  model = lambda x, t, i: 0.6 * jnp.tanh(x) + 0.2 * jnp.sin(t / 97.0 + x)
  looped = jax.jit(lambda x: samplers.denoise(plan, model, x, key))(x)
  state = samplers.initial_state(plan, x)
  for i in range(plan.num_steps):
    out = model(state['x'] * plan.input_scale[i], plan.timesteps[i], i)
    noise = jax.random.normal(jax.random.fold_in(key, i), SHAPE) if plan.stochastic else None
    state = samplers.step(plan, state, i, out, noise)
  np.testing.assert_allclose(looped, state['x'], rtol=1e-5, atol=1e-6)


def test_schedule_tables_match_diffusers():
  for beta_schedule in schedules.BETA_SCHEDULES:
    for zero_snr in (False, True):
      config = schedules.ScheduleConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
      ref = tr.diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                       beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr)
      np.testing.assert_allclose(schedules.alphas_cumprod(config), ref.alphas_cumprod.numpy(),
                                 rtol=2e-6, atol=1e-7)
  sd = schedules.alphas_cumprod(schedules.ScheduleConfig())
  assert abs(sd[0] - 0.999150) < 1e-6 and abs(sd[-1] - 0.004660) < 1e-6


def test_spacings():
  assert list(schedules.spaced_timesteps('leading', 50, steps_offset=1)[[0, 1, -1]]) == [981, 961, 1]
  assert list(schedules.spaced_timesteps('trailing', 50)[[0, 1, -1]]) == [999, 979, 19]
  assert list(schedules.spaced_timesteps('linspace', 50)[[0, 1, 2, -1]]) == [999, 979, 958, 0]


def test_prediction_conversions_invert_each_other():
  sched = schedules.Schedule.create(schedules.ScheduleConfig())
  key1, key2 = jax.random.split(jax.random.key(0))
  x0, noise = jax.random.normal(key1, (3, 4)), jax.random.normal(key2, (3, 4))
  t = jnp.array([0, 500, 999])
  x_t = schedules.q_sample(sched, x0, noise, t)
  a = sched.alphas_cumprod[t][:, None]
  for pred, target in (('epsilon', noise), ('v_prediction', schedules.velocity(sched, x0, noise, t)),
                       ('sample', x0)):
    got_x0, got_eps = schedules.to_x0_eps(pred, target, x_t, a)
    np.testing.assert_allclose(got_x0, x0, rtol=1e-3, atol=2e-4)
    np.testing.assert_allclose(got_eps, noise, rtol=1e-3, atol=2e-4)


def test_registry_order_and_x0_in_sigma_space():
  assert samplers.SAMPLERS == ('ddpm', 'ddim', 'pndm', 'dpmpp_2m', 'dpmpp_2m_karras', 'euler',
                               'euler_a')
  # The sigma-space form diffusers' Euler writes, against the shared alpha/sigma conversion.
  key1, key2 = jax.random.split(jax.random.key(0))
  x, out = jax.random.normal(key1, (3, 4)), jax.random.normal(key2, (3, 4))
  s = jnp.array([0.1, 1.0, 14.6])[:, None]
  alpha = 1 / jnp.sqrt(s ** 2 + 1)
  for pred, expected in (('epsilon', x - s * out),
                         ('v_prediction', out * (-s / jnp.sqrt(s ** 2 + 1)) + x / (s ** 2 + 1)),
                         ('sample', out)):
    got = schedules.to_x0(pred, out, alpha * x, alpha, s * alpha)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_bad_sampler_and_unsupported_options():
  with pytest.raises(ValueError, match='unknown sampler .lms.; choose one of ddpm, ddim'):
    samplers.make_plan('lms', SD_CONFIG, 10)
  with pytest.raises(ValueError, match='thresholding=True'):
    samplers.make_plan('ddim', SD_CONFIG | {'thresholding': True}, 10)
