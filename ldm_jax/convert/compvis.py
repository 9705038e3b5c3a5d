"""The original CompVis/Stability single-file key layouts <-> diffusers keys (SD 1.x/2.x, SDXL).

SD 1.x/2.x files are LatentDiffusion's (`cond_stage_model.*` text encoder); SDXL files are
Stability generative-models' (SGM) DiffusionEngine's: the same U-Net and VAE layout (plus the
`label_emb.0` added-conditioning MLP), and the text encoders under `conditioner.embedders.N.`.

Every function here is a pure transform of `{key: numpy array}` dicts. Module prefixes are
renamed through explicit tables (`unet_table`, `vae_table`, ...), longest prefix first, and the
OpenCLIP text tower key by key through `OPENCLIP_TABLE`; the few leaves that change layout are
named: the VAE's 1x1 attention convs (squeezed to linear and back), OpenCLIP's fused `in_proj`
(`split_in_proj`, `fuse_in_proj`), its `text_projection` (`projection_t`) and, in SD 2.x only,
its last resblock (dropped: SD 2.x conditions on the penultimate layer; SDXL's bigG keeps all, as
its pooled embedding comes from the last).
"""

import dataclasses
import re

import numpy as np

from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import tables

UNET_PREFIX = 'model.diffusion_model.'
VAE_PREFIXES = ('first_stage_model.', 'vae.')
CLIP_PREFIX = 'cond_stage_model.transformer.'
OPENCLIP_PREFIX = 'cond_stage_model.model.'
# SDXL (SGM): CLIP-L in transformers' layout, OpenCLIP bigG in open_clip's; the refiner has bigG
# alone, as its embedder 0.
SGM_PREFIX = 'conditioner.embedders.'
SGM_CLIP_PREFIX = 'conditioner.embedders.0.transformer.'
SGM_OPENCLIP_PREFIX = 'conditioner.embedders.1.model.'
SGM_REFINER_OPENCLIP_PREFIX = 'conditioner.embedders.0.model.'
EMA_PREFIX = 'model_ema.'
_CONV_IN = UNET_PREFIX + 'input_blocks.0.0.weight'
# Checkpoint entries that are no network parameter: LatentDiffusion's noise-schedule buffers,
# the EMA bookkeeping, CLIP's position ids, OpenCLIP's contrastive temperature and causal mask,
# SGM's denoiser sigmas.
_BUFFERS = re.compile(
    r'^(betas|alphas_cumprod(_prev)?|sqrt_(recip(m1)?_)?alphas_cumprod'
    r'|(sqrt|log)_one_minus_alphas_cumprod|posterior_\w+|logvar|lvlb_weights'
    r'|model_ema\.(decay|num_updates)|.*position_ids|denoiser\.(log_)?sigmas'
    r'|(cond_stage_model|conditioner\.embedders\.\d+)\.model\.(logit_scale|attn_mask))$')

_RESNET = (('in_layers.0', 'norm1'), ('in_layers.2', 'conv1'), ('emb_layers.1', 'time_emb_proj'),
           ('out_layers.0', 'norm2'), ('out_layers.3', 'conv2'),
           ('skip_connection', 'conv_shortcut'))
_VAE_RESNET = (('nin_shortcut', 'conv_shortcut'),)
_VAE_ATTENTION = (('norm', 'group_norm'), ('q', 'to_q'), ('k', 'to_k'), ('v', 'to_v'),
                  ('proj_out', 'to_out.0'))


_FAMILY_NAMES = {'sd1': 'SD 1.x', 'sd2': 'SD 2.x', 'sdxl': 'SDXL', 'sdxl_refiner': 'SDXL refiner'}


@dataclasses.dataclass(frozen=True)
class ModelType:
  """What a single file holds: the SD generation, inpainting or not, and its text encoder(s)."""
  family: str  # 'sd1', 'sd2', 'sdxl' or 'sdxl_refiner'
  inpainting: bool
  # 'clip' (OpenAI CLIP-L), 'openclip' (OpenCLIP-H in SD 2.x, bigG in the SDXL refiner) or
  # 'clip+openclip' (SDXL: CLIP-L and OpenCLIP-bigG)
  text_encoder: str

  @property
  def is_xl(self):
    return self.family in ('sdxl', 'sdxl_refiner')

  def __str__(self):
    plural = 's' if '+' in self.text_encoder else ''
    return (f'{_FAMILY_NAMES[self.family]}{" inpainting" if self.inpainting else ""} '
            f'({self.text_encoder} text encoder{plural})')


def text_layouts(model_type):
  """{component: (key prefix, 'clip' or 'openclip' layout)} of a file's text encoders."""
  if model_type.family == 'sdxl':
    return {'text_encoder': (SGM_CLIP_PREFIX, 'clip'),
            'text_encoder_2': (SGM_OPENCLIP_PREFIX, 'openclip')}
  if model_type.family == 'sdxl_refiner':
    return {'text_encoder_2': (SGM_REFINER_OPENCLIP_PREFIX, 'openclip')}
  if model_type.text_encoder == 'openclip':
    return {'text_encoder': (OPENCLIP_PREFIX, 'openclip')}
  return {'text_encoder': (CLIP_PREFIX, 'clip')}


def detect_model_type(state):
  """Tells SD 1.x, 2.x, SDXL, the SDXL refiner and the inpainting variants apart by their keys;
  refuses anything else.

  Raises:
    diffusers.ConversionError: naming what the file looks like instead.
  """
  if _CONV_IN not in state:
    prefixes = sorted({k.split('.')[0] for k in state})[:8]
    raise diffusers_lib.ConversionError(
        f'unknown model type: no Stable Diffusion U-Net ({_CONV_IN}) among {len(state)} tensors '
        f'(top-level names: {", ".join(prefixes) or "none"}); expected an SD 1.x/2.x or SDXL '
        'single file')
  in_channels = state[_CONV_IN].shape[1]
  if in_channels not in (4, 9):
    raise diffusers_lib.ConversionError(
        f'unknown model type: the U-Net takes {in_channels} input channels; ldm_jax reads '
        'text-to-image (4) and inpainting (9) models, not depth, upscaling or pix2pix variants')
  family = None
  if any(k.startswith(SGM_PREFIX) for k in state):
    family = _sgm_family(state)
    text = 'clip+openclip' if family == 'sdxl' else 'openclip'
  elif any(k.startswith(OPENCLIP_PREFIX) for k in state):
    text = 'openclip'
  elif any(k.startswith(CLIP_PREFIX) for k in state):
    text = 'clip'
  else:
    raise diffusers_lib.ConversionError(
        f'the file has no text encoder ({CLIP_PREFIX}* or {OPENCLIP_PREFIX}*): a Stable Diffusion '
        'single file holds all three networks (SDXL: conditioner.embedders.*)')
  if not any(k.startswith(VAE_PREFIXES) for k in state):
    raise diffusers_lib.ConversionError(f'the file has no VAE ({VAE_PREFIXES[0]}*)')
  return ModelType(family or ('sd2' if text == 'openclip' else 'sd1'), in_channels == 9, text)


def _sgm_family(state):
  """'sdxl' or 'sdxl_refiner' from an SGM file's embedders, as diffusers' loader tells them."""
  has = lambda prefix: any(k.startswith(prefix) for k in state)
  if has(SGM_OPENCLIP_PREFIX):
    if not has(SGM_CLIP_PREFIX):
      raise diffusers_lib.ConversionError(
          f'an SDXL checkpoint with OpenCLIP bigG ({SGM_OPENCLIP_PREFIX}*) but no CLIP-L text '
          f'encoder ({SGM_CLIP_PREFIX}*): the file is incomplete')
    return 'sdxl'
  if has(SGM_REFINER_OPENCLIP_PREFIX):
    return 'sdxl_refiner'
  embedders = sorted({'.'.join(k.split('.')[:4]) for k in state if k.startswith(SGM_PREFIX)})
  raise diffusers_lib.ConversionError(
      f'an SDXL-style checkpoint (conditioner.embedders.*) without OpenCLIP bigG: it has '
      f'{", ".join(embedders[:4])}; an SDXL base file has {SGM_CLIP_PREFIX}* and '
      f'{SGM_OPENCLIP_PREFIX}*, the SDXL refiner {SGM_REFINER_OPENCLIP_PREFIX}*')


def ema_key(key):
  """'model.diffusion_model.out.0.weight' -> 'model_ema.diffusion_modelout0weight' (LitEma)."""
  return EMA_PREFIX + key[len('model.'):].replace('.', '')


def select_ema(state, use_ema=True):
  """Puts the EMA U-Net weights in place of the raw ones (if asked and present); drops model_ema.*.

  Returns:
    (state, status) with status 'used', 'not used' (present, use_ema=False) or 'absent'.

  Raises:
    diffusers.ConversionError: some but not all U-Net weights have an EMA copy.
  """
  unet_keys = [k for k in state if k.startswith(UNET_PREFIX)]
  with_ema = [k for k in unet_keys if ema_key(k) in state]
  out = {k: v for k, v in state.items() if not k.startswith(EMA_PREFIX)}
  if not with_ema:
    return out, 'absent'
  if not use_ema:
    return out, 'not used'
  if len(with_ema) != len(unet_keys):
    missing = sorted(set(unet_keys) - set(with_ema))
    raise diffusers_lib.ConversionError(
        f'{len(missing)} of {len(unet_keys)} U-Net weights have no EMA copy (e.g. '
        f'{ema_key(missing[0])}); load with use_ema=False for the raw weights')
  out.update({k: state[ema_key(k)] for k in unet_keys})
  return out, 'used'


def split(state, model_type):
  """{key: array} -> ({'unet'|'vae'|'text_encoder'|'text_encoder_2': {unprefixed key: array}},
  ignored keys); the text encoders are those `text_layouts(model_type)` names."""
  vae_prefix = next(p for p in VAE_PREFIXES if any(k.startswith(p) for k in state))
  prefixes = {'unet': UNET_PREFIX, 'vae': vae_prefix} | {
      name: prefix for name, (prefix, _) in text_layouts(model_type).items()}
  parts, ignored = {name: {} for name in prefixes}, []
  for key, value in state.items():
    name = next((n for n, p in prefixes.items() if key.startswith(p)), None)
    if name is None or _BUFFERS.match(key):
      ignored.append(key)
    else:
      parts[name][key[len(prefixes[name]):]] = value
  return parts, ignored


def _translate(state, table, keep_unmatched=True):
  """Renames keys by their longest module prefix in `table` ({old: (new, inner renames)}).

  Unmatched keys are kept under their own name (so that loading reports them as unexpected), or
  with `keep_unmatched=False` are an error (a network this layout cannot hold).
  """
  out, unmatched = {}, []
  for key, value in state.items():
    parts = key.split('.')
    for n in range(len(parts) - 1, 0, -1):
      old = '.'.join(parts[:n])
      if old in table:
        new, inner = table[old]
        rest = '.'.join(parts[n:])
        for a, b in inner:
          if rest.startswith(a + '.'):
            rest = b + rest[len(a):]
            break
        out[f'{new}.{rest}'] = value
        break
    else:
      unmatched.append(key)
      out[key] = value
  if not keep_unmatched:
    _check_placed(unmatched)
  return out


def _check_placed(unmatched):
  """Raises ConversionError when some parameters have no key in the single-file layout."""
  if unmatched:
    raise diffusers_lib.ConversionError(
        f'{len(unmatched)} parameters have no place in the single-file layout, e.g. '
        f'{unmatched[:3]}')


def _invert(table):
  return {new: (old, tuple((b, a) for a, b in inner)) for old, (new, inner) in table.items()}


def unet_layers_per_block(ldm_unet):
  """Resnets per level, read off where the downsamplers (`input_blocks.i.0.op`) sit."""
  inputs = {int(k.split('.')[1]) for k in ldm_unet if k.startswith('input_blocks.')}
  ops = sorted({int(k.split('.')[1]) for k in ldm_unet
                if re.match(r'input_blocks\.\d+\.0\.op\.', k)})
  bounds = [0] + ops + [max(inputs, default=0) + 1]
  return tuple(b - a - 1 for a, b in zip(bounds, bounds[1:]))


def unet_table(layers_per_block, up_attention=None):
  """LDM U-Net module prefixes -> diffusers ones.

  Args:
    layers_per_block: resnets per down level.
    up_attention: per diffusers up block, whether it has attention (which decides if the upsampler
      is output_blocks.i.1 or .2); None maps both, for reading.
  """
  n = len(layers_per_block)
  plain = {'time_embed.0': 'time_embedding.linear_1', 'time_embed.2': 'time_embedding.linear_2',
           'input_blocks.0.0': 'conv_in', 'out.0': 'conv_norm_out', 'out.2': 'conv_out',
           'middle_block.1': 'mid_block.attentions.0',
           # SDXL's added conditioning (pooled text + size/crop ids): SGM's label_emb MLP
           'label_emb.0.0': 'add_embedding.linear_1', 'label_emb.0.2': 'add_embedding.linear_2'}
  resnets = {'middle_block.0': 'mid_block.resnets.0', 'middle_block.2': 'mid_block.resnets.1'}
  i = 1
  for b, layers in enumerate(layers_per_block):
    for j in range(layers):
      resnets[f'input_blocks.{i}.0'] = f'down_blocks.{b}.resnets.{j}'
      plain[f'input_blocks.{i}.1'] = f'down_blocks.{b}.attentions.{j}'
      i += 1
    if b < n - 1:
      plain[f'input_blocks.{i}.0.op'] = f'down_blocks.{b}.downsamplers.0.conv'
      i += 1
  i = 0
  for b in range(n):
    for j in range(layers_per_block[n - 1 - b] + 1):
      resnets[f'output_blocks.{i}.0'] = f'up_blocks.{b}.resnets.{j}'
      plain[f'output_blocks.{i}.1'] = f'up_blocks.{b}.attentions.{j}'
      i += 1
    if b < n - 1:
      slots = (1, 2) if up_attention is None else ((2,) if up_attention[b] else (1,))
      plain.update({f'output_blocks.{i - 1}.{s}.conv': f'up_blocks.{b}.upsamplers.0.conv'
                    for s in slots})
  return {k: (v, ()) for k, v in plain.items()} | {k: (v, _RESNET) for k, v in resnets.items()}


def unet_to_diffusers(ldm_unet):
  """The U-Net's LDM keys (prefix removed) -> diffusers keys."""
  return _translate(ldm_unet, unet_table(unet_layers_per_block(ldm_unet)))


def unet_from_diffusers(state, config):
  """diffusers U-Net keys -> LDM keys (without prefix), for a `UNetConfig`."""
  up_attention = [t == 'CrossAttnUpBlock2D' for t in config.up_block_types]
  table = _invert(unet_table(config.layers_per_block, up_attention))
  return _translate(state, table, keep_unmatched=False)


def vae_table(levels, layers_per_block):
  """LDM VAE module prefixes -> diffusers ones; the decoder's `up.i` run in reverse."""
  table = {k: (k, ()) for k in ('quant_conv', 'post_quant_conv')}
  for part in ('encoder', 'decoder'):
    table.update({f'{part}.{k}': (f'{part}.{k}', ()) for k in ('conv_in', 'conv_out')})
    table[f'{part}.norm_out'] = (f'{part}.conv_norm_out', ())
    table[f'{part}.mid.block_1'] = (f'{part}.mid_block.resnets.0', _VAE_RESNET)
    table[f'{part}.mid.block_2'] = (f'{part}.mid_block.resnets.1', _VAE_RESNET)
    table[f'{part}.mid.attn_1'] = (f'{part}.mid_block.attentions.0', _VAE_ATTENTION)
  for i in range(levels):
    up = levels - 1 - i
    table[f'encoder.down.{i}.downsample.conv'] = (f'encoder.down_blocks.{i}.downsamplers.0.conv',
                                                  ())
    table[f'decoder.up.{up}.upsample.conv'] = (f'decoder.up_blocks.{i}.upsamplers.0.conv', ())
    for j in range(layers_per_block + 1):
      if j < layers_per_block:
        table[f'encoder.down.{i}.block.{j}'] = (f'encoder.down_blocks.{i}.resnets.{j}', _VAE_RESNET)
      table[f'decoder.up.{up}.block.{j}'] = (f'decoder.up_blocks.{i}.resnets.{j}', _VAE_RESNET)
  return table


def _vae_attention_weight(key):
  return re.search(r'mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$', key)


def vae_to_diffusers(ldm_vae):
  """The VAE's LDM keys (prefix removed) -> diffusers keys, 1x1 attention convs squeezed."""
  levels = len({k.split('.')[2] for k in ldm_vae if k.startswith('encoder.down.')})
  layers = len({k.split('.')[4] for k in ldm_vae if k.startswith('encoder.down.0.block.')})
  out = _translate(ldm_vae, vae_table(levels, layers))
  return {k: v[:, :, 0, 0] if _vae_attention_weight(k) and v.ndim == 4 else v
          for k, v in out.items()}


def vae_from_diffusers(state, config):
  """diffusers VAE keys -> LDM keys (without prefix), attention weights as 1x1 convs again."""
  table = _invert(vae_table(len(config.block_out_channels), config.layers_per_block))
  state = {k: v[:, :, None, None] if _vae_attention_weight(k) else v for k, v in state.items()}
  return _translate(state, table, keep_unmatched=False)


def clip_to_diffusers(ldm_clip):
  """CLIP-L (`cond_stage_model.transformer.` removed) -> transformers keys with `text_model.`."""
  return {k if k.startswith(('text_model.', 'text_projection')) else 'text_model.' + k: v
          for k, v in ldm_clip.items()}


def _with_text_model(key):
  """A key of our text encoder -> transformers' (all but `text_projection` under `text_model.`)."""
  return key if key.startswith('text_projection') else 'text_model.' + key


def clip_from_diffusers(state):
  return {_with_text_model(k): v for k, v in state.items()}


def split_in_proj(w):
  """OpenCLIP's fused attention input projection (3 * width, ...) -> the (q, k, v) projections."""
  return tuple(np.split(w, 3, axis=0))


def fuse_in_proj(q, k, v):
  """The q, k and v projections -> OpenCLIP's fused `in_proj` (3 * width, ...)."""
  return np.concatenate([q, k, v], axis=0)


def projection_t(p):
  """`text_projection` (width, proj), used as x @ P, <-> a (proj, width) linear weight."""
  return np.ascontiguousarray(p.T)


_RENAME = (tables.identity, tables.identity)
_IN_PROJ = (split_in_proj, fuse_in_proj)
_PROJECTION = (projection_t, projection_t)
_RESBLOCK = 'transformer.resblocks.{i}.'
_LAYER = 'text_model.encoder.layers.{i}.'
# OpenCLIP's text tower (`cond_stage_model.model.` removed) <-> transformers' CLIPTextModel(With
# Projection): (OpenCLIP key, transformers key, (to_transformers, to_open_clip)). `{i}` is a
# resblock (encoder layer) index, `{leaf}` weight or bias; `{qkv}` makes three keys of one.
OPENCLIP_TABLE = (
    ('token_embedding.weight', 'text_model.embeddings.token_embedding.weight', _RENAME),
    ('positional_embedding', 'text_model.embeddings.position_embedding.weight', _RENAME),
    (_RESBLOCK + 'ln_1.{leaf}', _LAYER + 'layer_norm1.{leaf}', _RENAME),
    (_RESBLOCK + 'attn.in_proj_{leaf}', _LAYER + 'self_attn.{qkv}_proj.{leaf}', _IN_PROJ),
    (_RESBLOCK + 'attn.out_proj.{leaf}', _LAYER + 'self_attn.out_proj.{leaf}', _RENAME),
    (_RESBLOCK + 'ln_2.{leaf}', _LAYER + 'layer_norm2.{leaf}', _RENAME),
    (_RESBLOCK + 'mlp.c_fc.{leaf}', _LAYER + 'mlp.fc1.{leaf}', _RENAME),
    (_RESBLOCK + 'mlp.c_proj.{leaf}', _LAYER + 'mlp.fc2.{leaf}', _RENAME),
    ('ln_final.{leaf}', 'text_model.final_layer_norm.{leaf}', _RENAME),
    ('text_projection', 'text_projection.weight', _PROJECTION),
)
_FIELDS = {'i': r'(?P<i>\d+)', 'leaf': r'(?P<leaf>weight|bias)', 'qkv': r'(?P<qkv>[qkv])'}


def _pattern_regex(pattern):
  """'ln_final.{leaf}' -> a regex for whole keys that captures the `{field}`s."""
  parts = re.split(r'\{(\w+)\}', pattern)
  return re.compile(''.join(_FIELDS[p] if n % 2 else re.escape(p) for n, p in enumerate(parts)))


_OPENCLIP_REGEXES = tuple((_pattern_regex(ours), _pattern_regex(theirs))
                          for ours, theirs, _ in OPENCLIP_TABLE)


def _openclip_row(key, side, num_layers):
  """(row of OPENCLIP_TABLE, its fields) for a key of `side` (0 OpenCLIP, 1 transformers), or None.

  A resblock index must be below `num_layers`.
  """
  for row, regexes in zip(OPENCLIP_TABLE, _OPENCLIP_REGEXES):
    m = regexes[side].fullmatch(key)
    if m and ('i' not in m.groupdict() or int(m['i']) < num_layers):
      return row, {k: v for k, v in m.groupdict().items() if k != 'qkv'}
  return None


def _transformers_keys(pattern, fields):
  """The transformers key(s) of a table row: three for a `{qkv}` pattern, else one."""
  names = 'qkv' if '{qkv}' in pattern else ('',)
  return [pattern.format(**fields, qkv=name) for name in names]


def openclip_to_diffusers(ldm, with_projection=False, keep_last=False):
  """OpenCLIP (`cond_stage_model.model.` removed) -> transformers CLIP keys.

  Keys map through `OPENCLIP_TABLE`: the fused attention input projection is split into q/k/v;
  the last resblock is dropped unless `keep_last` (SD 2.x conditions on the penultimate layer;
  SDXL's bigG keeps every layer: its pooled embedding comes from the last); `text_projection`
  (width, proj), used as x @ P, becomes a (proj, width) linear weight, kept only
  `with_projection`. Keys outside the table keep their name, so that loading reports them.
  """
  last = max((int(k.split('.')[2]) for k in ldm if k.startswith('transformer.resblocks.')),
             default=-1) + (1 if keep_last else 0)
  out = {}
  for key, value in ldm.items():
    if (key.startswith(f'transformer.resblocks.{last}.')
        or key == 'text_projection' and not with_projection):
      continue
    found = _openclip_row(key, 0, last)
    if found is None:
      out[key] = value
      continue
    (_, theirs, (to_transformers, _)), fields = found
    values = to_transformers(value)
    values = values if isinstance(values, tuple) else (values,)
    out.update(zip(_transformers_keys(theirs, fields), values))
  return out


def openclip_from_diffusers(state, num_layers, pad_last=True):
  """transformers CLIP keys (no `text_model.`) -> OpenCLIP, plus an identity last resblock.

  Keys map back through `OPENCLIP_TABLE` (q/k/v fused into one `in_proj`). With `pad_last` (SD
  2.x) the file gets one resblock more than the encoder runs, all zeros: SD 2.x readers (ours,
  diffusers, the original repository) skip the last resblock, and a zero block is the identity.
  SDXL's bigG (`pad_last=False`) is written as it is: its readers keep every layer.

  Raises:
    diffusers.ConversionError: a key outside the table (or a layer past `num_layers`).
  """
  out, unmatched = {}, []
  for key in state:
    found = _openclip_row(_with_text_model(key), 1, num_layers)
    if found is None:
      unmatched.append(key)
      continue
    (ours, theirs, (_, to_open_clip)), fields = found
    keys = [k.removeprefix('text_model.') for k in _transformers_keys(theirs, fields)]
    if key == keys[0]:  # a fused key is written once, from all of its parts
      out[ours.format(**fields)] = to_open_clip(*(state[k] for k in keys))
  _check_placed(unmatched)
  if not pad_last:
    return out
  pad = f'transformer.resblocks.{num_layers - 1}.'
  out |= {k.replace(pad, f'transformer.resblocks.{num_layers}.'): np.zeros_like(v)
          for k, v in out.items() if k.startswith(pad)}
  return out
