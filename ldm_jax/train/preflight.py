"""Checks a training config before anything runs or is written: every problem at once, each with
its fix and the valid choices; relative paths are resolved so that the saved config still works
when the run is sampled or resumed from another directory.

`check` does no computation and writes nothing. It counts the devices, so it runs after
`distributed.initialize` (which must come before anything starts a JAX backend).
"""

import math
import os

import jax
import jax.numpy as jnp

from ldm_jax import checkpoint
from ldm_jax import config_check
from ldm_jax import sharding
from ldm_jax.data import pipeline
from ldm_jax.data import sources
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import schedules
from ldm_jax.models import attention
from ldm_jax.models import build
from ldm_jax.models import layers
from ldm_jax.train import stages

TOKENIZER_NAMES = ('shapes',)  # `config.tokenizer` values that are names, not folders
# The path-valued keys, resolved to absolute paths.
PATH_KEYS = ('data.data_dir', 'init', 'resume', 'vae_workdir', 'text_encoder.workdir',
             'tokenizer')
# Checked by _data_problems (`sources.check_name`): a shapes dataset is built there on demand.
_CHECKED_ELSEWHERE = ('data.data_dir',)
# Keys that name another run's workdir (or checkpoints folder): it must hold a checkpoint.
RUN_KEYS = {'resume': 'another run to take the state from',
            'vae_workdir': 'a vae-stage run (its EMA weights are the frozen VAE)',
            'text_encoder.workdir': 'a clip-stage run (its EMA text encoder is frozen)'}

# (key, 'int' or 'float', valid range, an example value): numbers every config has. The data
# group's are LoaderConfig's to check (`pipeline.LoaderConfig.problems`).
_AT_LEAST_1, _AT_LEAST_0, _POSITIVE = '>= 1', '>= 0', '> 0'
_NUMBERS = (
    ('num_steps', 'int', _AT_LEAST_1, 1000), ('log_every', 'int', _AT_LEAST_1, 50),
    ('ckpt_every', 'int', _AT_LEAST_1, 1000), ('sample_every', 'int', _AT_LEAST_0, 1000),
    ('keep_checkpoints', 'int', _AT_LEAST_1, 3),
    ('optim.lr', 'float', _POSITIVE, 1e-4), ('optim.warmup_steps', 'int', _AT_LEAST_0, 500),
    ('optim.grad_accum', 'int', _AT_LEAST_1, 1), ('optim.clip_norm', 'float', _AT_LEAST_0, 1.0),
    ('optim.weight_decay', 'float', _AT_LEAST_0, 1e-2), ('optim.eps', 'float', _POSITIVE, 1e-8),
    ('optim.b1', 'float', 'in [0, 1)', 0.9), ('optim.b2', 'float', 'in [0, 1)', 0.999),
    ('optim.final_lr_fraction', 'float', 'in [0, 1]', 0.0),
    ('ema.decay', 'float', 'in [0, 1]', 0.9999), ('ema.start_step', 'int', _AT_LEAST_0, 0),
    ('diffusion.min_snr_gamma', 'float', _AT_LEAST_0, 5.0),
    ('vae_loss.kl_weight', 'float', _AT_LEAST_0, 1e-6),
)
# Checked when previews are on (sample_every > 0). Guidance 0 or 1 turns CFG off (diffusers).
_PREVIEW_NUMBERS = (('sample.steps', 'int', _AT_LEAST_1, 25),
                    ('sample.guidance', 'float', _AT_LEAST_0, 4.0))
_IN_RANGE = {_AT_LEAST_1: lambda v: v >= 1, _AT_LEAST_0: lambda v: v >= 0,
             _POSITIVE: lambda v: v > 0, 'in [0, 1]': lambda v: 0 <= v <= 1,
             'in [0, 1)': lambda v: 0 <= v < 1}


class ConfigError(ValueError):
  """Everything wrong with a training config, each problem with its fix (`problems` lists them)."""

  def __init__(self, problems):
    self.problems = list(problems)
    if len(self.problems) == 1:
      message = f'bad training config: {self.problems[0]}'
    else:
      message = (f'bad training config ({len(self.problems)} problems):\n  - ' +
                 '\n  - '.join(self.problems))
    super().__init__(message)


def check(config, workdir, num_devices=None):
  """Checks the whole training config and the workdir; resolves the config's relative paths.

  Args:
    config: the experiment ConfigDict (locked or not); its paths (PATH_KEYS) are made absolute
      in place, so that the config the run saves works from any directory.
    workdir: where the run will write (created later, by the loop).
    num_devices: the devices the mesh spans (default: all of them, every host's).

  Returns:
    `config`, its paths resolved.

  Raises:
    ConfigError: listing every problem found, each with its fix.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  _resolve_paths(config)
  problems = (_stage_problems(config) + _number_problems(config) + _choice_problems(config)
              + _batch_problems(config, num_devices) + _mesh_problems(config, num_devices)
              + _path_problems(config, workdir) + _source_problems(config)
              + _data_problems(config) + _eval_problems(config))
  problem = config_check.folder_problem(workdir, '--workdir')
  if problem:
    problems.append(problem)
  if problems:
    raise ConfigError(problems)
  return config


def _get(config, key, default=None):
  """config['a.b'] by dotted key, or `default` where a group or key is missing."""
  node = config
  for part in key.split('.'):
    if not hasattr(node, 'get') or part not in node:
      return default
    node = node[part]
  return node


def _set(config, key, value):
  """Sets config['a.b'] (a locked ConfigDict takes new values for existing keys)."""
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = node[part]
  with config.unlocked():
    node[leaf] = value


def _is_path(key, value):
  """Whether the value of `key` is a local path (not '', a tokenizer name or a URL)."""
  return (isinstance(value, str) and bool(value) and not config_check.is_remote(value)
          and not (key == 'tokenizer' and value in TOKENIZER_NAMES))


def _resolve_paths(config):
  """Makes every local path of PATH_KEYS absolute (against the current directory)."""
  for key in PATH_KEYS:
    value = _get(config, key)
    if _is_path(key, value):
      _set(config, key, os.path.abspath(os.path.expanduser(value)))


def _stage_problems(config):
  stage = _get(config, 'stage')
  if stage in stages.STAGES:
    return []
  return [f'stage {stage!r} is not one of {", ".join(stages.STAGES)}: pick one with the config '
          'argument (configs/shapes.py:ldm) or --config.stage']


def _number_problems(config):
  rows = _NUMBERS + (_PREVIEW_NUMBERS if _get(config, 'sample_every', 0) else ())
  problems = []
  for key, kind, valid, example in rows:
    value = _get(config, key)
    if value is None:  # a config without the key: not ours to judge
      continue
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = (number and math.isfinite(value) and (kind == 'float' or float(value).is_integer())
          and _IN_RANGE[valid](value))
    if not ok:
      noun = 'an integer' if kind == 'int' else 'a number'
      problems.append(f'{key} is {value!r}; it must be {noun} {valid} '
                      f'(e.g. --config.{key}={example})')
  return problems


def _choice_problems(config):
  """Names that must be one of a known set (each listed with the valid ones)."""
  choices = [('model.preset', build.PRESETS), ('model.attention_impl', attention.IMPLS),
             ('optim.name', ('adamw',)), ('optim.schedule', ('constant', 'cosine')),
             ('diffusion.beta_schedule', schedules.BETA_SCHEDULES),
             ('diffusion.prediction_type', schedules.PREDICTION_TYPES),
             ('vae_loss.kind', ('l1', 'l2'))]
  if _get(config, 'sample_every', 0):  # previews sample with it
    choices.append(('sample.sampler', samplers.SAMPLERS))
  problems = [f'{key} is {_get(config, key)!r}; choose one of {", ".join(valid)}'
              for key, valid in choices
              if _get(config, key) is not None and _get(config, key) not in valid]
  for key in ('model.dtype', 'model.param_dtype'):
    try:
      jnp.dtype(_get(config, key, 'float32'))
    except TypeError:
      problems.append(f'{key} is {_get(config, key)!r}, not a dtype: float32, bfloat16 or '
                      'float16')
  try:
    layers.remat_policy(_get(config, 'model.remat', 'none'))
  except ValueError:
    problems.append(f'model.remat is {_get(config, "model.remat")!r}; choose one of '
                    f'{", ".join(layers.REMAT_POLICIES)}')
  return problems


def _batch_problems(config, num_devices):
  batch, accum = _get(config, 'data.batch_size'), _get(config, 'optim.grad_accum', 1)
  if not (isinstance(batch, int) and batch >= 1 and isinstance(accum, int) and accum >= 1):
    return []  # _number_problems says so
  problems = []
  if batch % num_devices:
    fit = max(num_devices, batch // num_devices * num_devices)
    problems.append(f'global batch {batch} (data.batch_size) is not divisible by {num_devices} '
                    f'devices: make it a multiple of {num_devices}, e.g. '
                    f'--config.data.batch_size={fit} or {fit + num_devices}')
  if batch % accum:
    problems.append(f'data.batch_size {batch} is not divisible by optim.grad_accum {accum} '
                    '(the batch is split into that many micro-batches): e.g. '
                    f'--config.optim.grad_accum={math.gcd(batch, accum)}')
  return problems


def _mesh_problems(config, num_devices):
  rules = list(_get(config, 'sharding.rules', []) or [])
  mesh = _get(config, 'mesh', (('data', -1),))
  names = tuple(dict.fromkeys(sharding.BATCH_AXES + sharding.rule_axes(rules)))
  problems = sharding.mesh_problems(mesh, num_devices, axis_names=names)
  if not problems:
    problems += sharding.rule_problems(rules, tuple(name for name, _ in mesh))
  return problems


def _path_problems(config, workdir):
  """Paths that do not exist, and run workdirs that hold no checkpoint."""
  problems = []
  # `resume` is read only by a run's first start: its own checkpoints win from then on.
  resuming_itself = checkpoint.latest_checkpoint_dir(workdir) is not None
  what = {'init': 'a diffusers folder holding model_index.json',
          'tokenizer': f'a tokenizer folder (python -m ldm_jax.tokenizer build-clip --out DIR), '
                       f'or one of {", ".join(TOKENIZER_NAMES)}, or empty for the init folder\'s',
          **RUN_KEYS}
  for key in PATH_KEYS:
    value = _get(config, key)
    if (not _is_path(key, value) or key in _CHECKED_ELSEWHERE
        or (key == 'resume' and resuming_itself)):
      continue
    if not os.path.exists(value):
      problems.append(f'{key} {value!r} does not exist: it must name {what[key]}')
    elif key in RUN_KEYS and checkpoint.latest_checkpoint_dir(value) is None:
      problems.append(f'{key} {value!r} holds no checkpoint: it must name {what[key]}; train that '
                      f'run first (python train.py --workdir {value} ...)')
  return problems


def _source_problems(config):
  """Weights and tokenizer the stage needs that the config names no source for."""
  problems = []
  init = _get(config, 'init')
  if not _get(config, 'tokenizer') and not init:
    problems.append("tokenizer is empty and there is no init to take one from: set "
                    "--config.tokenizer to a tokenizer folder (python -m ldm_jax.tokenizer "
                    "build-clip --out DIR) or 'shapes'")
  if _get(config, 'stage') == 'ldm' and not init:
    if not (_get(config, 'vae_workdir') or _get(config, 'allow_random_vae')):
      problems.append('the ldm stage needs a trained VAE: set --config.vae_workdir=<a vae-stage '
                      'workdir> or --config.init=<a diffusers folder>')
    if not (_get(config, 'text_encoder.trainable') or _get(config, 'text_encoder.workdir')):
      problems.append('a frozen text encoder needs weights: --config.init=<diffusers folder> or '
                      '--config.text_encoder.workdir=<a clip-stage workdir>, or train it jointly '
                      'with --config.text_encoder.trainable=True')
  if _get(config, 'precompute_latents') and jax.process_count() > 1:
    problems.append('precompute_latents encodes the data inside one process: encode it first '
                    'on all hosts with `python -m ldm_jax.data precompute --config <this config> '
                    '--out DATA_DIR --name NAME` (it prints the flags that train from the result: '
                    'data.precomputed=True), and set --config.precompute_latents=False')
  if _get(config, 'stage') != 'ldm' and _get(config, 'precompute_latents'):
    problems.append(f'precompute_latents is for the ldm stage, not {_get(config, "stage")!r}: '
                    'set --config.precompute_latents=False')
  return problems


def _eval_problems(config):
  """The `eval` group, when evaluations are on (its missing weights only warn, at the start)."""
  if not _get(config, 'eval.every', 0):
    return []
  from ldm_jax.train import evaluate  # pylint: disable=g-import-not-at-top
  problems = []
  for check in (evaluate.metric_names, lambda e: evaluate.parse_target(e.get('target', ''))):
    try:
      check(config.eval)
    except ValueError as e:
      problems.append(str(e))
  if _get(config, 'eval.sampler') not in samplers.SAMPLERS:
    problems.append(f'eval.sampler is {_get(config, "eval.sampler")!r}; choose one of '
                    f'{", ".join(samplers.SAMPLERS)}')
  prompts_file = _get(config, 'eval.prompts_file')
  if prompts_file and not os.path.isfile(prompts_file):
    problems.append(f'eval.prompts_file {prompts_file!r} does not exist: it must name a text '
                    'file of prompts, one per line (or be empty)')
  for key in ('eval.batch_size', 'eval.steps'):
    if not (isinstance(_get(config, key), int) and _get(config, key) >= 1):
      problems.append(f'{key} is {_get(config, key)!r}; it must be an integer >= 1')
  return problems


def _data_problems(config):
  """The data group's own checks (LoaderConfig) and whether its dataset is where it says."""
  problems = pipeline.LoaderConfig.problems(config.data)
  name, data_dir = _get(config, 'data.name'), _get(config, 'data.data_dir')
  named = isinstance(name, str) and not any(p.startswith('data.name=') for p in problems)
  if named and isinstance(data_dir, str) and not config_check.is_remote(data_dir):
    problem = sources.check_name(name, data_dir, jax.process_count(),
                                 image_key=_get(config, 'data.image_key', 'image'),
                                 caption_key=_get(config, 'data.caption_key', 'caption'))
    problems += [problem] if problem else []
  return problems
