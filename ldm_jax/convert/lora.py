"""LoRA files in and out, no torch: the diffusers/PEFT layout, diffusers' older one, and kohya's.

Layouts (one safetensors file each; A is PEFT's lora_A = kohya's lora_down, B is lora_B/lora_up):

  peft           unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight
                 text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight
                 + metadata 'lora_adapter_metadata': {"unet.r", "unet.lora_alpha",
                 "unet.alpha_pattern", "unet.target_modules", ...} as diffusers'
                 `save_lora_weights` writes it (without it, alpha = rank).
  diffusers_old  ...attn1.processor.to_q_lora.down.weight, ...to_q.lora.up.weight,
                 ...self_attn.to_q_lora.down.weight, ...mlp.fc1.lora_linear_layer.up.weight
                 (read only), optional `<module>.alpha`.
  kohya          lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
                 .lora_down.weight, .lora_up.weight, .alpha;
                 lora_te_text_model_encoder_layers_0_self_attn_q_proj... (SDXL: lora_te1_ and
                 lora_te2_, and the U-Net under its sgm names, lora_unet_input_blocks_4_1_...).

Weights are A (r, in) / B (out, r) for linear layers and A (r, in, kh, kw) / B (out, r, 1, 1) for
convolutions, PyTorch's layout; `ldm_jax.models.lora` holds them transposed to ours.
"""

import collections
import dataclasses
import json
import os
import re

import numpy as np
import safetensors
from safetensors import numpy as st_numpy

from ldm_jax.convert import compvis
from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import tables
from ldm_jax.models import lora as lora_lib

WEIGHT_NAME = 'pytorch_lora_weights.safetensors'  # what diffusers' load_lora_weights(dir) reads
METADATA_KEY = 'lora_adapter_metadata'  # diffusers' LORA_ADAPTER_METADATA_KEY
NETWORKS = ('unet', 'text_encoder', 'text_encoder_2')
LAYOUTS = ('peft', 'kohya')
_KOHYA_PREFIX = {'unet': ('lora_unet_',), 'text_encoder': ('lora_te_', 'lora_te1_'),
                 'text_encoder_2': ('lora_te2_',)}
_SUFFIXES = {'.lora_A.weight': 'A', '.lora_B.weight': 'B', '.lora.down.weight': 'A',
             '.lora.up.weight': 'B', '.alpha': 'alpha'}
_KOHYA_SUFFIXES = {'lora_down.weight': 'A', 'lora_up.weight': 'B', 'alpha': 'alpha'}
# Keys of adapter types that are no plain LoRA, with what they are.
_UNSUPPORTED = (('lora_magnitude_vector', 'DoRA'), ('dora_scale', 'DoRA'),
                ('lora_B.bias', 'a LoRA bias (lora_bias=True)'), ('hada_', 'LyCORIS LoHa'),
                ('lokr_', 'LyCORIS LoKr'), ('lora_mid', 'LoCon with a Tucker core'))
# diffusers' attention-processor names (diffusers < 0.21): U-Net and text encoder spellings.
_OLD_UNET = (('.to_out_lora.', '.to_out.0.lora.'),) + tuple(
    (f'.to_{c}_lora.', f'.to_{c}.lora.') for c in 'qkv')
_OLD_TEXT = (('.to_out_lora.', '.out_proj.lora.'),) + tuple(
    (f'.to_{c}_lora.', f'.{c}_proj.lora.') for c in 'qkv')


class LoraFormatError(ValueError):
  """A LoRA file that does not fit the model or is of a kind ldm_jax cannot load."""


@dataclasses.dataclass
class LoraFile:
  """A loaded LoRA.

  adapters: {network: adapter tree} for every network of the base trees (empty when the file
    has none for it).
  alpha: {network: {module path string: alpha}}.
  layout: 'peft', 'diffusers_old' or 'kohya'.
  metadata: the file's safetensors metadata.
  """
  adapters: dict
  alpha: dict
  layout: str
  metadata: dict

  def entry(self, network, scale=1.0):
    """(adapters, scale, alpha) for `lora.apply(base, [entry, ...])`."""
    return self.adapters[network], scale, self.alpha[network]


def names_of(network, path):
  """A module's names in files, the one we write first: `down_blocks.0.attentions.0...to_q`."""
  name = tables.torch_key(path + ('kernel',)).removesuffix('.weight')
  if network == 'unet' or name.startswith('text_projection'):
    return [name]
  return ['text_model.' + name, name]  # transformers 4 nests CLIP under text_model; 5 does not


def module_names(network, tree):
  """{module path: names_of(network, path)} for every Dense/Conv module of a tree."""
  return {path: names_of(network, path) for path in lora_lib.kernels(tree)}


def _sgm_prefixes(unet_tree, for_writing=False):
  """{diffusers module prefix: ([sgm prefixes], inner renames)} of the U-Net's LDM/sgm names.

  An upsampler's sgm index depends on whether its level has attention: reading accepts both.
  """
  levels = sorted(int(k.split('_')[-1]) for k in unet_tree if k.startswith('down_blocks_'))
  if not levels:
    return {}
  per_level = tuple(sum(k.startswith('resnets_') for k in unet_tree[f'down_blocks_{i}'])
                    for i in levels)
  up_attention = None
  if for_writing:
    up_attention = [any(k.startswith('attentions_') for k in unet_tree.get(f'up_blocks_{i}', {}))
                    for i in levels]
  table = compvis.unet_table(per_level, up_attention)
  table = table | {'label_emb.0.0': ('add_embedding.linear_1', ()),
                   'label_emb.0.2': ('add_embedding.linear_2', ())}  # SDXL
  out = {}
  for old, (new, inner) in table.items():
    out.setdefault(new, ([], tuple((b, a) for a, b in inner)))[0].append(old)
  return out


def sgm_names(name, prefixes):
  """A diffusers U-Net module name under its sgm/LDM names (kohya's SDXL spelling)."""
  parts = name.split('.')
  for n in range(len(parts), 0, -1):
    head = '.'.join(parts[:n])
    if head in prefixes:
      olds, inner = prefixes[head]
      rest = '.'.join(parts[n:])
      for a, b in inner:
        if rest == a or rest.startswith(a + '.'):
          rest = b + rest[len(a):]
          break
      return [old + ('.' + rest if rest else '') for old in olds]
  return []


def _kohya_names(base):
  """{kohya module name: (network, path)} for every module of the base trees."""
  out = {}
  for network, tree in base.items():
    sgm = _sgm_prefixes(tree) if network == 'unet' else {}
    for path, names in module_names(network, tree).items():
      if sgm:
        names = names + sgm_names(names[0], sgm)
      for name in names:
        for prefix in _KOHYA_PREFIX[network]:
          out[prefix + name.replace('.', '_')] = (network, path)
  return out


def _diffusers_names(base):
  """{file module name: [(network, path)]}; unprefixed names stand for any network."""
  out = collections.defaultdict(list)
  for network, tree in base.items():
    for path, names in module_names(network, tree).items():
      for name in names:
        out[f'{network}.{name}'].append((network, path))
        out[name].append((network, path))
  return out


def _split_suffix(key, suffixes):
  for suffix, part in suffixes.items():
    if key.endswith(suffix):
      return key[:-len(suffix)], part
  return None, None


def _unsupported(key):
  return next((what for marker, what in _UNSUPPORTED if marker in key), None)


def _place_diffusers(key, names):
  """(network, path, part) of a diffusers-layout key, or None."""
  key = key.replace('.processor.', '.').replace('.lora_linear_layer.', '.lora.')
  key = key.removeprefix('base_model.model.')  # a PEFT `save_pretrained` folder
  for renames in (_OLD_UNET, _OLD_TEXT, ()):
    name = key
    for a, b in renames:
      name = name.replace(a, b)
    module, part = _split_suffix(name, _SUFFIXES)
    module = module.removesuffix('.lora') if module else module  # `<module>.lora.alpha`
    if module in names:
      network, path = names[module][0]
      return network, path, part
  return None


def _place_kohya(key, names):
  lora_name, _, rest = key.partition('.')
  part = _KOHYA_SUFFIXES.get(rest)
  if part is None or lora_name not in names:
    return None
  return names[lora_name] + (part,)


def _collect(state, base):
  """{(network, path): {'A', 'B', 'alpha'}} and the layout; lists every key that does not fit."""
  kohya = all(k.startswith(('lora_unet_', 'lora_te')) for k in state)
  names = _kohya_names(base) if kohya else _diffusers_names(base)
  place = _place_kohya if kohya else _place_diffusers
  found, unknown, unsupported = collections.defaultdict(dict), [], []
  old = False
  for key, value in state.items():
    what = _unsupported(key)
    if what:
      unsupported.append(f'{key} ({what})')
      continue
    spot = place(key, names)
    if spot is None:
      unknown.append(key)
      continue
    network, path, part = spot
    found[(network, path)][part] = value
    old = old or '.lora.' in key or '_lora.' in key or 'lora_linear_layer' in key
  problems = []
  if unsupported:
    problems.append((f'{len(unsupported)} keys of adapters ldm_jax does not implement '
                     '(only plain LoRA/LoCon are)', unsupported))
  if unknown:
    problems.append((f'{len(unknown)} keys name no module of the given networks '
                     f'({", ".join(base)})', unknown))
  layout = 'kohya' if kohya else ('diffusers_old' if old else 'peft')
  return found, layout, problems


def _to_ours(a, b, kernel_shape):
  """PyTorch-layout A, B -> our (down, up) for a kernel of `kernel_shape`, or None if unfit."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if b.ndim == 4 and b.shape[2:] == (1, 1):
    b = b[:, :, 0, 0]
  if b.ndim != 2 or a.shape[0] != b.shape[1] or b.shape[0] != kernel_shape[-1]:
    return None
  if len(kernel_shape) == 2 and a.ndim == 4 and a.shape[2:] == (1, 1):
    a = a[:, :, 0, 0]
  if len(kernel_shape) == 4 and a.ndim == 2:
    a = a[:, :, None, None]
  if a.ndim != len(kernel_shape):
    return None
  down = a.T if a.ndim == 2 else np.transpose(a, (2, 3, 1, 0))
  if down.shape[:-1] != tuple(kernel_shape[:-1]):
    return None
  return np.ascontiguousarray(down), np.ascontiguousarray(b.T)


def _peft_alpha(metadata, network, names, rank):
  """A module's alpha from diffusers' adapter metadata (PEFT's rank/alpha_pattern matching)."""
  config = _network_config(metadata, network)
  if not config:
    return float(rank)
  alpha = config.get('lora_alpha', config.get('r', rank))
  for pattern, value in (config.get('alpha_pattern') or {}).items():
    if any(re.match(rf'(.*\.)?({pattern})$', n) for n in names):
      alpha = value
      break
  if config.get('use_rslora'):  # scaling alpha / sqrt(r): the same as alpha * sqrt(r) over r
    alpha = alpha * np.sqrt(rank)
  return float(alpha)


def _network_config(metadata, network):
  """The LoraConfig kwargs diffusers stores for `network` (prefixed keys) or for the file."""
  raw = metadata.get(METADATA_KEY) or metadata.get('adapter_config')
  if not raw:
    return {}
  config = json.loads(raw) if isinstance(raw, str) else raw
  prefixed = {k[len(network) + 1:]: v for k, v in config.items() if k.startswith(network + '.')}
  if prefixed:
    return prefixed
  return {} if any('.' in k for k in config) else config


def read_file(path):
  """{key: numpy array} and the safetensors metadata of a LoRA file (or a folder holding one).

  Raises:
    LoraFormatError: no safetensors LoRA there, or only a pickle (never unpickled).
  """
  if os.path.isdir(path):
    candidates = [os.path.join(path, n) for n in (WEIGHT_NAME, 'adapter_model.safetensors')]
    found = [c for c in candidates if os.path.isfile(c)]
    if not found:
      raise LoraFormatError(f'{path} holds no {WEIGHT_NAME} (diffusers) or '
                            'adapter_model.safetensors (PEFT): pass the LoRA file itself')
    path = found[0]
  if not path.endswith('.safetensors'):
    raise LoraFormatError(f'{path}: ldm_jax reads LoRAs from .safetensors files only and never '
                          'unpickles; convert it once where torch is installed '
                          '(`safetensors.torch.save_file(torch.load(f), out)`)')
  try:
    state = st_numpy.load_file(path)
    with safetensors.safe_open(path, 'np') as f:
      metadata = dict(f.metadata() or {})
  except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
    raise LoraFormatError(f'{path} is not a readable safetensors file ({e}); re-download it') from e
  config = os.path.join(os.path.dirname(path), 'adapter_config.json')
  if os.path.basename(path) == 'adapter_model.safetensors' and os.path.isfile(config):
    with open(config) as f:
      metadata['adapter_config'] = f.read()
  return state, metadata


def load_lora(path, base, dtype=np.float32):
  """Loads a LoRA file in any of the layouts onto the networks of `base`.

  Args:
    path: a .safetensors file, or a folder holding pytorch_lora_weights.safetensors (diffusers)
      or adapter_model.safetensors + adapter_config.json (a PEFT folder).
    base: {network: parameter tree} ('unet', 'text_encoder', 'text_encoder_2'); arrays or
      `jax.ShapeDtypeStruct`s (`build.abstract_params`): only the structure and shapes are used.
    dtype: the adapters' dtype.

  Returns:
    LoraFile.

  Raises:
    LoraFormatError: listing every key that names no module, belongs to an unsupported adapter
      kind (DoRA, LoHa, ...), lacks its other half or does not fit its module's shape.
  """
  unknown = [n for n in base if n not in NETWORKS]
  if unknown:
    raise LoraFormatError(f'unknown networks {unknown}: base is {{network: params}} '
                          f'over {NETWORKS}')
  state, metadata = read_file(path)
  found, layout, problems = _collect(state, base)
  kernels = {n: lora_lib.kernels(tree) for n, tree in base.items()}
  modules, alphas = {n: {} for n in base}, {n: {} for n in base}
  incomplete, mis_shaped = [], []
  for (network, module), parts in found.items():
    name = names_of(network, module)[0]
    if 'A' not in parts or 'B' not in parts:
      incomplete.append(f'{network}.{name}: has {sorted(parts)}, needs both A (down) and B (up)')
      continue
    shape = tuple(kernels[network][module].shape)
    pair = _to_ours(parts['A'], parts['B'], shape)
    if pair is None:
      mis_shaped.append(f'{network}.{name}: A {parts["A"].shape}, B {parts["B"].shape} do not '
                        f'fit the kernel {shape}')
      continue
    rank = pair[0].shape[-1]
    if 'alpha' in parts:
      alpha = float(np.asarray(parts['alpha']).reshape(()))
    else:
      alpha = _peft_alpha(metadata, network, names_of(network, module), rank)
    modules[network][module] = {'down': pair[0].astype(dtype), 'up': pair[1].astype(dtype)}
    alphas[network][lora_lib.path_str(module)] = alpha
  problems += [(f'{len(incomplete)} incomplete adapters', incomplete),
               (f'{len(mis_shaped)} mis-shaped adapters', mis_shaped)]
  problems = [p for p in problems if p[1]]
  if problems or not found:
    raise LoraFormatError(_report(path, problems or [('no LoRA keys at all', list(state)[:5])],
                                  _made_for(state, base)))
  adapters = {n: lora_lib.from_modules(m) for n, m in modules.items()}
  return LoraFile(adapters, alphas, layout, metadata)


def _report(path, problems, hints=()):
  lines = [f'{path}: the LoRA does not fit these networks. Check that it was made for this model '
           '(SD 1.x, 2.x, XL) and that every network it adapts is passed in `base`.']
  lines.extend(hints)
  for title, keys in problems:
    lines.append(f'  {title}:')
    lines.extend(f'    {k}' for k in keys)
  return '\n'.join(lines)


# The released families by their U-Net's cross-attention context width (attn2.to_k's input).
_FAMILIES = {768: 'SD 1.x', 1024: 'SD 2.x', 2048: 'SDXL', 1280: 'the SDXL refiner'}
# Keys of the down (A) matrices whose input width tells the model, '_' read as '.', lower case.
_CONTEXT_KEY = r'attn2\.(processor\.)?to\.k\.(lora\.)?(a|down)\.weight$'
_TEXT_KEY = r'self\.attn\.(q\.proj|to\.q)\.(lora\.)?(a|down)\.weight$'
_CONTEXT = 'cross-attention context width'


def _file_widths(state):
  """{what: width} a LoRA file's down matrices read: the U-Net's context, each text encoder's."""
  out = {}
  for key, value in state.items():
    name = key.lower().replace('_', '.')
    if np.ndim(value) < 2:
      continue
    if re.search(_CONTEXT_KEY, name):
      out.setdefault(_CONTEXT, value.shape[1])
    elif re.search(_TEXT_KEY, name):
      second = key.startswith(('lora_te2_', 'text_encoder_2.'))
      out.setdefault(f'{"text_encoder_2" if second else "text_encoder"} width', value.shape[1])
  return out


def _model_widths(base):
  """The same widths of the base networks (from their attn2.to_k and q_proj kernels)."""
  out = {}
  for network, tree in base.items():
    for path, kernel in lora_lib.kernels(tree).items():
      if network == 'unet' and path[-2:] == ('attn2', 'to_k'):
        out.setdefault(_CONTEXT, kernel.shape[0])
      elif network != 'unet' and path[-2:] == ('self_attn', 'q_proj'):
        out.setdefault(f'{network} width', kernel.shape[0])
  return out


def _made_for(state, base):
  """A line saying which model a LoRA looks made for, when its widths are not this model's."""
  theirs, ours = _file_widths(state), _model_widths(base)
  order = (_CONTEXT, 'text_encoder width', 'text_encoder_2 width')
  differ = [f'{what} {theirs[what]} (this model: {ours.get(what, "has none")})'
            for what in order if what in theirs and ours.get(what) != theirs[what]]
  if not differ:
    return []
  family = _FAMILIES.get(theirs.get(_CONTEXT))
  guess = f'it looks made for {family}' if family else 'it looks made for another model'
  return [f'  {guess}: its ' + '; '.join(differ)]


def _to_torch(adapter):
  """Our (down, up) -> PyTorch-layout A (r, in[, kh, kw]) and B (out, r[, 1, 1]), float32."""
  down, up = (np.asarray(adapter[k], np.float32) for k in ('down', 'up'))
  if down.ndim == 2:
    return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
  return (np.ascontiguousarray(np.transpose(down, (3, 2, 0, 1))),
          np.ascontiguousarray(up.T[:, :, None, None]))


def _alpha_of(alpha, network):
  """One network's alpha out of save_lora's `alpha` (None, a number or {network: ...})."""
  if not isinstance(alpha, dict):
    return alpha
  stray = [k for k in alpha if k not in NETWORKS]
  if stray:
    raise ValueError(f'alpha is keyed by network ({NETWORKS}), got {stray[:3]}: pass '
                     "{'unet': {module path: alpha}} (a LoraFile's alpha) or one number")
  return alpha.get(network)


def _most_common(values):
  return collections.Counter(values).most_common(1)[0][0]


def _number(x):
  return int(x) if float(x).is_integer() else float(x)


def _peft_metadata(network, ranks, alphas):
  """diffusers' adapter metadata for one network: LoraConfig kwargs under `network.`."""
  r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
  config = {
      'r': r, 'lora_alpha': _number(alpha), 'target_modules': sorted(ranks),
      'rank_pattern': {k: v for k, v in ranks.items() if v != r},
      'alpha_pattern': {k: _number(v) for k, v in alphas.items() if v != alpha},
      'lora_dropout': 0.0, 'use_dora': False, 'lora_bias': False,
  }
  return {f'{network}.{k}': v for k, v in config.items()}


def _kohya_prefix(network, sdxl):
  return {'unet': 'lora_unet_', 'text_encoder': 'lora_te1_' if sdxl else 'lora_te_',
          'text_encoder_2': 'lora_te2_'}[network]


def save_lora(adapters, path, alpha=None, layout='peft', base=None, dtype=np.float32):
  """Writes adapters as a LoRA file that diffusers, ComfyUI and A1111 load.

  Args:
    adapters: {network: adapter tree} ('unet', 'text_encoder', 'text_encoder_2').
    path: a .safetensors file, or a folder (then `pytorch_lora_weights.safetensors` inside, the
      name diffusers' `load_lora_weights(folder)` looks for).
    alpha: None (alpha = rank), a number, or {network: None | number | {module path: alpha}}
      (a LoraFile's `alpha`).
    layout: 'peft' (diffusers' `save_lora_weights`: lora_A/lora_B and the adapter config in the
      metadata) or 'kohya' (lora_down/lora_up/alpha).
    base: {network: parameter tree}: needed only for kohya SDXL files, whose U-Net names are the
      sgm ones (input_blocks_4_1_...); SDXL is recognised by text_encoder_2 or add_embedding.
    dtype: the stored dtype (float32, or float16 for smaller files).

  Returns:
    The path of the file written.
  """
  if layout not in LAYOUTS:
    raise ValueError(f'layout {layout!r} is not one of {LAYOUTS}')
  unknown = [n for n in adapters if n not in NETWORKS]
  if unknown:
    raise ValueError(f'unknown networks {unknown}: adapters is {{network: tree}} over {NETWORKS}')
  writer = _peft_state if layout == 'peft' else _kohya_state
  state, metadata = writer(adapters, alpha, base)
  state = {k: np.asarray(v, dtype) for k, v in state.items()}
  if not path.endswith('.safetensors'):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, WEIGHT_NAME)
  diffusers_lib.save_safetensors(state, path, metadata)
  return path


def _peft_state(adapters, alpha, base):
  del base  # the diffusers names do not depend on the model's layout
  state, config = {}, {}
  for network, tree in adapters.items():
    ranks, alphas = {}, {}
    for path, adapter in lora_lib.modules(tree).items():
      names = names_of(network, path)
      a, b = _to_torch(adapter)
      state[f'{network}.{names[0]}.lora_A.weight'] = a
      state[f'{network}.{names[0]}.lora_B.weight'] = b
      # PEFT matches target_modules and patterns as suffixes of its module names, so the
      # name without `text_model.` fits transformers 4 and 5 alike.
      ranks[names[-1]] = a.shape[0]
      alphas[names[-1]] = float(lora_lib.alpha_for(_alpha_of(alpha, network), path, a.shape[0]))
    if ranks:
      config.update(_peft_metadata(network, ranks, alphas))
  return state, {'format': 'pt', METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def _kohya_state(adapters, alpha, base):
  base = base or {}
  sdxl = 'text_encoder_2' in adapters or 'text_encoder_2' in base or (
      'add_embedding' in base.get('unet', {}))
  sgm = _sgm_prefixes(base['unet'], for_writing=True) if sdxl and 'unet' in base else None
  if sdxl and lora_lib.modules(adapters.get('unet', {})) and sgm is None:
    raise ValueError('kohya SDXL files name the U-Net by its sgm modules: pass '
                     "base={'unet': unet_params} (or its abstract tree) to save_lora")
  state, ranks, alphas = {}, [], []
  for network, tree in adapters.items():
    for path, adapter in lora_lib.modules(tree).items():
      name = names_of(network, path)[0]
      if network == 'unet' and sgm:
        name = sgm_names(name, sgm)[0]
      key = _kohya_prefix(network, sdxl) + name.replace('.', '_')
      a, b = _to_torch(adapter)
      value = float(lora_lib.alpha_for(_alpha_of(alpha, network), path, a.shape[0]))
      state.update({f'{key}.lora_down.weight': a, f'{key}.lora_up.weight': b,
                    f'{key}.alpha': np.asarray(value, np.float32)})
      ranks.append(a.shape[0])
      alphas.append(value)
  metadata = {'format': 'pt', 'ss_network_module': 'networks.lora'}
  if ranks:
    metadata.update(ss_network_dim=str(_most_common(ranks)),
                    ss_network_alpha=str(_number(_most_common(alphas))))
  return state, metadata


def convert_lora(src, dst, base, layout='peft'):
  """Rewrites a LoRA file in another layout (`base` as for load_lora); returns dst's path."""
  loaded = load_lora(src, base)
  return save_lora(loaded.adapters, dst, loaded.alpha, layout=layout, base=base)
