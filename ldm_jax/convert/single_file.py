"""Original Stable Diffusion single-file checkpoints in and out (.safetensors, .ckpt), no torch.

SD 1.x/2.x files are in CompVis' LatentDiffusion layout, SDXL (base and refiner) files in
Stability generative-models' (SGM) layout (`conditioner.embedders.N.*` text encoders).
Reading maps the CompVis keys to diffusers keys (`compvis`), builds the networks' configs
(`single_file_config`) and loads them through the same checked table as diffusers folders
(`tables.to_flax`), so a file either loads whole or fails listing every key that does not fit.

What describes the model, first found first (each setting's source is in the report):
  1. arguments: prediction_type, image_size, scaling_factor;
  2. config= (a diffusers folder) or config_yaml= (the original YAML) when given;
  3. the file's own metadata, which ldm_jax writes (`single_file_config.METADATA_KEYS`);
  4. the YAML beside the file (same name, .yaml), read when neither 2 nor 3 is there;
  5. the tensors' shapes and the SD conventions (files from the wild).
"""

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from safetensors import numpy as st_numpy

from ldm_jax.convert import ckpt
from ldm_jax.convert import compvis
from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import single_file_config as sfc
from ldm_jax.convert import tables
from ldm_jax.models import build
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib

SUFFIXES = ('.safetensors', '.ckpt', '.pt', '.pth')


@dataclasses.dataclass
class LoadReport:
  """What `load` found and decided, for the command line's summary."""
  path: str
  file_format: str  # 'safetensors' or 'ckpt'
  file_dtypes: tuple
  model_type: compvis.ModelType
  ema: str  # 'used', 'not used' or 'absent'
  settings: sfc.Settings
  configs_from: str
  tokenizer_from: str | None
  ignored_keys: list
  scheduler_from: str = ''
  notes: tuple = ()  # which YAML was read or passed over, and why
  tokenizer_2_from: str | None = None

  def lines(self):
    s = self.settings
    src = lambda name: s.sources[name]
    none = 'none (a single file has none: pass a tokenizer folder)'
    tokenizer = f'tokenizer: {self.tokenizer_from or none}'
    if self.model_type.family == 'sdxl':
      tokenizer += f'; tokenizer_2: {self.tokenizer_2_from or none}'
    elif self.model_type.family == 'sdxl_refiner':  # only the second encoder: one tokenizer
      tokenizer = f'tokenizer_2: {self.tokenizer_2_from or none}'
    return [
        f'{self.path}: {self.file_format}, {"/".join(self.file_dtypes)}, {self.model_type}',
        *(f'  {note}' for note in self.notes),
        f'  EMA weights: {self.ema}; architecture from {self.configs_from}',
        f'  image size {s.image_size} ({src("image_size")}), prediction {s.prediction_type} '
        f'({src("prediction_type")}), VAE scaling factor {s.scaling_factor} '
        f'({src("scaling_factor")})',
        f'  scheduler config from {self.scheduler_from}',
        f'  {tokenizer}',
        f'  {len(self.ignored_keys)} non-network entries skipped (noise-schedule buffers, ...)',
    ]


def read_checkpoint(path):
  """All tensors of a single file, as {key: numpy array}, and its format ('safetensors' or 'ckpt').

  Raises:
    diffusers.ConversionError: no such file, a truncated one, or one that is no checkpoint.
    ckpt.UnsafePickleError: a .ckpt whose pickle references anything but tensor storage.
  """
  if not os.path.isfile(path):
    raise diffusers_lib.ConversionError(f'{path}: no such file')
  with open(path, 'rb') as f:
    head = f.read(9)
  if len(head) == 9 and head[8:9] == b'{':  # an 8-byte header length, then the JSON header
    try:
      return st_numpy.load_file(path), 'safetensors'
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
      raise diffusers_lib.ConversionError(f'{path} is not a readable safetensors file ({e}): it is '
                                          'truncated or corrupt; re-download it') from e
  if head[:4] == b'PK\x03\x04' or head[:2] == b'\x80\x02':  # a torch zip, or a bare pickle
    return _state_dict(ckpt.load(path), path), 'ckpt'
  raise diffusers_lib.ConversionError(
      f'{path} is no checkpoint: neither safetensors nor a PyTorch zip (.ckpt) (it starts with '
      f'{head[:8]!r})')


def read_metadata(path):
  """A safetensors file's `__metadata__` (str -> str); {} for a .ckpt or a file without any."""
  with open(path, 'rb') as f:
    if f.read(9)[8:9] != b'{':
      return {}
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      return dict(f.metadata() or {})
  except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
    raise diffusers_lib.ConversionError(f'{path} is not a readable safetensors file ({e})') from e


def yaml_beside(path):
  """The YAML beside a single file (same name, .yaml), or None when there is none."""
  candidate = os.path.splitext(path)[0] + '.yaml'
  return candidate if os.path.isfile(candidate) else None


def _state_dict(obj, path):
  while isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
    obj = obj['state_dict']  # Lightning: {'state_dict': ..., 'global_step': ..., ...}
  state = {}
  if isinstance(obj, dict):
    state = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not state:
    raise diffusers_lib.ConversionError(f'{path} holds no tensors (a {type(obj).__name__}); '
                                        'expected a state dict')
  return state


@dataclasses.dataclass
class MappedCheckpoint:
  """A single file's tensors under diffusers names, with the configs that describe them."""
  # {'unet' | 'vae' | 'text_encoder' | 'text_encoder_2': {diffusers key: array}}: SDXL adds
  # text_encoder_2, the refiner has no text_encoder
  states: dict
  # (UNetConfig, VAEConfig, TextEncoderConfig); SDXL's add the second TextEncoderConfig, and the
  # refiner's first is None
  configs: tuple
  scheduler_config: dict
  model_type: compvis.ModelType
  ema: str
  settings: sfc.Settings
  configs_from: str
  ignored_keys: list
  scheduler_from: str = ''
  notes: tuple = ()
  options: dict = dataclasses.field(default_factory=dict)  # SDXL's pipeline settings


@dataclasses.dataclass
class _Described:
  """What describes a file beyond its shapes (see the module doc), with the sources' names."""
  # {'unet', 'vae', 'text_encoder', 'scheduler' (SDXL: 'text_encoder_2', 'options'): dict}
  folder: dict | None = None
  folder_from: str = 'config folder'
  original: dict | None = None  # the LDM YAML's model.params
  original_from: str = 'original config'
  notes: tuple = ()
  where: str = ''  # the folder's (or description's) whereabouts, for the report


def _describe(config, config_yaml, metadata, beside):
  """Arguments > the file's metadata > the YAML beside it (only when neither is there)."""
  if config is not None or config_yaml is not None:
    original, section, note = (sfc.read_yaml(config_yaml) if config_yaml is not None else
                               (None, None, None))
    notes = (f'original config: {note}',) if note else ()
    if config is not None:
      return _Described(sfc.read_config_folder(config), original=original, notes=notes,
                        where=f'config folder {config}')
    return _Described(section, 'original config', original, notes=notes,
                      where='original config (its ldm_jax: section)')
  from_metadata = sfc.description_from_metadata(metadata or {})
  if from_metadata is not None:
    notes = (f'the YAML beside it ({beside}) was not read: the file\'s metadata describes the '
             'model (pass it as --original_config to use it)',) if beside else ()
    return _Described(from_metadata, 'metadata', notes=notes, where='metadata')
  if beside is not None:
    logging.info('reading the YAML beside the single file: %s', beside)
    original, section, note = sfc.read_yaml(beside, f'the YAML beside the file ({beside})')
    notes = (f'read the YAML beside it: {beside}',) + ((note,) if note else ())
    return _Described(section, 'YAML beside', original, 'YAML beside', notes,
                      f'YAML beside ({beside}, its ldm_jax: section)')
  return _Described()


def map_checkpoint(state, *, config=None, config_yaml=None, metadata=None, yaml_beside=None,
                   use_ema=True, prediction_type=None, image_size=None, scaling_factor=None,
                   dtype=jnp.float32, param_dtype=None):
  """Detects the model type, picks the EMA weights, renames the keys and builds the configs.

  Arguments as in `load_single_file`, plus the file's safetensors `metadata` and the path of the
  YAML beside it (`yaml_beside`), both used only as the module doc says. The arrays are renamed,
  not copied or cast.

  Returns:
    MappedCheckpoint.
  """
  model_type = compvis.detect_model_type(state)
  state, ema = compvis.select_ema(state, use_ema)
  parts, ignored = compvis.split(state, model_type)
  d = _describe(config, config_yaml, metadata, yaml_beside)
  settings = sfc.resolve_settings(
      model_type, d.original, d.folder, image_size=image_size, prediction_type=prediction_type,
      scaling_factor=scaling_factor, original_from=d.original_from, folder_from=d.folder_from)
  states = {'unet': compvis.unet_to_diffusers(parts['unet']),
            'vae': compvis.vae_to_diffusers(parts['vae'])}
  states |= _text_states(parts, model_type, d.folder)
  runtime = dict(dtype=dtype, param_dtype=param_dtype or dtype)
  configs = _configs(states, model_type, settings, d, runtime)
  if d.folder is not None:
    configs_from = scheduler_from = d.where
  else:
    configs_from = ('tensor shapes + ' + d.original_from if d.original is not None else
                    'tensor shapes + SD conventions')
    scheduler_from = f'default for {str(model_type).split(" (")[0]}' + (
        f', betas from {d.original_from}' if d.original is not None else '')
  scheduler = sfc.scheduler_config(model_type, settings, d.original, d.folder)
  options = {}
  if model_type.is_xl:
    options = diffusers_lib.xl_options((d.folder or {}).get('options') or
                                       sfc.XL_OPTIONS[model_type.family])
  return MappedCheckpoint(states, configs, scheduler, model_type, ema, settings, configs_from,
                          ignored, scheduler_from, d.notes, options)


def _text_states(parts, model_type, folder):
  """The text encoders' tensors under transformers names: CLIP-L as it is; OpenCLIP through its
  table, less the last layer in SD 2.x (with its projection if the folder's encoder has one),
  whole in SDXL."""
  states = {}
  for name, (_, layout) in compvis.text_layouts(model_type).items():
    if layout == 'clip':
      states[name] = compvis.clip_to_diffusers(parts[name])
    elif model_type.is_xl:
      states[name] = compvis.openclip_to_diffusers(parts[name], True, keep_last=True)
    else:
      with_projection = folder is not None and 'CLIPTextModelWithProjection' in (
          (folder.get(name) or {}).get('architectures') or [])
      states[name] = compvis.openclip_to_diffusers(parts[name], with_projection)
  return states


def load(path, *, tokenizer=None, tokenizer_2=None, **kwargs):
  """`load_single_file` (same arguments), also returning what it found and decided.

  Returns:
    (Components, LoadReport).
  """
  state, file_format = read_checkpoint(path)
  file_dtypes = tuple(sorted({str(v.dtype) for v in state.values()}))
  metadata = read_metadata(path) if file_format == 'safetensors' else {}
  mapped = map_checkpoint(state, metadata=metadata, yaml_beside=yaml_beside(path), **kwargs)
  unet_config, vae_config, *text_configs = mapped.configs
  modules = {'unet': unet_lib.UNet2DConditionModel(unet_config),
             'vae': vae_lib.AutoencoderKL(vae_config)}
  for name, text_config in zip(('text_encoder', 'text_encoder_2'), text_configs):
    if text_config is not None:
      modules[name] = text_encoder_lib.CLIPTextModel(text_config)
  nets = {name: (module, _params(module, mapped.states.get(name, {}), name, path))
          for name, module in modules.items()}
  config = kwargs.get('config')
  if mapped.model_type.family == 'sdxl_refiner':  # one tokenizer, the second encoder's
    tokenizer_2, tokenizer = tokenizer_2 or tokenizer, None
  tok, tokenizer_from = (_tokenizer(tokenizer, config) if 'text_encoder' in nets else
                         (None, None))
  tok_2, tokenizer_2_from = (_tokenizer(tokenizer_2, config, 'tokenizer_2')
                             if 'text_encoder_2' in nets else (None, None))
  components = diffusers_lib.Components(
      unet=nets['unet'], vae=nets['vae'], text_encoder=nets.get('text_encoder'), tokenizer=tok,
      scheduler_config=mapped.scheduler_config, text_encoder_2=nets.get('text_encoder_2'),
      tokenizer_2=tok_2, options=mapped.options)
  report = LoadReport(str(path), file_format, file_dtypes, mapped.model_type, mapped.ema,
                      mapped.settings, mapped.configs_from, tokenizer_from, mapped.ignored_keys,
                      mapped.scheduler_from, mapped.notes, tokenizer_2_from)
  return components, report


def load_single_file(path, *, config=None, config_yaml=None, use_ema=True, prediction_type=None,
                     image_size=None, scaling_factor=None, dtype=jnp.float32, param_dtype=None,
                     tokenizer=None, tokenizer_2=None):
  """Loads an original Stable Diffusion single-file checkpoint into `Components`.

  A file written by ldm_jax describes itself (its metadata, else the YAML written beside it), so
  it loads back exactly as it was saved. For files from the wild the model type (SD 1.x, 2.x,
  SDXL, the SDXL refiner, inpainting) is detected from the keys; widths and depths come from the
  tensors' shapes. The module doc has the precedence. torch is never imported; a .ckpt's pickle
  may only rebuild tensors.

  Args:
    path: a .safetensors or .ckpt (torch zip) file in the CompVis/Stability (SD 1.x/2.x) or
      generative-models (SDXL) layout.
    config: a diffusers folder whose configs (and tokenizer/, if any) describe the model, as in
      diffusers' `from_single_file(config=...)`; needed for models off the SD conventions.
    config_yaml: the original LDM YAML (path or parsed dict): heads, prediction type, VAE scale,
      betas; its architecture fields are checked against the tensors. Without config and
      config_yaml, the file's own metadata, else the YAML beside it (path with .yaml), is used.
    use_ema: take the EMA U-Net weights (`model_ema.*`) when the file has them.
    prediction_type: 'epsilon', 'v_prediction' or 'sample'; overrides the YAML and the default.
    image_size: the native image size in pixels (default 512; 768 for SD 2.x v-prediction).
    scaling_factor: the VAE latent scale (default: the YAML's, else 0.18215).
    dtype: compute dtype of the networks.
    param_dtype: storage dtype of the parameters (default: `dtype`).
    tokenizer: a tokenizer folder (or tokenizer object); a single file holds none, so without
      one (or a `config` folder with tokenizer/) the components have none. For the SDXL refiner,
      which has only the second encoder, it is taken as `tokenizer_2` unless that is given.
    tokenizer_2: SDXL's second tokenizer (OpenCLIP bigG's: '!' pads), likewise (or the `config`
      folder's tokenizer_2/).

  Returns:
    Components, as `load_diffusers` returns them.

  Raises:
    diffusers.ConversionError: a missing, truncated or unknown file, or an unknown model type.
    ckpt.UnsafePickleError: a pickle referencing anything but tensor storage (never executed).
    tables.WeightsMismatchError: tensors that do not fit the configs, listing every key.
  """
  return load(path, config=config, config_yaml=config_yaml, use_ema=use_ema,
              prediction_type=prediction_type, image_size=image_size,
              scaling_factor=scaling_factor, dtype=dtype, param_dtype=param_dtype,
              tokenizer=tokenizer, tokenizer_2=tokenizer_2)[0]


def _configs(states, model_type, settings, described, runtime):
  if described.folder is not None:
    configs = sfc.configs_from_folder(described.folder, settings, described.folder_from,
                                      **runtime)
    if len(configs) != (4 if model_type.is_xl else 3):
      raise diffusers_lib.ConversionError(
          f'the single file is {model_type}, but {described.where or described.folder_from} '
          f'describes {"an SDXL" if len(configs) == 4 else "an SD 1.x/2.x"} model')
    return configs
  try:
    vae = sfc.vae_config(states['vae'], settings, model_type, **runtime)
    texts = {name: sfc.text_config(states[name], model_type, name, **runtime)
             for name in compvis.text_layouts(model_type)}
    pooled = texts['text_encoder_2'].projection_dim if 'text_encoder_2' in texts else None
    unet = sfc.unet_config(states['unet'], model_type, settings, vae.downsample_factor,
                           described.original, pooled, **runtime)
  except (KeyError, StopIteration) as e:
    raise diffusers_lib.ConversionError(
        f'the single file lacks a tensor its architecture is read from ({e}): it is incomplete or '
        f'not a {model_type} checkpoint') from e
  if not model_type.is_xl:
    return unet, vae, texts['text_encoder']
  return unet, vae, texts.get('text_encoder'), texts['text_encoder_2']


def _params(module, state, name, path):
  if name.startswith('text_encoder'):
    state = {k.removeprefix('text_model.'): v for k, v in state.items()}
  try:
    params = tables.to_flax(state, build.abstract_params(module), name=name)
  except tables.WeightsMismatchError as e:
    raise tables.WeightsMismatchError(
        f'{path}: after mapping its keys to diffusers names:\n{e}') from e
  return jax.tree.map(jnp.asarray, params)


def _tokenizer(tokenizer, config, name='tokenizer'):
  if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
    return tokenizer, 'given'
  folder = tokenizer or (os.path.join(config, name) if config is not None else None)
  if folder is None or not os.path.isdir(folder):
    if tokenizer is not None:
      raise diffusers_lib.ConversionError(f'tokenizer folder {tokenizer} does not exist')
    return None, None
  return diffusers_lib.load_tokenizer(folder), str(folder)


def single_file_state(components, text_layout=None):
  """Components -> {CompVis key: float32 array}, the layout `load_single_file` reads.

  SDXL components (with `text_encoder_2`) are written in generative-models' layout: CLIP-L under
  conditioner.embedders.0.transformer.*, OpenCLIP bigG under conditioner.embedders.1.model.*
  (the refiner's, its only encoder, under conditioner.embedders.0.model.*).

  Args:
    components: Components.
    text_layout: SD 1.x/2.x only: 'clip' (cond_stage_model.transformer.*) or 'openclip'
      (cond_stage_model.model.*); by default OpenCLIP for a GELU text encoder (SD 2.x), CLIP for a
      quick-GELU one (SD 1.x).
  """
  (unet, unet_params), (vae, vae_params) = components.unet, components.vae
  state = {compvis.UNET_PREFIX + k: v for k, v in compvis.unet_from_diffusers(
      tables.to_torch(unet_params), unet.config).items()}
  state |= {compvis.VAE_PREFIXES[0] + k: v for k, v in compvis.vae_from_diffusers(
      tables.to_torch(vae_params), vae.config).items()}
  if components.text_encoder_2 is not None:
    family = 'sdxl' if components.text_encoder is not None else 'sdxl_refiner'
    layouts = compvis.text_layouts(compvis.ModelType(family, False, ''))
  else:
    text = components.text_encoder[0]
    text_layout = text_layout or ('openclip' if text.config.hidden_act == 'gelu' else 'clip')
    if text_layout not in ('clip', 'openclip'):
      raise ValueError(f"text_layout must be 'clip' or 'openclip', got {text_layout!r}")
    layouts = {'text_encoder': ({'clip': compvis.CLIP_PREFIX,
                                 'openclip': compvis.OPENCLIP_PREFIX}[text_layout], text_layout)}
  for name, (prefix, layout) in layouts.items():
    module, params = getattr(components, name)
    text_state = tables.to_torch(params)
    if layout == 'clip':
      out = compvis.clip_from_diffusers(text_state)
    else:  # SD 2.x's OpenCLIP-H gets its unused last layer back; SDXL's bigG is whole
      out = compvis.openclip_from_diffusers(text_state, module.config.num_hidden_layers,
                                            pad_last=name == 'text_encoder')
    state |= {prefix + k: v for k, v in out.items()}
  return state


def save_single_file(components, path, *, dtype=np.float32, text_layout=None, config_yaml=None):
  """Writes `components` as one CompVis-layout safetensors file (what `from_single_file` reads);
  SDXL components in generative-models' layout (see `single_file_state`).

  The file's metadata also holds the four configs (`single_file_config.METADATA_KEYS`; SDXL
  also the second encoder's and the pipeline options), so that
  `load_single_file` gets the same model back: prediction type, VAE scale, sample sizes,
  scheduler and any non-SD architecture. Other readers ignore it.

  Args:
    components: Components.
    path: the .safetensors file to write.
    dtype: the stored dtype (float32, float16 or bfloat16).
    text_layout: see `single_file_state`.
    config_yaml: where to also write the original LDM (SDXL: SGM) YAML describing the model
      (optional): it
      carries what shapes cannot (heads, prediction type, VAE scale, betas), and our configs.
  """
  state = {k: np.ascontiguousarray(v.astype(dtype)) for k, v in
           single_file_state(components, text_layout).items()}
  metadata = {'format': 'pt'} | sfc.metadata(components)
  # Built before anything is written: a model LDM's YAML cannot describe leaves no file behind.
  original = sfc.original_config(components) if config_yaml is not None else None
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  diffusers_lib.save_safetensors(state, path, metadata)
  if config_yaml is not None:
    import yaml  # pylint: disable=g-import-not-at-top  (only when a YAML is asked for)
    with open(config_yaml, 'w') as f:
      yaml.safe_dump(original, f, sort_keys=False)
