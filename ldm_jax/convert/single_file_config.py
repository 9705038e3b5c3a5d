"""The network configs of a single-file checkpoint: from its shapes, its original YAML or a folder.

A single file from the wild holds weights only. Widths, depths, levels, channels and context size
are read off the tensors' shapes; what shapes cannot tell comes from the original LDM YAML when
given (heads, prediction type, VAE scale, betas) and otherwise from the SD family's conventions:
32 norm groups (LDM hard-codes them), 8 heads per level in SD 1.x, 64-wide heads in SD 2.x and in
both text encoders. A diffusers folder (`config=`) instead fixes every setting, as in diffusers'
own `from_single_file(config=...)`.

A file written by ldm_jax describes itself exactly: its safetensors `__metadata__` holds the four
diffusers configs as JSON (`METADATA_KEYS`), and the YAML written beside it holds them again in an
`ldm_jax:` section next to LDM's `model:` (which the original code and diffusers read). Either is
a "description": {'unet', 'vae', 'text_encoder', 'scheduler': config dict}, used like a folder.
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
# Description part -> the safetensors metadata key (and, less the prefix, the YAML section's key).
METADATA_KEYS = {'unet': 'ldm_jax.unet_config', 'vae': 'ldm_jax.vae_config',
                 'text_encoder': 'ldm_jax.text_encoder_config',
                 'scheduler': 'ldm_jax.scheduler_config'}
YAML_SECTION = 'ldm_jax'
_PREDICTION = {'eps': 'epsilon', 'v': 'v_prediction', 'x0': 'sample'}
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
  if not isinstance(params, dict) or 'unet_config' not in params:
    raise diffusers_lib.ConversionError(
        f'{name} has no model.params.unet_config: expected an LDM/Stability YAML such as '
        'v1-inference.yaml or v2-inference-v.yaml')
  section = config_yaml.get(YAML_SECTION)
  if section is None:
    return params, None, None
  if not isinstance(section, dict):
    raise diffusers_lib.ConversionError(f'{name}: its {YAML_SECTION}: section is not a mapping')
  description = _description(
      {part: section.get(key.removeprefix(YAML_SECTION + '.'))
       for part, key in METADATA_KEYS.items()}, f'{name} ({YAML_SECTION}: section)')
  if _ldm_model(*configs_of(description), description['scheduler']) != config_yaml['model']:
    return params, None, (f'its {YAML_SECTION}: section was ignored: model: was edited since '
                          'ldm_jax wrote it, so model: alone describes the model')
  return params, description, None


def description_from_metadata(metadata, name='the file'):
  """A safetensors file's `__metadata__` -> the description ldm_jax wrote there, or None."""
  if not any(key in metadata for key in METADATA_KEYS.values()):
    return None
  parts = {}
  for part, key in METADATA_KEYS.items():
    try:
      parts[part] = json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as e:
      raise diffusers_lib.ConversionError(
          f'{name}: its metadata {key} is not JSON ({e}): the file was altered; pass config= a '
          'diffusers folder (--config) that describes the model') from e
  return _description(parts, f'{name} (metadata)')


def _description(parts, name):
  missing = [METADATA_KEYS[part] for part, value in parts.items() if not isinstance(value, dict)]
  if missing:
    raise diffusers_lib.ConversionError(
        f'{name} lacks {", ".join(missing)} (or they are not mappings): it describes the model in '
        'part only; pass config= a diffusers folder (--config) that describes it whole')
  return parts


def describe(components):
  """The description of `components`: its networks' diffusers configs, its scheduler config."""
  parts = {'unet': components.unet[0].config.to_diffusers(),
           'vae': components.vae[0].config.to_diffusers(),
           'text_encoder': components.text_encoder[0].config.to_transformers(),
           'scheduler': dict(components.scheduler_config)}
  return json.loads(json.dumps(parts, default=_plain))  # plain JSON types, as read back


def _plain(value):
  if hasattr(value, 'tolist'):  # numpy scalars and arrays (trained_betas, ...)
    return value.tolist()
  raise TypeError(f'{value!r} ({type(value).__name__}) is not JSON serialisable')


def metadata(components):
  """The safetensors metadata (str -> JSON str) that describes `components` exactly."""
  description = describe(components)
  return {key: json.dumps(description[part], sort_keys=True)
          for part, key in METADATA_KEYS.items()}


def configs_of(description, **runtime):
  """(UNetConfig, VAEConfig, TextEncoderConfig) from a description (or a folder's configs)."""
  try:
    return (unet_lib.UNetConfig.from_diffusers(description['unet'], **runtime),
            vae_lib.VAEConfig.from_diffusers(description['vae'], **runtime),
            text_encoder_lib.TextEncoderConfig.from_transformers(description['text_encoder'],
                                                                 **runtime))
  except (ValueError, TypeError) as e:
    raise diffusers_lib.ConversionError(f'the configs describing the single file are not ones '
                                        f'ldm_jax builds: {e}') from e


def resolve_settings(model_type, original=None, folder=None, *, image_size=None,
                     prediction_type=None, scaling_factor=None, original_from='original config',
                     folder_from='config folder'):
  """Image size, prediction type and VAE scale: argument > YAML > folder or description > default.

  The image size never comes from the YAML: Stability's YAMLs say `image_size: 64` (512 px) for
  the 768 px v-prediction models too. The defaults follow the released models: SD 1.x and all
  inpainting models 512 px epsilon; SD 2.x 768 px v-prediction, or 512 px when told epsilon.
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
      (original_from, _PREDICTION[yaml.get('parameterization', 'eps')] if yaml else None),
      (folder_from, folder_prediction)],
                    'v_prediction' if v_model and (image_size or 768) >= 768 else 'epsilon')
  size = pick('image_size', [('argument', image_size), (folder_from, folder_size)],
              768 if v_model and prediction == 'v_prediction' else 512)
  scale = pick('scaling_factor', [
      ('argument', scaling_factor), (original_from, yaml.get('scale_factor')),
      (folder_from, folder.get('vae', {}).get('scaling_factor'))], DEFAULT_SCALING_FACTOR)
  return Settings(int(size), prediction, float(scale), sources)


def _count(state, pattern):
  return len({m[1] for k in state if (m := re.match(pattern, k))})


def unet_config(state, model_type, settings, vae_factor, original=None, **runtime):
  """A `UNetConfig` from the U-Net's diffusers-keyed shapes (and the YAML's heads)."""
  n = _count(state, r'down_blocks\.(\d+)\.')
  widths = tuple(state[f'down_blocks.{i}.resnets.0.conv1.weight'].shape[0] for i in range(n))
  attn = lambda part, i: f'{part}.{i}.attentions.0.proj_in.weight' in state
  first = next(k for k in sorted(state) if k.endswith('attn2.to_k.weight'))
  depth = tuple(
      max(1, _count(state, rf'down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.'))
      for i in range(n))
  layers = tuple(_count(state, rf'down_blocks\.{i}\.resnets\.(\d+)\.') for i in range(n))
  proj_in = state[first.split('.transformer_blocks.')[0] + '.proj_in.weight']
  yaml_unet = (original or {}).get('unet_config', {}).get('params', {})
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
  _check_yaml_unet(yaml_unet, kw)
  preset = unet_lib.UNetConfig.sd21 if model_type.family == 'sd2' else unet_lib.UNetConfig.sd15
  return _build(preset, 'unet', kw | runtime)


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
              'num_res_blocks': kw['layers_per_block'][0]}
  wrong = [f'{k}: YAML {yaml_unet[k]!r}, file {v!r}' for k, v in expected.items()
           if yaml_unet.get(k) is not None and _listify(yaml_unet[k]) != _listify(v)]
  if wrong:
    raise diffusers_lib.ConversionError('the original config does not describe this checkpoint\'s '
                                        'U-Net: ' + '; '.join(wrong))


def _listify(x):
  return list(x) if isinstance(x, (list, tuple)) else [x]


def vae_config(state, settings, **runtime):
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
  return _build(vae_lib.VAEConfig.sd15, 'vae', kw | runtime)


def text_config(state, model_type, **runtime):
  """A `TextEncoderConfig` from transformers-keyed shapes: CLIP-L or OpenCLIP-H conventions."""
  vocab, hidden = state['text_model.embeddings.token_embedding.weight'].shape
  kw = dict(vocab_size=vocab, hidden_size=hidden,
            intermediate_size=state['text_model.encoder.layers.0.mlp.fc1.weight'].shape[0],
            num_hidden_layers=_count(state, r'text_model\.encoder\.layers\.(\d+)\.'),
            num_attention_heads=max(1, hidden // _HEAD_WIDTH),
            max_position_embeddings=len(state['text_model.embeddings.position_embedding.weight']),
            with_projection='text_projection.weight' in state)
  if kw['with_projection']:
    kw['projection_dim'] = state['text_projection.weight'].shape[0]
  preset = (text_encoder_lib.TextEncoderConfig.openclip_h if model_type.text_encoder == 'openclip'
            else text_encoder_lib.TextEncoderConfig.sd15)
  return _build(preset, 'text_encoder', kw | runtime)


def _build(preset, name, kw):
  try:
    return preset(**kw)
  except (ValueError, TypeError) as e:
    raise diffusers_lib.ConversionError(
        f'{name}: the single file\'s shapes do not make a Stable Diffusion config ({e}); pass '
        'config= a diffusers folder that describes the model') from e


def scheduler_config(model_type, settings, original=None, folder=None):
  """The folder's scheduler config, or SD 1.5's PNDM / SD 2.1's DDIM one; our prediction type."""
  if folder is not None:
    return dict(folder['scheduler'], prediction_type=settings.prediction_type)
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
  """A diffusers folder's configs: {'unet', 'vae', 'text_encoder', 'scheduler': dict}."""
  names = {'unet': 'unet/config.json', 'vae': 'vae/config.json',
           'text_encoder': 'text_encoder/config.json',
           'scheduler': 'scheduler/scheduler_config.json'}
  missing = [p for p in names.values() if not os.path.isfile(os.path.join(folder, p))]
  if missing:
    raise diffusers_lib.ConversionError(f'config folder {folder} lacks {", ".join(missing)}')
  return {k: config_io.read_json(os.path.join(folder, p)) for k, p in names.items()}


def configs_from_folder(folder, settings, folder_from='config folder', **runtime):
  """(UNetConfig, VAEConfig, TextEncoderConfig) from a folder or a description (+ size, scale).

  The image size and VAE scale are the folder's unless `settings` took them from elsewhere (an
  argument, the YAML); `folder_from` is the folder's source name in `settings.sources`.
  """
  vae_kw = {}
  if settings.sources['scaling_factor'] != folder_from:
    vae_kw['scaling_factor'] = settings.scaling_factor
  if settings.sources['image_size'] != folder_from:
    vae_kw['sample_size'] = settings.image_size
  unet, vae, text = configs_of(folder, **runtime)
  vae = dataclasses.replace(vae, **vae_kw)
  if 'sample_size' in vae_kw:
    unet = dataclasses.replace(unet, sample_size=settings.image_size // vae.downsample_factor)
  return unet, vae, text


def original_config(components):
  """The LDM YAML (as a dict) describing `components`, for the original code and for diffusers.

  Beside LDM's `model:` it holds the exact configs in an `ldm_jax:` section, which LDM's code and
  diffusers ignore and `read_yaml` reads back: `model:` cannot say everything (norm groups, the
  scheduler's class and options, the VAE's sample size, ...).
  """
  description = describe(components)
  unet, vae, text = (x[0].config for x in (
      components.unet, components.vae, components.text_encoder))
  return {'model': _ldm_model(unet, vae, text, description['scheduler']),
          YAML_SECTION: {key.removeprefix(YAML_SECTION + '.'): description[part]
                         for part, key in METADATA_KEYS.items()}}


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


def _unet_yaml(unet):
  """openaimodel.UNetModel's parameters; it is symmetric with one depth and one head rule."""
  attention = [t == 'CrossAttnDownBlock2D' for t in unet.down_block_types]
  if ([t == 'CrossAttnUpBlock2D' for t in unet.up_block_types] != attention[::-1]
      or len(set(unet.layers_per_block)) != 1
      or len(set(unet.transformer_layers_per_block)) != 1):
    raise diffusers_lib.ConversionError('the LDM U-Net is symmetric, with one depth at every '
                                        'level; this U-Net is not')
  c0 = unet.block_out_channels[0]
  params = dict(
      image_size=unet.sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
      model_channels=c0, channel_mult=[c // c0 for c in unet.block_out_channels],
      num_res_blocks=unet.layers_per_block[0], context_dim=unet.cross_attention_dim,
      attention_resolutions=[2 ** i for i, a in enumerate(attention) if a],
      transformer_depth=unet.transformer_layers_per_block[0],
      use_linear_in_transformer=unet.use_linear_projection, use_spatial_transformer=True)
  heads = set(unet.num_attention_heads)
  widths = {c // h for c, h in zip(unet.block_out_channels, unet.num_attention_heads)}
  if len(heads) == 1:
    return params | dict(num_heads=heads.pop(), num_head_channels=-1)
  if len(widths) == 1:
    return params | dict(num_heads=-1, num_head_channels=widths.pop())
  raise diffusers_lib.ConversionError('the LDM U-Net needs equal heads or equal head widths')


def _vae_yaml(vae, unet):
  c0 = vae.block_out_channels[0]
  ddconfig = dict(double_z=True, z_channels=vae.latent_channels,
                  resolution=unet.sample_size * vae.downsample_factor,
                  in_channels=vae.in_channels, out_ch=vae.out_channels, ch=c0,
                  ch_mult=[c // c0 for c in vae.block_out_channels],
                  num_res_blocks=vae.layers_per_block, attn_resolutions=[], dropout=0.0)
  return {'embed_dim': vae.latent_channels, 'ddconfig': ddconfig,
          'lossconfig': {'target': 'torch.nn.Identity'}}
