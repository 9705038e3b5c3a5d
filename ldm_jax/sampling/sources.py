"""Where sampling's weights come from: a diffusers folder, an original single file, a training run.

Each source loads as `convert.Components`. A training workdir is only read (its saved config,
tokenizer and EMA parameters), through `ldm_jax.weights`, as training itself builds its
networks: nothing here imports training code.
"""

import dataclasses
import logging
import os

import jax.numpy as jnp

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


def resolve_model(init=None, config=None, workdir=None, dtype=None, tokenizer=None):
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
    return ModelSource(workdir, dtype, None, kind='workdir')
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
    return from_workdir(source.path, source.dtype)
  kw = dict(dtype=jnp.dtype(source.dtype), param_dtype=jnp.dtype(source.param_dtype))
  if source.kind == 'single_file':
    return convert.load_single_file(source.path, tokenizer=source.tokenizer, **kw)
  components = convert.load_diffusers(source.path, **kw)
  if source.tokenizer:
    components = components.replace(tokenizer=tokenizer_lib.load_tokenizer(source.tokenizer))
  return components


def from_workdir(workdir, dtype=None):
  """Sampling components from a training run's latest checkpoint (its EMA parameters).

  The networks are rebuilt from the config saved in the checkpoint, the frozen VAE (and frozen
  text encoder) taken from where training took them, so those sources must still exist. Only
  the EMA tree of the checkpoint is restored; the workdir is read, never written.

  Args:
    workdir: an ldm-stage training workdir.
    dtype: a compute dtype name overriding the run's `model.dtype`, or None.

  Returns:
    convert.Components.
  """
  config = weights.run_config(workdir)
  if config.stage != 'ldm':
    raise ValueError(f'{workdir} trained the {config.stage!r} stage; sampling needs an ldm run')
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
