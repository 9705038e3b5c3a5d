"""Where sampling's weights come from: a diffusers folder, an original single file, a training run.

Each source loads as `convert.Components`. A training workdir is only read (its saved config,
tokenizer and EMA parameters), through `ldm_jax.weights`, as training itself builds its
networks: nothing here imports training code.
"""

import dataclasses
import logging
import os

import jax.numpy as jnp

from ldm_jax import checkpoint
from ldm_jax import convert
from ldm_jax import tokenizer as tokenizer_lib
from ldm_jax import weights

SINGLE_FILE_SUFFIXES = ('.safetensors', '.ckpt')


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where the weights come from and the dtypes to load them in."""
  path: str
  dtype: str | None  # None (a workdir only): the run's own
  param_dtype: str | None
  kind: str = 'diffusers'  # 'single_file' (.safetensors / .ckpt) or 'workdir' (its EMA weights)
  tokenizer: str | None = None  # a tokenizer folder replacing the source's (a single file has none)
  vae_workdir: str | None = None  # a workdir only: replaces the vae_workdir its config names


def resolve_model(init=None, config=None, workdir=None, dtype=None, tokenizer=None,
                  vae_workdir=None):
  """Picks the weights to sample from: --workdir, or --init, else config.init.

  Args:
    init: a diffusers folder or an original single file (.safetensors / .ckpt); wins over
      `config.init`.
    config: an experiment ConfigDict or None; its `init`, `tokenizer` (for a single file) and
      `model.dtype/param_dtype` are used.
    workdir: a training workdir (an ldm-stage run); its latest checkpoint's EMA weights.
    dtype: compute dtype name overriding the config's (default: config's, else float32; for a
      workdir, the run's).
    tokenizer: a tokenizer folder (--tokenizer): needed by a single file, which holds none.
    vae_workdir: with `workdir`, the vae-stage run to take the VAE from instead of the one the
      run's config names (a run moved or copied away from it).

  Returns:
    ModelSource.
  """
  _check_dtype(dtype)
  if workdir:
    if init:
      raise ValueError('give either --workdir (a training run) or --init (a diffusers folder)')
    if not os.path.isdir(workdir):
      raise ValueError(f'training workdir {workdir!r} does not exist')
    if tokenizer:
      raise ValueError('--tokenizer does not go with --workdir: a run samples with the tokenizer '
                       'it trained with')
    if vae_workdir and not os.path.isdir(vae_workdir):
      raise ValueError(f'--vae_workdir {vae_workdir!r} does not exist: it names the vae-stage '
                       'run the sampled run trained with')
    return ModelSource(workdir, dtype, None, kind='workdir', vae_workdir=vae_workdir)
  if vae_workdir:
    raise ValueError('--vae_workdir goes with --workdir: it replaces the VAE of a training run')
  path = init or (config.get('init') if config is not None else None)
  if not path:
    raise ValueError('nothing to sample from: pass --init DIR (a diffusers folder with '
                     'model_index.json, or a .safetensors / .ckpt file) or a --config whose '
                     '`init` names one')
  model = config.get('model') if config is not None else None
  dtype = dtype or (model.dtype if model else 'float32')
  param_dtype = model.param_dtype if model else dtype
  if os.path.isfile(path):
    return _single_file(path, dtype, param_dtype, tokenizer or _config_tokenizer(config))
  if not os.path.isdir(path):
    raise ValueError(f'model folder {path!r} does not exist: --init (or config.init) must name '
                     'a diffusers folder holding model_index.json, unet/, vae/, ... (or an '
                     'original .safetensors / .ckpt file)')
  _check_tokenizer(tokenizer)
  return ModelSource(path, dtype, param_dtype, tokenizer=tokenizer)


def _check_dtype(dtype):
  """Raises ValueError when `dtype` is given but names no dtype."""
  try:
    if dtype:
      jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f'--dtype {dtype!r} is not a dtype: try float32, bfloat16 or float16') from e


def _config_tokenizer(config):
  """The tokenizer folder a config names, if any ('shapes' is no folder)."""
  name = config.get('tokenizer') if config is not None else None
  return name if name and name != 'shapes' else None


def _check_tokenizer(tokenizer):
  """Raises ValueError when `tokenizer` is given but is no folder."""
  if tokenizer and not os.path.isdir(tokenizer):
    raise ValueError(f'tokenizer folder {tokenizer!r} does not exist: --tokenizer names a '
                     'folder such as a diffusers model\'s tokenizer/')


def _single_file(path, dtype, param_dtype, tokenizer):
  """The ModelSource of an original single-file checkpoint."""
  if not path.endswith(SINGLE_FILE_SUFFIXES):
    raise ValueError(f'{path!r} is a file but not an original checkpoint (.safetensors or '
                     '.ckpt); a diffusers model is a folder holding model_index.json')
  if not tokenizer:
    raise ValueError(f'{path!r} holds no tokenizer: pass --tokenizer DIR (e.g. a diffusers '
                     'model\'s tokenizer/ folder) or a --config whose `tokenizer` names one')
  _check_tokenizer(tokenizer)
  return ModelSource(path, dtype, param_dtype, kind='single_file', tokenizer=tokenizer)


def load(source):
  """The Components of `source` (a ModelSource).

  Raises:
    ValueError: weights that do not convert (`convert.ConversionError`, ...), a workdir that
      is no ldm run.
    FileNotFoundError: a workdir without a checkpoint.
  """
  logging.info('loading %s (%s; compute %s, params %s)', source.path, source.kind,
               source.dtype or "the run's", source.param_dtype or "the run's")
  if source.kind == 'workdir':
    return from_workdir(source.path, source.dtype, source.vae_workdir)
  kw = dict(dtype=jnp.dtype(source.dtype), param_dtype=jnp.dtype(source.param_dtype))
  if source.kind == 'single_file':
    return convert.load_single_file(source.path, tokenizer=source.tokenizer, **kw)
  components = convert.load_diffusers(source.path, **kw)
  if source.tokenizer:
    components = components.replace(tokenizer=tokenizer_lib.load_tokenizer(source.tokenizer))
  return components


def from_workdir(workdir, dtype=None, vae_workdir=None):
  """Sampling components from a training run's latest checkpoint (its EMA parameters).

  The networks are rebuilt from the config saved in the checkpoint, the frozen VAE (and frozen
  text encoder) taken from where training took them, so those sources must still exist. Only
  the EMA tree of the checkpoint is restored; the workdir is read, never written.

  Args:
    workdir: an ldm-stage training workdir.
    dtype: a compute dtype name overriding the run's `model.dtype`, or None.
    vae_workdir: a vae-stage run replacing the run's `vae_workdir`, or None.

  Returns:
    convert.Components.

  Raises:
    ValueError: a run of another stage, or one whose VAE or text encoder source is gone.
    FileNotFoundError: a workdir without a checkpoint.
  """
  config = _run_config(workdir)
  if vae_workdir:
    with config.unlocked():
      config.vae_workdir = os.path.abspath(vae_workdir)
  _check_run_sources(config)
  tok = weights.run_tokenizer(workdir, config)
  weights.fill_vocab_size(config, tok)
  if dtype:
    with config.unlocked():
      config.model.dtype = dtype
  train_text = bool(config.text_encoder.trainable)
  nets = weights.ldm_weights(config, train_text)
  ema = weights.run_ema_params(workdir)
  text = ema['text_encoder'] if train_text else nets.frozen['text_encoder']
  return convert.Components(
      unet=(nets.unet, ema['unet']), vae=(nets.vae, nets.frozen['vae']),
      text_encoder=(nets.text_encoder, text), tokenizer=tok,
      scheduler_config=nets.scheduler_config)


# What to do with a run of another stage than ldm.
_OTHER_STAGES = {
    'vae': ('its reconstructions are in {w}/samples; to sample images, train an ldm stage on its '
            'latents: python train.py --config configs/shapes.py:ldm --config.vae_workdir={w} '
            '--workdir ...'),
    'clip': ('its text encoder serves an ldm run: python train.py --config configs/shapes.py:ldm '
             '--config.text_encoder.trainable=False --config.text_encoder.workdir={w} '
             '--workdir ...'),
}


def _run_config(workdir):
  """The saved config of an ldm-stage run; refuses other stages and workdirs with no checkpoint."""
  try:
    config = weights.run_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'training workdir {workdir!r} holds no checkpoint (no saved step under '
        f'{os.path.join(workdir, "checkpoints")}): sample a run that has saved one (every '
        'ckpt_every steps, and at its end), or train there first') from e
  if config.stage != 'ldm':
    hint = _OTHER_STAGES.get(config.stage, 'pass the workdir of an ldm-stage run')
    raise ValueError(f'{workdir} trained the {config.stage!r} stage; sampling needs an ldm run '
                     f'(sample.py samples ldm runs): {hint.format(w=workdir)}')
  return config


def _check_run_sources(config):
  """Raises ValueError when the weights a run took from elsewhere (its `init` folder, VAE run,
  frozen text encoder run) are no longer where its saved config says."""
  if config.init:
    origins = [('init', config.init, 'networks come', os.path.exists, 'does not exist',
                'put the diffusers folder back there')]
  else:
    origins = [('vae_workdir', config.vae_workdir, 'VAE comes', _has_checkpoint,
                'holds no checkpoint', 'pass --vae_workdir=<the vae-stage run it trained with>')]
    if not config.text_encoder.trainable:
      origins.append(('text_encoder.workdir', config.text_encoder.workdir,
                      'frozen text encoder comes', _has_checkpoint, 'holds no checkpoint',
                      'put the clip-stage run back there'))
  problems = []
  for key, stored, what, ok, missing, fix in origins:
    if not stored or ok(stored):
      continue
    where = (f'{stored!r} (resolved against the current directory to '
             f'{os.path.abspath(stored)!r})' if not os.path.isabs(stored) else repr(stored))
    problems.append(f'the run\'s {what} from its {key} {where}, which {missing}: the run was '
                    f'perhaps moved or copied; {fix}')
  if problems:
    raise ValueError('; '.join(problems))


def _has_checkpoint(path):
  return checkpoint.latest_checkpoint_dir(path) is not None
