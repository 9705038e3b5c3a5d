"""Whole CLIP models in, torch-free: transformers `CLIPModel` folders and open_clip checkpoints.

Both become our text tower with its `text_projection` (models.text_encoder), our image tower
with its `visual_projection` (models.image_encoder) and the learned `logit_scale`. A transformers
state dict maps onto the two towers through the common key table (`tables.to_flax`) under the
`text_model.` / `vision_model.` prefixes; an open_clip state dict is first renamed into the
transformers keys by `OPEN_CLIP_TABLE` (the fused attention `in_proj` split into q/k/v, the
(width, dim) `x @ P` projections transposed into linear weights). Every missing, unexpected or
mis-shaped key of either tower is listed in one error.
"""

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert import compvis
from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import single_file
from ldm_jax.convert import tables
from ldm_jax.models import build
from ldm_jax.models import config_io
from ldm_jax.models import image_encoder
from ldm_jax.models import text_encoder

OPEN_CLIP_FILES = ('open_clip_model.safetensors', 'open_clip_pytorch_model.safetensors',
                   'open_clip_pytorch_model.bin')
# Leaves the key table has no rule for (not a kernel, scale, bias or embedding): read as they are.
_RAW_LEAVES = {('vision_model', 'embeddings', 'class_embedding'):
               'vision_model.embeddings.class_embedding', ('logit_scale',): 'logit_scale'}
_BUFFER = re.compile(r'(^|\.)(position_ids|attn_mask)$')  # buffers some files carry


@dataclasses.dataclass
class CLIPModel:
  """A CLIP model: each tower is a `(module, params)` pair.

  Attributes:
    text: (text_encoder.CLIPTextModel with `with_projection`, params): `.text_embeds`.
    vision: (image_encoder.CLIPVisionModel with `with_projection`, params): `.image_embeds`.
    logit_scale: the stored log of the inverse temperature (logits = exp(logit_scale) * cosine).
    kind: 'transformers' or 'open_clip': where the weights came from.
    preprocess: the source's image preprocessing settings as stored (`preprocessor_config.json`,
      or open_clip's `preprocess_cfg`), or None when the source has none.
  """
  text: tuple
  vision: tuple
  logit_scale: float
  kind: str
  preprocess: Any = None


def load_clip(path, dtype=jnp.float32, param_dtype=None, model=None):
  """Loads a CLIP model from a transformers folder or an open_clip checkpoint.

  Args:
    path: a transformers `CLIPModel` folder (config.json + model.safetensors or
      pytorch_model.bin); an open_clip checkpoint file; or a folder holding one
      (`open_clip_model.safetensors`, `open_clip_pytorch_model.bin`). A folder with both (as the
      LAION repositories ship) loads the transformers weights.
    dtype: compute dtype of the towers.
    param_dtype: storage dtype of the parameters (default: `dtype`).
    model: for an open_clip checkpoint without an `open_clip_config.json` beside it: the open_clip
      architecture name (a key of OPEN_CLIP_MODELS, e.g. 'ViT-H-14') or its model_cfg dict.

  Returns:
    CLIPModel.

  Raises:
    diffusers.ConversionError: no CLIP model at `path`, or an architecture we cannot build.
    tables.WeightsMismatchError: weights that do not fit the config, listing every key.
  """
  kw = dict(dtype=dtype, param_dtype=param_dtype or dtype)
  if os.path.isdir(path):
    config = os.path.join(path, 'config.json')
    if os.path.isfile(config) and _read_json(config).get('model_type') == 'clip':
      return load_transformers_clip(path, **kw)
    found = [os.path.join(path, f) for f in OPEN_CLIP_FILES
             if os.path.isfile(os.path.join(path, f))]
    if not found:
      raise diffusers_lib.ConversionError(
          f'{path} holds no CLIP model: expected a transformers CLIPModel folder (config.json '
          f'with model_type "clip" and model.safetensors) or an open_clip checkpoint '
          f'({" or ".join(OPEN_CLIP_FILES)})')
    path = found[0]
  return load_open_clip(path, model=model, **kw)


def load_transformers_clip(folder, dtype=jnp.float32, param_dtype=None):
  """A transformers `CLIPModel` folder -> CLIPModel (see `load_clip`)."""
  raw = _read_json(os.path.join(folder, 'config.json'))
  if raw.get('model_type') != 'clip':
    raise diffusers_lib.ConversionError(
        f'{folder}/config.json describes a {raw.get("model_type")!r} model, not a CLIPModel '
        '(model_type "clip"); a tower alone loads with convert.diffusers.load_text_encoder or '
        'convert.clip.load_vision_model')
  kw = dict(dtype=dtype, param_dtype=param_dtype or dtype)
  projection = dict(with_projection=True, projection_dim=raw.get('projection_dim', 512))
  # CLIPModel's projections are config.projection_dim wide, whatever the towers' configs say.
  text = text_encoder.TextEncoderConfig(
      **(_architecture(raw, 'text', text_encoder.TextEncoderConfig) | projection | kw))
  vision = image_encoder.VisionConfig(
      **(_architecture(raw, 'vision', image_encoder.VisionConfig) | projection | kw))
  preprocess = os.path.join(folder, 'preprocessor_config.json')
  return _assemble(read_transformers_weights(folder), text, vision, 'transformers',
                   _read_json(preprocess) if os.path.isfile(preprocess) else None)


def _architecture(raw, tower, cls):
  """One tower's architecture from a CLIPModel config.json: `<tower>_config`, updated by the
  `<tower>_config_dict` older transformers wrote beside it (which wins, as in CLIPConfig)."""
  sub = dict(raw.get(f'{tower}_config') or {}) | dict(raw.get(f'{tower}_config_dict') or {})
  return _known(sub, cls)


def _known(raw, cls):
  """The config keys that are `cls`'s architecture fields. A CLIP tower's architecture is wholly
  in them; the rest is what every PretrainedConfig dumps (num_beams, id2label, ...)."""
  fields = ({f.name for f in dataclasses.fields(cls)} - set(config_io.RUNTIME_FIELDS)
            - {'with_projection', 'pooling'})
  return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}


def load_vision_model(folder, dtype=jnp.float32, param_dtype=None):
  """A transformers `CLIPVisionModelWithProjection` (or `CLIPVisionModel`) folder, such as an
  unCLIP pipeline's `image_encoder/` -> (image_encoder.CLIPVisionModel, params)."""
  raw = _read_json(os.path.join(folder, 'config.json'))
  config = image_encoder.VisionConfig(**(_known(raw, image_encoder.VisionConfig) | dict(
      dtype=dtype, param_dtype=param_dtype or dtype,
      with_projection='CLIPVisionModel' not in (raw.get('architectures') or []))))
  module = image_encoder.CLIPVisionModel(config)
  state = {(k if k.startswith(('vision_model.', 'visual_projection.')) else 'vision_model.' + k): v
           for k, v in read_transformers_weights(folder).items() if not _BUFFER.search(k)}
  abstract = _split_towers({'vision': _abstract_vision(module)})
  params = _to_flax(state, abstract, 'image_encoder')
  return module, jax.tree.map(jnp.asarray, _join_towers(params)['vision'])


def read_transformers_weights(folder):
  """A transformers folder's tensors: model.safetensors (single or sharded), else
  pytorch_model.bin (single or sharded) through the torch-free unpickler.

  Returns:
    {key: numpy array}.
  """
  safetensors_files = [f for f in ('model.safetensors', 'model.safetensors.index.json')
                       if os.path.isfile(os.path.join(folder, f))]
  if safetensors_files:
    return diffusers_lib.read_weights(folder, 'text_encoder')  # 'model' is its file name
  single = os.path.join(folder, 'pytorch_model.bin')
  if os.path.isfile(single):
    return single_file.read_checkpoint(single)[0]
  index = single + '.index.json'
  if os.path.isfile(index):
    state = {}
    for shard in sorted(set(_read_json(index)['weight_map'].values())):
      state.update(single_file.read_checkpoint(os.path.join(folder, shard))[0])
    return state
  raise diffusers_lib.ConversionError(
      f'{folder} has no weights: expected model.safetensors, a sharded model.safetensors.index'
      '.json, or pytorch_model.bin')


# ----------------------------------------------------------------------------- open_clip


def load_open_clip(path, model=None, dtype=jnp.float32, param_dtype=None):
  """An open_clip checkpoint file -> CLIPModel (see `load_clip`).

  The architecture comes from `model` (a name of OPEN_CLIP_MODELS or a model_cfg dict), else
  from the `open_clip_config.json` beside the file (as the LAION repositories ship it).
  """
  beside = os.path.join(os.path.dirname(os.path.abspath(path)), 'open_clip_config.json')
  file_config = _read_json(beside) if os.path.isfile(beside) else {}
  if isinstance(model, str):
    if model not in OPEN_CLIP_MODELS:
      raise diffusers_lib.ConversionError(
          f'unknown open_clip model {model!r}: use one of {sorted(OPEN_CLIP_MODELS)}, or pass '
          'its model_cfg dict (open_clip\'s model_configs/<name>.json)')
    model = OPEN_CLIP_MODELS[model]
  model_cfg = model or file_config.get('model_cfg')
  if not model_cfg:
    raise diffusers_lib.ConversionError(
        f'{path}: which open_clip architecture is it? There is no open_clip_config.json beside '
        f'it: pass model= one of {sorted(OPEN_CLIP_MODELS)} (e.g. "ViT-H-14" for SD 2.x / '
        'MLPerf), or a model_cfg dict')
  text, vision = open_clip_configs(model_cfg, dtype=dtype, param_dtype=param_dtype or dtype)
  state = open_clip_state(single_file.read_checkpoint(path)[0])
  return _assemble(state, text, vision, 'open_clip', file_config.get('preprocess_cfg') or {})


# open_clip's model_configs/<name>.json for the towers SD and its benchmarks use. OpenAI's own
# weights loaded through open_clip run QuickGELU ('ViT-L-14-quickgelu'); LAION's run GELU.
_L14 = {'embed_dim': 768, 'vision_cfg': {'image_size': 224, 'layers': 24, 'width': 1024,
                                         'patch_size': 14},
        'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 768, 'heads': 12,
                     'layers': 12}}
OPEN_CLIP_MODELS = {
    'ViT-L-14': _L14,
    'ViT-L-14-quickgelu': _L14 | {'quick_gelu': True},
    'ViT-H-14': {'embed_dim': 1024,
                 'vision_cfg': {'image_size': 224, 'layers': 32, 'width': 1280, 'head_width': 80,
                                'patch_size': 14},
                 'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 1024,
                              'heads': 16, 'layers': 24}},
    'ViT-g-14': {'embed_dim': 1024,
                 'vision_cfg': {'image_size': 224, 'layers': 40, 'width': 1408, 'head_width': 88,
                                'mlp_ratio': 4.3637, 'patch_size': 14},
                 'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 1024,
                              'heads': 16, 'layers': 24}},
    'ViT-bigG-14': {'embed_dim': 1280,
                    'vision_cfg': {'image_size': 224, 'layers': 48, 'width': 1664,
                                   'head_width': 104, 'mlp_ratio': 4.9231, 'patch_size': 14},
                    'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 1280,
                                 'heads': 20, 'layers': 32}},
}
# model_cfg settings we read; any other setting must keep open_clip's default (a falsy value or
# the one listed here), else the tower is one we do not build (CoCa, SigLIP, timm or HF towers,
# layer scale, attention pooling, ...).
_OPEN_CLIP_READ = {'model': {'embed_dim', 'quick_gelu', 'vision_cfg', 'text_cfg', 'cast_dtype',
                             'init_logit_scale'},
                   'vision_cfg': {'image_size', 'layers', 'width', 'head_width', 'mlp_ratio',
                                  'patch_size', 'patch_dropout', 'output_tokens'},
                   'text_cfg': {'context_length', 'vocab_size', 'width', 'heads', 'layers',
                                'mlp_ratio', 'output_tokens', 'hf_tokenizer_name',
                                'tokenizer_kwargs', 'tokenizer_mode', 'tokenizer_type'}}
_OPEN_CLIP_DEFAULTS = {'pool_type': ('tok', 'argmax'), 'pos_embed_type': 'learnable',
                       'proj_type': 'linear', 'text_arch': 'clip', 'block_type': 'default',
                       'timm_pool': 'avg', 'timm_proj': 'linear', 'hf_proj_type': 'mlp',
                       'hf_pooler_type': 'mean_pooler', 'hf_model_pretrained': True,
                       'attn_pooler_queries': 256, 'attn_pooler_heads': 8,
                       'tiktoken_name': 'cl100k_base'}


def open_clip_configs(model_cfg, **runtime):
  """open_clip's model_cfg -> (TextEncoderConfig, VisionConfig), both with their projection.

  Args:
    model_cfg: open_clip's model config ({'embed_dim', 'vision_cfg', 'text_cfg', ...}).
    **runtime: dtype, param_dtype, attention_impl, remat.

  Raises:
    diffusers.ConversionError: a setting that selects a tower we do not build.
  """
  _check_open_clip_cfg(model_cfg)
  v, t = model_cfg['vision_cfg'], model_cfg['text_cfg']
  act = 'quick_gelu' if model_cfg.get('quick_gelu') else 'gelu'
  size = v.get('image_size', 224)
  size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
  if not isinstance(size, int) or not isinstance(v.get('layers', 12), int):
    raise diffusers_lib.ConversionError(
        f'open_clip vision_cfg {v}: only square ViTs are built (an int image_size and layers)')
  common = dict(hidden_act=act, projection_dim=model_cfg['embed_dim'], with_projection=True)
  width, t_width = v.get('width', 768), t.get('width', 512)
  vision = image_encoder.VisionConfig(
      hidden_size=width, intermediate_size=int(width * v.get('mlp_ratio', 4.0)),
      num_hidden_layers=v.get('layers', 12), num_attention_heads=width // v.get('head_width', 64),
      image_size=size, patch_size=v.get('patch_size', 16), **common, **runtime)
  text = text_encoder.TextEncoderConfig(
      vocab_size=t.get('vocab_size', 49408), hidden_size=t_width,
      intermediate_size=int(t_width * t.get('mlp_ratio', 4.0)),
      num_hidden_layers=t.get('layers', 12), num_attention_heads=t.get('heads', 8),
      max_position_embeddings=t.get('context_length', 77),
      eos_token_id=2,  # open_clip pools at argmax(ids): the end-of-text token has the top id
      **common, **runtime)
  return text, vision


def _check_open_clip_cfg(model_cfg):
  """Raises ConversionError listing every model_cfg setting we cannot reproduce."""
  problems = []
  for part, cfg in (('model', model_cfg), ('vision_cfg', model_cfg.get('vision_cfg') or {}),
                    ('text_cfg', model_cfg.get('text_cfg') or {})):
    for key, value in cfg.items():
      allowed = _OPEN_CLIP_DEFAULTS.get(key, ())
      allowed = allowed if isinstance(allowed, tuple) else (allowed,)
      if key not in _OPEN_CLIP_READ[part] and value and value not in allowed:
        problems.append(f'{part}.{key}={value!r}')
  if 'embed_dim' not in model_cfg or 'vision_cfg' not in model_cfg or 'text_cfg' not in model_cfg:
    problems.append('embed_dim, vision_cfg and text_cfg are all required')
  if problems:
    raise diffusers_lib.ConversionError(
        'this open_clip model is not a plain CLIP ViT that ldm_jax builds: '
        + '; '.join(problems) + f'. Supported: {sorted(OPEN_CLIP_MODELS)} and their kin')


_IDENTITY = tables.identity
# open_clip key <-> transformers CLIPModel key, with the transform to transformers. `{i}`: a
# resblock (encoder layer); `{leaf}`: weight or bias; a `{qkv}` row makes three keys of one.
# The text rows are compvis.OPENCLIP_TABLE's (SD 2.x's OpenCLIP text tower), the vision rows
# their `visual.` twins plus the ViT's own.
OPEN_CLIP_TABLE = tuple((ours, theirs, fns[0]) for ours, theirs, fns in compvis.OPENCLIP_TABLE) + (
    ('visual.class_embedding', 'vision_model.embeddings.class_embedding', _IDENTITY),
    ('visual.positional_embedding', 'vision_model.embeddings.position_embedding.weight',
     _IDENTITY),
    ('visual.conv1.weight', 'vision_model.embeddings.patch_embedding.weight', _IDENTITY),
    ('visual.ln_pre.{leaf}', 'vision_model.pre_layrnorm.{leaf}', _IDENTITY),
) + tuple(('visual.' + ours, theirs.replace('text_model.', 'vision_model.'), fns[0])
          for ours, theirs, fns in compvis.OPENCLIP_TABLE if ours.startswith('transformer.')) + (
    ('visual.ln_post.{leaf}', 'vision_model.post_layernorm.{leaf}', _IDENTITY),
    ('visual.proj', 'visual_projection.weight', compvis.projection_t),
    ('logit_scale', 'logit_scale', _IDENTITY),
)
_FIELDS = {'i': r'(?P<i>\d+)', 'leaf': r'(?P<leaf>weight|bias)'}
_OPEN_CLIP_REGEXES = tuple(
    re.compile(''.join(_FIELDS[p] if n % 2 else re.escape(p)
                       for n, p in enumerate(re.split(r'\{(\w+)\}', ours))))
    for ours, _, _ in OPEN_CLIP_TABLE)


def open_clip_state(state):
  """An open_clip state dict -> transformers CLIPModel keys, through OPEN_CLIP_TABLE.

  A DataParallel `module.` prefix is removed and the `attn_mask` buffer dropped; keys outside the
  table keep their name, so that loading reports them as unexpected.
  """
  out = {}
  for key, value in state.items():
    key = key.removeprefix('module.')
    if _BUFFER.search(key):
      continue
    for (_, theirs, fn), regex in zip(OPEN_CLIP_TABLE, _OPEN_CLIP_REGEXES):
      m = regex.fullmatch(key)
      if m:
        values = fn(np.asarray(value))
        names = [theirs.format(**m.groupdict(), qkv=q) for q in 'qkv'] if '{qkv}' in theirs else [
            theirs.format(**m.groupdict())]
        out.update(zip(names, values if len(names) > 1 else (values,)))
        break
    else:
      out[key] = value
  return out


# ----------------------------------------------------------------------------- both formats


def _assemble(state, text_config, vision_config, kind, preprocess):
  """The two towers and the logit scale from a transformers-keyed CLIPModel state dict."""
  text = text_encoder.CLIPTextModel(text_config)
  vision = image_encoder.CLIPVisionModel(vision_config)
  state = {k: v for k, v in state.items() if not _BUFFER.search(k)}
  abstract = _split_towers({'text': build.abstract_params(text),
                            'vision': _abstract_vision(vision),
                            'logit_scale': jax.ShapeDtypeStruct((), jnp.float32)})
  params = _join_towers(_to_flax(state, abstract, 'clip'))
  logit_scale = float(np.asarray(params.pop('logit_scale'), np.float32))
  params = jax.tree.map(jnp.asarray, params)
  return CLIPModel((text, params['text']), (vision, params['vision']), logit_scale, kind,
                   preprocess)


def _abstract_vision(module):
  inputs = image_encoder.example_inputs(module.config)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *inputs))['params']


def _split_towers(tree):
  """{'text': ..., 'vision': ...} -> transformers' CLIPModel nesting (`text_model`,
  `text_projection`, `vision_model`, `visual_projection`)."""
  out = {k: v for k, v in tree.items() if k not in ('text', 'vision')}
  for tower, projection, prefix in (('text', 'text_projection', 'text_model'),
                                    ('vision', 'visual_projection', 'vision_model')):
    if tower in tree:
      inner = dict(tree[tower])
      if projection in inner:
        out[projection] = inner.pop(projection)
      out[prefix] = inner
  return out


def _join_towers(tree):
  """The inverse of `_split_towers`."""
  out = {k: v for k, v in tree.items()
         if k not in ('text_model', 'text_projection', 'vision_model', 'visual_projection')}
  for tower, projection, prefix in (('text', 'text_projection', 'text_model'),
                                    ('vision', 'visual_projection', 'vision_model')):
    if prefix in tree:
      out[tower] = dict(tree[prefix]) | ({projection: tree[projection]}
                                         if projection in tree else {})
  return out


def _to_flax(state, abstract, name):
  """`tables.to_flax` plus the leaves it has no rule for (_RAW_LEAVES), in one error."""
  state, abstract = dict(state), jax.tree.map(lambda x: x, abstract)
  missing, mis_shaped, raw = [], [], {}
  for path, key in _RAW_LEAVES.items():
    node = abstract
    for k in path[:-1]:
      node = node.get(k, {})
    if path[-1] not in node:
      continue
    target = node.pop(path[-1])
    if key not in state:
      missing.append(key)
    elif np.shape(state[key]) != target.shape:
      mis_shaped.append(f'{key}: file has {np.shape(state.pop(key))}, model expects '
                        f'{target.shape}')
    else:
      raw[path] = np.asarray(state.pop(key), target.dtype)
  try:
    params = tables.to_flax(state, abstract, name=name)
  except tables.WeightsMismatchError as e:
    raise tables.WeightsMismatchError(_with_problems(str(e), missing, mis_shaped)) from None
  if missing or mis_shaped:
    raise tables.WeightsMismatchError(_with_problems(
        f'{name}: the weights do not fit this model.', missing, mis_shaped))
  for path, value in raw.items():
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return params


def _with_problems(message, missing, mis_shaped):
  lines = [message]
  for title, keys in (('more missing', missing), ('more mis-shaped', mis_shaped)):
    if keys:
      lines.append(f'  {len(keys)} {title}:')
      lines.extend(f'    {k}' for k in keys)
  return '\n'.join(lines)


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise diffusers_lib.ConversionError(f'{path} is not a readable JSON file ({e})') from e
