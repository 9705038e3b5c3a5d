"""diffusers Stable Diffusion folders in and out: safetensors only, no torch."""

import dataclasses
import glob
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from ldm_jax.convert import tables
from ldm_jax.models import build
from ldm_jax.models import config_io
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib

COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')
XL_COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'text_encoder_2', 'tokenizer_2',
                 'scheduler')
# model_index.json settings of the SDXL pipelines that we honour, with diffusers' defaults.
XL_OPTIONS = {'force_zeros_for_empty_prompt': True, 'requires_aesthetics_score': False}
_WEIGHTS_NAME = {'unet': 'diffusion_pytorch_model', 'vae': 'diffusion_pytorch_model',
                 'text_encoder': 'model', 'text_encoder_2': 'model'}
# Old diffusers VAEs (and the removed Flax VAE) name the mid-block attention projections so.
_VAE_ALIASES = {'.query.': '.to_q.', '.key.': '.to_k.', '.value.': '.to_v.',
                '.proj_attn.': '.to_out.0.'}
_DIFFUSERS_VERSION = '0.42.1'  # written into the configs we export


class ConversionError(ValueError):
  """A folder or file that cannot be loaded, with what to do about it."""


@dataclasses.dataclass
class Components:
  """A Stable Diffusion model: each network is a `(module, params)` pair.

  SDXL adds `text_encoder_2` (a CLIPTextModel with `with_projection`) and `tokenizer_2`; the SDXL
  refiner has only those (`text_encoder` and `tokenizer` None). `options` holds the
  model_index.json pipeline settings we honour: 'force_zeros_for_empty_prompt' and
  'requires_aesthetics_score' (SDXL; absent for SD 1/2).
  """
  unet: tuple
  vae: tuple
  text_encoder: tuple | None
  tokenizer: Any  # a transformers CLIPTokenizer, or None
  scheduler_config: dict
  text_encoder_2: tuple | None = None
  tokenizer_2: Any = None
  options: dict = dataclasses.field(default_factory=dict)

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)


def load_diffusers(path, dtype=jnp.float32, param_dtype=None, variant=None):
  """Loads a diffusers Stable Diffusion folder: SD 1.x/2.x, SDXL and the SDXL refiner.

  model_index.json says which components the folder has: SDXL adds text_encoder_2/ and
  tokenizer_2/, and the SDXL refiner has no text_encoder/ or tokenizer/ (`[null, null]` there).

  Args:
    path: the folder holding model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/
      (and text_encoder_2/, tokenizer_2/ for SDXL).
    dtype: compute dtype of the networks.
    param_dtype: storage dtype of the parameters (default: `dtype`).
    variant: a weights variant such as 'fp16' (`diffusion_pytorch_model.fp16.safetensors`).

  Returns:
    Components; for SDXL with `options` (force_zeros_for_empty_prompt,
    requires_aesthetics_score) as model_index.json says, else as diffusers defaults them.

  Raises:
    ConversionError: a missing component or weights file, or weights in pickle (.bin) form.
    tables.WeightsMismatchError: weights that do not fit their config, listing every key.
  """
  if not os.path.isfile(os.path.join(path, 'model_index.json')):
    raise ConversionError(f'{path} is not a diffusers pipeline folder: no model_index.json. '
                          'Pass the folder that holds model_index.json, unet/, vae/, ...')
  index = config_io.read_json(os.path.join(path, 'model_index.json'))
  xl = is_xl_index(index)
  expected = _expected_components(index) if xl else COMPONENTS
  absent = [c for c in expected if not os.path.isdir(os.path.join(path, c))]
  if absent:
    kind = 'an SDXL' if xl else 'a Stable Diffusion'
    listed = sorted(k for k in index if not k.startswith('_'))
    raise ConversionError(f'{path} is missing {", ".join(c + "/" for c in absent)}: {kind} '
                          f'folder needs {", ".join(expected)} (model_index.json lists {listed})')
  kw = dict(dtype=dtype, param_dtype=param_dtype, variant=variant)
  sub = lambda name: os.path.join(path, name)
  has = lambda name: name in expected
  return Components(
      unet=load_unet(sub('unet'), **kw),
      vae=load_vae(sub('vae'), **kw),
      text_encoder=load_text_encoder(sub('text_encoder'), **kw) if has('text_encoder') else None,
      tokenizer=load_tokenizer(sub('tokenizer')) if has('tokenizer') else None,
      scheduler_config=load_scheduler_config(sub('scheduler')),
      text_encoder_2=(load_text_encoder(sub('text_encoder_2'), **kw)
                      if has('text_encoder_2') else None),
      tokenizer_2=load_tokenizer(sub('tokenizer_2')) if has('tokenizer_2') else None,
      options=xl_options(index) if xl else {})


def is_xl_index(index):
  """Whether a model_index.json (dict) is an SDXL pipeline's: it names a text_encoder_2."""
  return 'text_encoder_2' in index or 'XL' in index.get('_class_name', '')


def _expected_components(index):
  """The SDXL components model_index.json names (a `[null, null]` entry is an absent one)."""
  return tuple(c for c in XL_COMPONENTS
               if not (isinstance(index.get(c), list) and index[c][:1] == [None]))


def xl_options(index):
  """The SDXL pipeline settings of a model_index.json, with diffusers' defaults."""
  return {name: bool(index.get(name, default)) for name, default in XL_OPTIONS.items()}


def load_unet(folder, dtype=jnp.float32, param_dtype=None, variant=None):
  """A diffusers `unet/` folder -> (UNet2DConditionModel, params)."""
  config = unet_lib.UNetConfig.from_diffusers(
      _read_config(folder), dtype=dtype, param_dtype=param_dtype or dtype)
  module = unet_lib.UNet2DConditionModel(config)
  return module, _load_params(module, read_weights(folder, 'unet', variant), 'unet')


def load_vae(folder, dtype=jnp.float32, param_dtype=None, variant=None):
  """A diffusers `vae/` folder -> (AutoencoderKL, params); both attention namings accepted."""
  config = vae_lib.VAEConfig.from_diffusers(
      _read_config(folder), dtype=dtype, param_dtype=param_dtype or dtype)
  module = vae_lib.AutoencoderKL(config)
  state = {}
  for key, value in read_weights(folder, 'vae', variant).items():
    for old, new in _VAE_ALIASES.items():
      key = key.replace(old, new) if '.attentions.' in key else key
    state[key] = value
  return module, _load_params(module, state, 'vae')


def load_text_encoder(folder, dtype=jnp.float32, param_dtype=None, variant=None):
  """A transformers `text_encoder/` folder -> (CLIPTextModel, params).

  Accepts keys with the `text_model.` prefix (transformers 4) or without (transformers 5).
  """
  config = text_encoder_lib.TextEncoderConfig.from_transformers(
      _read_config(folder), dtype=dtype, param_dtype=param_dtype or dtype)
  module = text_encoder_lib.CLIPTextModel(config)
  state = {}
  for key, value in read_weights(folder, 'text_encoder', variant).items():
    key = key.removeprefix('text_model.')
    if not key.endswith('position_ids'):  # a buffer some files carry, not a parameter
      state[key] = value
  name = os.path.basename(os.path.normpath(folder))  # for messages: text_encoder_2 in SDXL
  return module, _load_params(module, state, name if name.startswith('text_encoder') else
                              'text_encoder')


def load_tokenizer(folder):
  """The tokenizer folder through transformers (loaded from disk only, never from a hub)."""
  import transformers  # pylint: disable=g-import-not-at-top  (slow import, only when needed)
  return transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def load_scheduler_config(folder):
  return _read_config(folder, 'scheduler_config.json')


def _read_config(folder, name='config.json'):
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise ConversionError(f'{path} is missing: every component folder needs its {name}')
  return config_io.read_json(path)


def _load_params(module, state, name):
  abstract = build.abstract_params(module)
  params = tables.to_flax(state, abstract, name=name)
  return jax.tree.map(jnp.asarray, params)


def read_weights(folder, component, variant=None):
  """All tensors of a component folder: one safetensors file or a sharded index.

  Returns:
    {key: numpy array}.
  """
  base = os.path.join(folder, _WEIGHTS_NAME[component])
  suffix = f'.{variant}' if variant else ''
  single = f'{base}{suffix}.safetensors'
  index = next((p for p in (f'{base}.safetensors.index{suffix}.json',
                            f'{base}{suffix}.safetensors.index.json') if os.path.isfile(p)), None)
  if os.path.isfile(single):
    return _read_safetensors(single)
  if index:
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    state = {}
    for shard in shards:
      state.update(_read_safetensors(os.path.join(folder, shard)))
    return state
  pickles = glob.glob(os.path.join(folder, '*.bin')) + glob.glob(os.path.join(folder, '*.ckpt'))
  if pickles:
    raise ConversionError(
        f'{folder} holds only PyTorch pickle weights ({os.path.basename(pickles[0])}); ldm_jax '
        'reads safetensors and never unpickles. Download the .safetensors files of the model, or '
        'convert once where torch is installed: `Model.from_pretrained(dir).save_pretrained(dir, '
        'safe_serialization=True)`.')
  raise ConversionError(f'{folder} has no weights: expected {os.path.basename(single)} or a '
                        f'sharded {os.path.basename(base)}.safetensors.index.json')


def _read_safetensors(path):
  try:
    return st_numpy.load_file(path)
  except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
    raise ConversionError(f'{path} is not a readable safetensors file ({e}); re-download it') from e


def save_diffusers(components, path):
  """Writes a diffusers folder that diffusers' and transformers' `from_pretrained` load.

  SD 1.x/2.x components make a StableDiffusionPipeline folder; SDXL ones (with `text_encoder_2`)
  a StableDiffusionXLPipeline folder, or a StableDiffusionXLImg2ImgPipeline one for the refiner
  (no `text_encoder`), with `components.options` in model_index.json. Weights are written in
  float32 safetensors, configs as diffusers/transformers write them.
  """
  os.makedirs(path, exist_ok=True)
  xl = components.text_encoder_2 is not None
  names = ('unet', 'vae', 'text_encoder') + (('text_encoder_2',) if xl else ())
  for name in names:
    if getattr(components, name) is not None:
      save_network(path, name, *getattr(components, name))
  for name in ('tokenizer', 'tokenizer_2'):
    if getattr(components, name) is not None:
      getattr(components, name).save_pretrained(os.path.join(path, name))
  scheduler = dict(components.scheduler_config)
  config_io.write_json(scheduler, os.path.join(path, 'scheduler', 'scheduler_config.json'))
  index = _xl_index(components) if xl else _sd_index(components)
  config_io.write_json(index | {'scheduler': ['diffusers', scheduler.get(
      '_class_name', 'EulerDiscreteScheduler' if xl else 'PNDMScheduler')]},
                       os.path.join(path, 'model_index.json'))


def _te_entry(network):
  return (['transformers', network[0].config.to_transformers()['architectures'][0]]
          if network is not None else [None, None])


def _tokenizer_entry(tokenizer):
  return ['transformers', 'CLIPTokenizer'] if tokenizer is not None else [None, None]


def _sd_index(components):
  return {
      '_class_name': 'StableDiffusionPipeline', '_diffusers_version': _DIFFUSERS_VERSION,
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': _te_entry(components.text_encoder),
      'tokenizer': ['transformers', 'CLIPTokenizer'],
      'safety_checker': [None, None], 'feature_extractor': [None, None],
      'requires_safety_checker': False}


def _xl_index(components):
  """model_index.json of an SDXL folder: the refiner (no first encoder) is an img2img one."""
  refiner = components.text_encoder is None
  options = xl_options(components.options)
  if not refiner:  # StableDiffusionXLPipeline has no aesthetic-score setting
    del options['requires_aesthetics_score']
  return {
      '_class_name': 'StableDiffusionXLImg2ImgPipeline' if refiner else 'StableDiffusionXLPipeline',
      '_diffusers_version': _DIFFUSERS_VERSION,
      'unet': ['diffusers', 'UNet2DConditionModel'], 'vae': ['diffusers', 'AutoencoderKL'],
      'text_encoder': _te_entry(components.text_encoder),
      'tokenizer': _tokenizer_entry(components.tokenizer),
      'text_encoder_2': _te_entry(components.text_encoder_2),
      'tokenizer_2': _tokenizer_entry(components.tokenizer_2),
      'image_encoder': [None, None], 'feature_extractor': [None, None]} | options


def save_network(path, name, module, params):
  """Writes one network as the `name/` folder of a diffusers pipeline ('unet', 'vae',
  'text_encoder' or 'text_encoder_2'), loadable by its diffusers/transformers class's
  `from_pretrained`."""
  if name.startswith('text_encoder'):
    state = {('' if k.startswith('text_projection') else 'text_model.') + k: v
             for k, v in tables.to_torch(params).items()}
    _save_component(path, name, module.config.to_transformers(), state)
  else:
    _save_component(path, name, module.config.to_diffusers(), tables.to_torch(params))


def _save_component(path, name, config, state):
  folder = os.path.join(path, name)
  if not name.startswith('text_encoder'):
    config = config | {'_diffusers_version': _DIFFUSERS_VERSION}
  config_io.write_json(config, os.path.join(folder, 'config.json'))
  filename = _WEIGHTS_NAME[name] + '.safetensors'
  save_safetensors(state, os.path.join(folder, filename), {'format': 'pt'})


def save_safetensors(state, path, metadata):
  """`safetensors.numpy.save_file` with the permissions a plain `open()` gives (umask applied).

  safetensors writes a private temporary file (mode 0600) and renames it into place; the weights
  are no secret, so they get the mode of every other file we write (0644 under umask 022).
  """
  st_numpy.save_file(state, path, metadata=metadata)
  os.chmod(path, 0o666 & ~_umask())


def _umask():
  """The process umask: read from /proc on Linux (os.umask alone can only read it by setting it)."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask
