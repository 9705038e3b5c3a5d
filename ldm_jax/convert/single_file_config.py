"""The network configs of a single-file checkpoint: from its shapes, its original YAML or a folder.

A single file from the wild holds weights only (SD 1.x/2.x in LDM's layout, SDXL and its refiner
in generative-models' (SGM) layout). Widths, depths, levels, channels and context size
are read off the tensors' shapes; what shapes cannot tell comes from the original LDM YAML when
given (heads, prediction type, VAE scale, betas) and otherwise from the SD family's conventions:
32 norm groups (LDM hard-codes them), 8 heads per level in SD 1.x, 64-wide heads in SD 2.x, SDXL
and all text encoders; SDXL's 6 size/crop ids (5 with the aesthetic score in the refiner). A
diffusers folder (`config=`) instead fixes every setting, as in diffusers' own
`from_single_file(config=...)`.

A file written by ldm_jax describes itself exactly: its safetensors `__metadata__` holds the four
diffusers configs as JSON (`METADATA_KEYS`; SDXL adds `XL_METADATA_KEYS`), and the YAML written
beside it holds them again in an `ldm_jax:` section next to LDM's (or SGM's) `model:` (which the
original code and diffusers read). Either is a "description": {'unet', 'vae', 'text_encoder',
'scheduler': config dict} (SDXL adds 'text_encoder_2' and 'options', the pipeline settings; the
refiner's 'text_encoder' is None), used like a folder.
"""

import dataclasses
import json
import os
import re

from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.models import config_io
from ldm_jax.models import text_encoder as text_encoder_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models import vae as vae_lib

DEFAULT_SCALING_FACTOR = 0.18215
XL_SCALING_FACTOR = 0.13025
# Description part -> the safetensors metadata key (and, less the prefix, the YAML section's key).
METADATA_KEYS = {'unet': 'ldm_jax.unet_config', 'vae': 'ldm_jax.vae_config',
                 'text_encoder': 'ldm_jax.text_encoder_config',
                 'scheduler': 'ldm_jax.scheduler_config'}
# SDXL's parts beside those (the refiner's text_encoder is written as JSON null).
XL_METADATA_KEYS = {'text_encoder_2': 'ldm_jax.text_encoder_2_config',
                    'options': 'ldm_jax.pipeline_options'}
# SDXL's added-conditioning ids: original size, crop top-left, target size (2 each); the refiner
# has the aesthetic score in place of the target size.
XL_TIME_IDS = {'sdxl': 6, 'sdxl_refiner': 5}
# The released SDXL pipelines' settings (model_index.json), for files without a description.
XL_OPTIONS = {'sdxl': {'force_zeros_for_empty_prompt': True, 'requires_aesthetics_score': False},
              'sdxl_refiner': {'force_zeros_for_empty_prompt': False,
                               'requires_aesthetics_score': True}}
# SDXL's scheduler as stabilityai/stable-diffusion-xl-base-1.0 (and diffusers' loader) has it.
XL_SCHEDULER = {'_class_name': 'EulerDiscreteScheduler', 'beta_start': 0.00085,
                'beta_end': 0.012, 'beta_schedule': 'scaled_linear', 'clip_sample': False,
                'interpolation_type': 'linear', 'num_train_timesteps': 1000,
                'prediction_type': 'epsilon', 'sample_max_value': 1.0, 'set_alpha_to_one': False,
                'skip_prk_steps': True, 'steps_offset': 1, 'timestep_spacing': 'leading',
                'trained_betas': None, 'use_karras_sigmas': False}
YAML_SECTION = 'ldm_jax'
_PREDICTION = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
_SGM_SCALINGS = {'EpsScaling': 'epsilon', 'VScaling': 'v_prediction'}
_SGM_TARGET = 'sgm.modules.diffusionmodules.'
# LDM's beta_schedule names -> diffusers' (LDM's 'linear' is linear in sqrt(beta)).
_SCHEDULES = {'linear': 'scaled_linear', 'sqrt_linear': 'linear', 'cosine': 'squaredcos_cap_v2'}
_HEAD_WIDTH = 64  # CLIP-L, OpenCLIP-H and the SD 2.x U-Net all use 64-wide attention heads


@dataclasses.dataclass(frozen=True)
class Settings:
  """What shapes cannot tell, with where each value came from (for the summary)."""
  image_size: int
  prediction_type: str
  scaling_factor: float
  sources: dict


def read_yaml(config_yaml, name='the original config'):
  """An LDM YAML (a path or a parsed dict) -> (`model.params`, description or None, note or None).

  The `ldm_jax:` section describes the model only while `model:` still says what ldm_jax wrote
  beside it: a YAML whose `model:` was edited describes the model by `model:` alone (the note
  says so), so an edit is never silently overridden by a stale section.
  """
  if isinstance(config_yaml, (str, os.PathLike)):
    import yaml  # pylint: disable=g-import-not-at-top  (only when a YAML is given)
    with open(config_yaml) as f:
      config_yaml = yaml.safe_load(f)
  params = (config_yaml or {}).get('model', {}).get('params')
  if not isinstance(params, dict) or not ('unet_config' in params or 'network_config' in params):
    raise diffusers_lib.ConversionError(
        f'{name} has no model.params.unet_config (nor SGM\'s network_config): expected an '
        'LDM/Stability YAML such as v1-inference.yaml, v2-inference-v.yaml or sd_xl_base.yaml')
  section = config_yaml.get(YAML_SECTION)
  if section is None:
    return params, None, None
  if not isinstance(section, dict):
    raise diffusers_lib.ConversionError(f'{name}: its {YAML_SECTION}: section is not a mapping')
  description = _description(
      {part: section.get(key.removeprefix(YAML_SECTION + '.'))
       for part, key in (METADATA_KEYS | XL_METADATA_KEYS).items()},
      f'{name} ({YAML_SECTION}: section)')
  if _model_yaml(description) != config_yaml['model']:
    return params, None, (f'its {YAML_SECTION}: section was ignored: model: was edited since '
                          'ldm_jax wrote it, so model: alone describes the model')
  return params, description, None


def description_from_metadata(metadata, name='the file'):
  """A safetensors file's `__metadata__` -> the description ldm_jax wrote there, or None."""
  if not any(key in metadata for key in METADATA_KEYS.values()):
    return None
  parts = {}
  for part, key in (METADATA_KEYS | XL_METADATA_KEYS).items():
    try:
      parts[part] = json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as e:
      raise diffusers_lib.ConversionError(
          f'{name}: its metadata {key} is not JSON ({e}): the file was altered; pass config= a '
          'diffusers folder (--config) that describes the model') from e
  return _description(parts, f'{name} (metadata)')


def _description(parts, name):
  """Checks a description's parts: SDXL's (with a text_encoder_2) may lack the first encoder (the
  refiner) and the options; an SD 1.x/2.x one keeps its four parts only."""
  xl = isinstance(parts.get('text_encoder_2'), dict)
  optional = ('text_encoder', 'options') if xl else tuple(XL_METADATA_KEYS)
  keys = METADATA_KEYS | XL_METADATA_KEYS
  missing = [keys[part] for part in keys
             if not isinstance(parts.get(part), dict) and part not in optional]
  if missing:
    raise diffusers_lib.ConversionError(
        f'{name} lacks {", ".join(missing)} (or they are not mappings): it describes the model in '
        'part only; pass config= a diffusers folder (--config) that describes it whole')
  if not xl:
    return {part: parts[part] for part in METADATA_KEYS}
  return {part: parts.get(part) for part in keys}


def describe(components):
  """The description of `components`: its networks' diffusers configs, its scheduler config
  (SDXL: also text_encoder_2's and the pipeline options; the refiner's text_encoder is None)."""
  text = components.text_encoder
  parts = {'unet': components.unet[0].config.to_diffusers(),
           'vae': components.vae[0].config.to_diffusers(),
           'text_encoder': text[0].config.to_transformers() if text is not None else None,
           'scheduler': dict(components.scheduler_config)}
  if components.text_encoder_2 is not None:
    parts |= {'text_encoder_2': components.text_encoder_2[0].config.to_transformers(),
              'options': diffusers_lib.xl_options(components.options)}
  return json.loads(json.dumps(parts, default=_plain))  # plain JSON types, as read back


def _plain(value):
  if hasattr(value, 'tolist'):  # numpy scalars and arrays (trained_betas, ...)
    return value.tolist()
  raise TypeError(f'{value!r} ({type(value).__name__}) is not JSON serialisable')


def metadata(components):
  """The safetensors metadata (str -> JSON str) that describes `components` exactly."""
  description = describe(components)
  return {key: json.dumps(description[part], sort_keys=True)
          for part, key in (METADATA_KEYS | XL_METADATA_KEYS).items() if part in description}


def configs_of(description, **runtime):
  """(UNetConfig, VAEConfig, TextEncoderConfig) from a description (or a folder's configs); SDXL's
  (with a text_encoder_2) add its TextEncoderConfig, and the refiner's first is None."""
  text = lambda raw: (None if raw is None else
                      text_encoder_lib.TextEncoderConfig.from_transformers(raw, **runtime))
  try:
    configs = (unet_lib.UNetConfig.from_diffusers(description['unet'], **runtime),
               vae_lib.VAEConfig.from_diffusers(description['vae'], **runtime),
               text(description['text_encoder']))
    if description.get('text_encoder_2') is not None:
      configs += (text(description['text_encoder_2']),)
    return configs
  except (ValueError, TypeError) as e:
    raise diffusers_lib.ConversionError(f'the configs describing the single file are not ones '
                                        f'ldm_jax builds: {e}') from e


def resolve_settings(model_type, original=None, folder=None, *, image_size=None,
                     prediction_type=None, scaling_factor=None, original_from='original config',
                     folder_from='config folder'):
  """Image size, prediction type and VAE scale: argument > YAML > folder or description > default.

  The image size never comes from the YAML: Stability's YAMLs say `image_size: 64` (512 px) for
  the 768 px v-prediction models too. The defaults follow the released models: SD 1.x and all
  inpainting models 512 px epsilon; SD 2.x 768 px v-prediction, or 512 px when told epsilon;
  SDXL and its refiner 1024 px epsilon, VAE scale 0.13025.
  `original_from` and `folder_from` name where `original` and `folder` came from (the sources).
  """
  sources = {}

  def pick(name, candidates, default):
    for source, value in candidates:
      if value is not None:
        sources[name] = source
        return value
    sources[name] = 'default for ' + str(model_type).split(' (')[0]
    return default

  yaml = original or {}
  folder = folder or {}
  folder_size = folder_prediction = None
  if folder:
    factor = 2 ** (len(folder['vae']['block_out_channels']) - 1)
    folder_size = folder['unet']['sample_size'] * factor
    # diffusers' schedulers default to epsilon: a config without the key means epsilon.
    folder_prediction = folder['scheduler'].get('prediction_type', 'epsilon')
  v_model = model_type.family == 'sd2' and not model_type.inpainting
  prediction = pick('prediction_type', [
      ('argument', prediction_type),
      (original_from, _yaml_prediction(yaml) if yaml else None),
      (folder_from, folder_prediction)],
                    'v_prediction' if v_model and (image_size or 768) >= 768 else 'epsilon')
  size = pick('image_size', [('argument', image_size), (folder_from, folder_size)],
              768 if v_model and prediction == 'v_prediction' else
              1024 if model_type.is_xl else 512)
  scale = pick('scaling_factor', [
      ('argument', scaling_factor), (original_from, yaml.get('scale_factor')),
      (folder_from, folder.get('vae', {}).get('scaling_factor'))],
               XL_SCALING_FACTOR if model_type.is_xl else DEFAULT_SCALING_FACTOR)
  return Settings(int(size), prediction, float(scale), sources)


def _yaml_prediction(params):
  """The prediction type of an LDM YAML's `parameterization`, or of an SGM YAML's denoiser
  scaling (EpsScaling, VScaling)."""
  if 'parameterization' in params or 'denoiser_config' not in params:
    return _PREDICTION[params.get('parameterization', 'eps')]
  scaling = params['denoiser_config'].get('params', {}).get('scaling_config', {})
  return _SGM_SCALINGS.get(scaling.get('target', '').rsplit('.', 1)[-1], 'epsilon')


def _yaml_unet(original):
  """The U-Net's parameters in an LDM YAML (unet_config) or an SGM one (network_config)."""
  original = original or {}
  return (original.get('unet_config') or original.get('network_config') or {}).get('params', {})


def _count(state, pattern):
  return len({m[1] for k in state if (m := re.match(pattern, k))})


def unet_config(state, model_type, settings, vae_factor, original=None, pooled_dim=None,
                **runtime):
  """A `UNetConfig` from the U-Net's diffusers-keyed shapes (and the YAML's heads).

  SDXL's added-conditioning widths come from `add_embedding.linear_1` and `pooled_dim`, the
  second text encoder's projection width (the pooled text embedding).
  """
  n = _count(state, r'down_blocks\.(\d+)\.')
  widths = tuple(state[f'down_blocks.{i}.resnets.0.conv1.weight'].shape[0] for i in range(n))
  attn = lambda part, i: f'{part}.{i}.attentions.0.proj_in.weight' in state
  first = next(k for k in sorted(state) if k.endswith('attn2.to_k.weight'))
  depth = _depths(state, [attn('down_blocks', i) for i in range(n)])
  layers = tuple(_count(state, rf'down_blocks\.{i}\.resnets\.(\d+)\.') for i in range(n))
  proj_in = state[first.split('.transformer_blocks.')[0] + '.proj_in.weight']
  yaml_unet = _yaml_unet(original)
  heads = _heads(yaml_unet, model_type, widths)
  kw = dict(
      sample_size=settings.image_size // vae_factor,
      in_channels=state['conv_in.weight'].shape[1], out_channels=state['conv_out.weight'].shape[0],
      block_out_channels=widths,
      layers_per_block=layers,
      down_block_types=tuple('CrossAttnDownBlock2D' if attn('down_blocks', i) else 'DownBlock2D'
                             for i in range(n)),
      up_block_types=tuple('CrossAttnUpBlock2D' if attn('up_blocks', i) else 'UpBlock2D'
                           for i in range(n)),
      transformer_layers_per_block=depth, num_attention_heads=heads,
      cross_attention_dim=state[first].shape[1],
      use_linear_projection=proj_in.ndim == 2,
      # The SD 2.x code base computes attention scores in float32 (its ATTN_PRECISION default).
      upcast_attention=model_type.family == 'sd2')
  kw |= _addition(state, model_type, pooled_dim)
  _check_yaml_unet(yaml_unet, kw)
  preset = {'sd1': unet_lib.UNetConfig.sd15, 'sd2': unet_lib.UNetConfig.sd21,
            'sdxl': unet_lib.UNetConfig.sdxl,
            'sdxl_refiner': unet_lib.UNetConfig.sdxl_refiner}[model_type.family]
  return _build(preset, 'unet', kw | runtime)


def _depths(state, attention):
  """Transformer layers per level, counted where a level has attention.

  A level without attention takes the depth all the others share (the SDXL refiner's 4), else 1;
  the mid block runs the last level's depth (diffusers' and SGM's rule), so a last level without
  attention takes the mid block's (SDXL's 10).
  """
  count = lambda prefix: _count(state, prefix + r'\.attentions\.0\.transformer_blocks\.(\d+)\.')
  depths = [count(rf'down_blocks\.{i}') if a else None for i, a in enumerate(attention)]
  mid = count('mid_block')
  shared = {d for d in depths if d is not None} | ({mid} if mid else set())
  fill = shared.pop() if len(shared) == 1 else 1
  depths = [fill if d is None else d for d in depths]
  if mid and not attention[-1]:
    depths[-1] = mid
  return tuple(depths)


def _addition(state, model_type, pooled_dim):
  """SDXL's `text_time` fields from add_embedding's input width: pooled + ids x time width."""
  if 'add_embedding.linear_1.weight' not in state:
    return {}
  width = state['add_embedding.linear_1.weight'].shape[1]
  ids = XL_TIME_IDS.get(model_type.family)
  if ids is None or pooled_dim is None or width <= pooled_dim or (width - pooled_dim) % ids:
    raise diffusers_lib.ConversionError(
        f'the U-Net\'s added conditioning takes {width} features, which is not the pooled text '
        f'embedding ({pooled_dim}) plus {ids} time ids of one width: not an SDXL '
        f'{"refiner " if model_type.family == "sdxl_refiner" else ""}U-Net; pass config= a '
        'diffusers folder that describes the model')
  return dict(addition_embed_type='text_time', projection_class_embeddings_input_dim=width,
              addition_time_embed_dim=(width - pooled_dim) // ids)


def _heads(yaml_unet, model_type, widths):
  num_heads = yaml_unet.get('num_heads', -1)
  head_width = yaml_unet.get('num_head_channels', -1)
  if num_heads and num_heads > 0:
    return (num_heads,) * len(widths)
  if head_width and head_width > 0:
    return tuple(max(1, c // head_width) for c in widths)
  if model_type.family == 'sd1':
    return (8,) * len(widths)
  # At least one head: a level narrower than a head would otherwise divide by zero.
  return tuple(max(1, c // _HEAD_WIDTH) for c in widths)


def _check_yaml_unet(yaml_unet, kw):
  if not yaml_unet:
    return
  expected = {'in_channels': kw['in_channels'], 'context_dim': kw['cross_attention_dim'],
              'model_channels': kw['block_out_channels'][0],
              'channel_mult': [c // kw['block_out_channels'][0] for c in kw['block_out_channels']],
              'num_res_blocks': kw['layers_per_block'][0],
              'adm_in_channels': kw.get('projection_class_embeddings_input_dim')}
  wrong = [f'{k}: YAML {yaml_unet[k]!r}, file {v!r}' for k, v in expected.items()
           if yaml_unet.get(k) is not None and _listify(yaml_unet[k]) != _listify(v)]
  if wrong:
    raise diffusers_lib.ConversionError('the original config does not describe this checkpoint\'s '
                                        'U-Net: ' + '; '.join(wrong))


def _listify(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


def vae_config(state, settings, model_type=None, **runtime):
  """A `VAEConfig` from the VAE's diffusers-keyed shapes."""
  n = _count(state, r'encoder\.down_blocks\.(\d+)\.')
  kw = dict(
      in_channels=state['encoder.conv_in.weight'].shape[1],
      out_channels=state['decoder.conv_out.weight'].shape[0],
      block_out_channels=tuple(state[f'encoder.down_blocks.{i}.resnets.0.conv1.weight'].shape[0]
                               for i in range(n)),
      layers_per_block=_count(state, r'encoder\.down_blocks\.0\.resnets\.(\d+)\.'),
      latent_channels=state['decoder.conv_in.weight'].shape[1], sample_size=settings.image_size,
      scaling_factor=settings.scaling_factor, use_quant_conv='quant_conv.weight' in state,
      use_post_quant_conv='post_quant_conv.weight' in state,
      mid_block_add_attention='encoder.mid_block.attentions.0.to_q.weight' in state)
  xl = model_type is not None and model_type.is_xl
  preset = vae_lib.VAEConfig.sdxl if xl else vae_lib.VAEConfig.sd15
  return _build(preset, 'vae', kw | runtime)


def text_config(state, model_type, component='text_encoder', **runtime):
  """A `TextEncoderConfig` from transformers-keyed shapes: CLIP-L, OpenCLIP-H (SD 2.x) or
  OpenCLIP-bigG (SDXL's `text_encoder_2`) conventions."""
  vocab, hidden = state['text_model.embeddings.token_embedding.weight'].shape
  kw = dict(vocab_size=vocab, hidden_size=hidden,
            intermediate_size=state['text_model.encoder.layers.0.mlp.fc1.weight'].shape[0],
            num_hidden_layers=_count(state, r'text_model\.encoder\.layers\.(\d+)\.'),
            num_attention_heads=max(1, hidden // _HEAD_WIDTH),
            max_position_embeddings=len(state['text_model.embeddings.position_embedding.weight']),
            with_projection='text_projection.weight' in state)
  if kw['with_projection']:
    kw['projection_dim'] = state['text_projection.weight'].shape[0]
  if component == 'text_encoder_2':
    preset = text_encoder_lib.TextEncoderConfig.openclip_bigg
  elif model_type.text_encoder == 'openclip':
    preset = text_encoder_lib.TextEncoderConfig.openclip_h
  else:
    preset = text_encoder_lib.TextEncoderConfig.sd15
  return _build(preset, 'text_encoder', kw | runtime)


def _build(preset, name, kw):
  try:
    return preset(**kw)
  except (ValueError, TypeError) as e:
    raise diffusers_lib.ConversionError(
        f'{name}: the single file\'s shapes do not make a Stable Diffusion config ({e}); pass '
        'config= a diffusers folder that describes the model') from e


def scheduler_config(model_type, settings, original=None, folder=None):
  """The folder's scheduler config, or SD 1.5's PNDM / SD 2.1's DDIM / SDXL's Euler one; our
  prediction type. (SGM YAMLs keep LDM's betas, the Euler config's, in their discretization.)"""
  if folder is not None:
    return dict(folder['scheduler'], prediction_type=settings.prediction_type)
  if model_type.is_xl:
    return dict(XL_SCHEDULER, prediction_type=settings.prediction_type)
  config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                num_train_timesteps=1000, steps_offset=1, clip_sample=False,
                set_alpha_to_one=False, trained_betas=None)
  if original is not None:
    schedule = original.get('beta_schedule', 'linear')
    if schedule not in _SCHEDULES:
      raise diffusers_lib.ConversionError(f'the original config\'s beta_schedule {schedule!r} is '
                                          f'not one of {sorted(_SCHEDULES)}')
    config['beta_schedule'] = _SCHEDULES[schedule]
    config.update({k: original[o] for k, o in (('beta_start', 'linear_start'), (
        'beta_end', 'linear_end'), ('num_train_timesteps', 'timesteps')) if o in original})
  if model_type.family == 'sd1':
    config.update(_class_name='PNDMScheduler', skip_prk_steps=True)
  else:
    config['_class_name'] = 'DDIMScheduler'
  return config | {'prediction_type': settings.prediction_type}


def read_config_folder(folder):
  """A diffusers folder's configs: {'unet', 'vae', 'text_encoder', 'scheduler': dict}; an SDXL
  folder's add 'text_encoder_2' and 'options' (model_index.json's settings), and the refiner's
  'text_encoder' is None."""
  names = {'unet': 'unet/config.json', 'vae': 'vae/config.json',
           'text_encoder': 'text_encoder/config.json',
           'scheduler': 'scheduler/scheduler_config.json'}
  index_path = os.path.join(folder, 'model_index.json')
  index = config_io.read_json(index_path) if os.path.isfile(index_path) else {}
  xl = (diffusers_lib.is_xl_index(index) or
        os.path.isfile(os.path.join(folder, 'text_encoder_2', 'config.json')))
  if xl:
    names['text_encoder_2'] = 'text_encoder_2/config.json'
    if not os.path.isfile(os.path.join(folder, names['text_encoder'])):
      del names['text_encoder']  # the SDXL refiner
  missing = [p for p in names.values() if not os.path.isfile(os.path.join(folder, p))]
  if missing:
    raise diffusers_lib.ConversionError(f'config folder {folder} lacks {", ".join(missing)}')
  configs = {k: config_io.read_json(os.path.join(folder, p)) for k, p in names.items()}
  if xl:
    configs |= {'text_encoder': configs.get('text_encoder'),
                'options': diffusers_lib.xl_options(index)}
  return configs


def configs_from_folder(folder, settings, folder_from='config folder', **runtime):
  """(UNetConfig, VAEConfig, TextEncoderConfig[, TextEncoderConfig]) from a folder or a
  description (+ size, scale), as `configs_of`.

  The image size and VAE scale are the folder's unless `settings` took them from elsewhere (an
  argument, the YAML); `folder_from` is the folder's source name in `settings.sources`.
  """
  vae_kw = {}
  if settings.sources['scaling_factor'] != folder_from:
    vae_kw['scaling_factor'] = settings.scaling_factor
  if settings.sources['image_size'] != folder_from:
    vae_kw['sample_size'] = settings.image_size
  unet, vae, *texts = configs_of(folder, **runtime)
  vae = dataclasses.replace(vae, **vae_kw)
  if 'sample_size' in vae_kw:
    unet = dataclasses.replace(unet, sample_size=settings.image_size // vae.downsample_factor)
  return (unet, vae, *texts)


def original_config(components):
  """The LDM YAML (as a dict) describing `components`, for the original code and for diffusers;
  for SDXL the generative-models (SGM) YAML, as sd_xl_base.yaml / sd_xl_refiner.yaml.

  Beside LDM's `model:` it holds the exact configs in an `ldm_jax:` section, which LDM's code and
  diffusers ignore and `read_yaml` reads back: `model:` cannot say everything (norm groups, the
  scheduler's class and options, the VAE's sample size, ...).
  """
  description = describe(components)
  return {'model': _model_yaml(description),
          YAML_SECTION: {key.removeprefix(YAML_SECTION + '.'): description[part]
                         for part, key in (METADATA_KEYS | XL_METADATA_KEYS).items()
                         if part in description}}


def _model_yaml(description):
  """The YAML's `model:` for a description: LDM's LatentDiffusion, or SGM's DiffusionEngine."""
  configs = configs_of(description)
  if len(configs) == 4:
    return _sgm_model(*configs, description['scheduler'])
  return _ldm_model(*configs, description['scheduler'])


def _ldm_model(unet, vae, text, sched):
  """The YAML's `model:` (LatentDiffusion's target and parameters)."""
  prediction = {v: k for k, v in _PREDICTION.items()}[sched.get('prediction_type', 'epsilon')]
  schedule = {v: k for k, v in _SCHEDULES.items()}.get(sched.get('beta_schedule', 'scaled_linear'))
  if schedule is None:
    raise diffusers_lib.ConversionError(f'beta_schedule {sched["beta_schedule"]!r} has no LDM name')
  if text.hidden_act == 'gelu':
    cond = {'target': 'ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder',
            'params': {'freeze': True, 'layer': 'penultimate'}}
  else:
    cond = {'target': 'ldm.modules.encoders.modules.FrozenCLIPEmbedder'}
  inpainting = unet.in_channels == 9
  return {
      'target': 'ldm.models.diffusion.ddpm.' + (
          'LatentInpaintDiffusion' if inpainting else 'LatentDiffusion'),
      'params': dict(
          parameterization=prediction, beta_schedule=schedule,
          linear_start=sched.get('beta_start', 0.00085), linear_end=sched.get('beta_end', 0.012),
          timesteps=sched.get('num_train_timesteps', 1000), first_stage_key='jpg',
          cond_stage_key='txt', image_size=unet.sample_size, channels=vae.latent_channels,
          conditioning_key='hybrid' if inpainting else 'crossattn',
          scale_factor=vae.scaling_factor,
          unet_config={'target': 'ldm.modules.diffusionmodules.openaimodel.UNetModel',
                       'params': _unet_yaml(unet)},
          first_stage_config={'target': 'ldm.models.autoencoder.AutoencoderKL',
                              'params': _vae_yaml(vae, unet)},
          cond_stage_config=cond)}


def _unet_yaml(unet, sgm=False):
  """openaimodel.UNetModel's parameters; it is symmetric with one depth (SGM's: one per level)
  and one head rule."""
  attention = [t == 'CrossAttnDownBlock2D' for t in unet.down_block_types]
  if ([t == 'CrossAttnUpBlock2D' for t in unet.up_block_types] != attention[::-1]
      or len(set(unet.layers_per_block)) != 1
      or (not sgm and len(set(unet.transformer_layers_per_block)) != 1)):
    raise diffusers_lib.ConversionError(
        f'the {"SGM" if sgm else "LDM"} U-Net is symmetric, with one depth at every level; this '
        'U-Net is not')
  c0 = unet.block_out_channels[0]
  depth = list(unet.transformer_layers_per_block)
  params = dict(
      image_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
      model_channels=c0, channel_mult=[c // c0 for c in unet.block_out_channels],
      num_res_blocks=unet.layers_per_block[0], context_dim=unet.cross_attention_dim,
      attention_resolutions=[2 ** i for i, a in enumerate(attention) if a],
      transformer_depth=depth if sgm else depth[0],
      use_linear_in_transformer=unet.use_linear_projection, use_spatial_transformer=True)
  if sgm:  # SGM's UNetModel takes no image size; its added conditioning is an MLP ('sequential')
    del params['image_size'], params['use_spatial_transformer']
    params |= dict(adm_in_channels=unet.projection_class_embeddings_input_dim,
                   num_classes='sequential', spatial_transformer_attn_type='softmax-xformers')
  heads = set(unet.num_attention_heads)
  widths = {c // h for c, h in zip(unet.block_out_channels, unet.num_attention_heads)}
  if len(heads) == 1:
    return params | dict(num_heads=heads.pop(), num_head_channels=-1)
  if len(widths) == 1:
    return params | dict(num_heads=-1, num_head_channels=widths.pop())
  raise diffusers_lib.ConversionError('the LDM U-Net needs equal heads or equal head widths')


def _sgm_model(unet, vae, text, text_2, sched):
  """The SGM YAML's `model:` (DiffusionEngine), as Stability's sd_xl_base.yaml and
  sd_xl_refiner.yaml have it; `text` is None for the refiner."""
  prediction = sched.get('prediction_type', 'epsilon')
  scaling = {v: k for k, v in _SGM_SCALINGS.items()}.get(prediction)
  if scaling is None or sched.get('beta_schedule', 'scaled_linear') != 'scaled_linear':
    raise diffusers_lib.ConversionError(
        f'SGM\'s DiscreteDenoiser has no {prediction!r} prediction with a '
        f'{sched.get("beta_schedule")!r} schedule (only epsilon or v_prediction, scaled_linear)')
  frozen = {'is_trainable': False, 'input_key': 'txt'}
  embedders = [] if text is None else [frozen | {
      'target': 'sgm.modules.encoders.modules.FrozenCLIPEmbedder',
      'params': {'layer': 'hidden', 'layer_idx': text.num_hidden_layers - 1}}]
  embedders.append(frozen | {
      'target': 'sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2',
      'params': {'arch': 'ViT-bigG-14', 'version': 'laion2b_s39b_b160k', 'freeze': True,
                 'layer': 'penultimate', 'always_return_pooled': True, 'legacy': False}})
  sizes = ('original_size_as_tuple', 'crop_coords_top_left',
           'target_size_as_tuple' if text is not None else 'aesthetic_score')
  embedders += [{'is_trainable': False, 'input_key': key,
                 'target': 'sgm.modules.encoders.modules.ConcatTimestepEmbedderND',
                 'params': {'outdim': unet.addition_time_embed_dim}} for key in sizes]
  first_stage = _vae_yaml(vae, unet)
  first_stage['ddconfig']['attn_type'] = 'vanilla-xformers'
  discretization = {'linear_start': sched.get('beta_start', 0.00085),
                    'linear_end': sched.get('beta_end', 0.012),
                    'num_timesteps': sched.get('num_train_timesteps', 1000)}
  return {'target': 'sgm.models.diffusion.DiffusionEngine', 'params': {
      'scale_factor': vae.scaling_factor, 'disable_first_stage_autocast': True,
      'denoiser_config': {
          'target': _SGM_TARGET + 'denoiser.DiscreteDenoiser',
          'params': {'num_idx': discretization['num_timesteps'],
                     'scaling_config': {'target': _SGM_TARGET + 'denoiser_scaling.' + scaling},
                     'discretization_config': {
                         'target': _SGM_TARGET + 'discretizer.LegacyDDPMDiscretization',
                         'params': discretization}}},
      'network_config': {'target': _SGM_TARGET + 'openaimodel.UNetModel',
                         'params': _unet_yaml(unet, sgm=True)},
      'conditioner_config': {'target': 'sgm.modules.GeneralConditioner',
                             'params': {'emb_models': embedders}},
      'first_stage_config': {'target': 'sgm.models.autoencoder.AutoencoderKLInferenceWrapper',
                             'params': first_stage}}}


def _vae_yaml(vae, unet):
  c0 = vae.block_out_channels[0]
  ddconfig = dict(double_z=True, z_channels=vae.latent_channels,
                  resolution=unet.sample_size * vae.downsample_factor,
                  in_channels=vae.in_channels, out_ch=vae.out_channels, ch=c0,
                  ch_mult=[c // c0 for c in vae.block_out_channels],
                  num_res_blocks=vae.layers_per_block, attn_resolutions=[], dropout=0.0)
  return {'embed_dim': vae.latent_channels, 'ddconfig': ddconfig,
          'lossconfig': {'target': 'torch.nn.Identity'}}
