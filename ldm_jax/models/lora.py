"""LoRA: low-rank adapters as their own parameter tree beside the frozen base parameters.

An adapter tree mirrors the base tree down to the adapted modules; each holds
`{'down': A, 'up': B}` where a Dense kernel (in, out) gets A (in, r) and B (r, out), and a Conv
kernel (kh, kw, in, out) gets A (kh, kw, in, r) (the down conv, with the base conv's stride and
padding) and B (r, out) (a 1x1 up conv), as PEFT, kohya LoCon and diffusers do. B starts at zero.

The adapted kernel is `W + scale * (alpha / r) * A @ B` (for a conv: the one kernel
`einsum('hwir,ro->hwio', A, B)`, exact because a 1x1 conv after a conv is a conv). `apply`
returns the tree the unchanged Linen module consumes; it is pure, jittable and differentiable
w.r.t. the adapters, so training differentiates the adapter tree only and the optimizer state is
adapter-sized. `alpha` is not part of the trainable tree: it is a float for all modules or a
{module path: float} dict (as loaded files have), None meaning alpha == rank (PEFT's default).

Dropout on the adapter input (PEFT's `lora_dropout`) cannot be folded into a merged kernel;
`intercept` computes the adapter branch beside each targeted layer instead (PEFT's order of
operations), exactly, and `prepare` picks between the two.
"""

import contextlib
import dataclasses
import functools
import re
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# Target presets: regexes (re.search) over '/'-joined module paths of the base tree.
UNET_ATTENTION = (r'transformer_blocks_\d+/attn[12]/(to_q|to_k|to_v|to_out_0)$',)
UNET_FEED_FORWARD = (r'transformer_blocks_\d+/ff/(net_0/proj|net_2)$',)
UNET_PROJECTIONS = (r'attentions_\d+/(proj_in|proj_out)$',)
# LoCon: the ResNet convolutions and time projections, and the down/upsampling convs.
UNET_CONV = (r'resnets_\d+/(conv1|conv2|conv_shortcut|time_emb_proj)$',
             r'(downsamplers|upsamplers)_0/conv$')
TEXT_ATTENTION = (r'self_attn/(q_proj|k_proj|v_proj|out_proj)$',)
TEXT_MLP = (r'mlp/(fc1|fc2)$',)
PRESETS = {
    'attention': UNET_ATTENTION, 'feed_forward': UNET_FEED_FORWARD,
    'projections': UNET_PROJECTIONS, 'conv': UNET_CONV,
    'text_attention': TEXT_ATTENTION, 'text_mlp': TEXT_MLP,
}
_ADAPTER_KEYS = frozenset(('down', 'up'))


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """What to adapt and how.

  Attributes:
    rank: r, the inner width of every adapter.
    alpha: the adapter's output is scaled by alpha / rank (None: alpha = rank, scale 1).
    dropout: dropout on the adapter's input while training (needs `intercept`; see `prepare`).
    targets: regexes searched in '/'-joined module paths, or names of PRESETS.
    param_dtype: storage dtype of the adapters (float32: they are what trains).
  """
  rank: int = 4
  alpha: float | None = None
  dropout: float = 0.0
  targets: tuple = UNET_ATTENTION
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, 'targets', (self.targets,))
    object.__setattr__(self, 'targets', tuple(self.targets))
    object.__setattr__(self, 'rank', int(self.rank))
    if self.rank < 1:
      raise ValueError(f'LoRA rank must be >= 1, got {self.rank}')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'LoRA dropout must be in [0, 1), got {self.dropout}')
    for t in self.targets:
      if t not in PRESETS:
        re.compile(t)  # fails early on a bad regex

  @property
  def regexes(self):
    """The targets with preset names expanded."""
    out = []
    for t in self.targets:
      out.extend(PRESETS.get(t, (t,)))
    return tuple(out)


def path_str(path):
  return '/'.join(path)


def kernels(tree):
  """{module path: kernel} for every Dense (rank-2) or Conv (rank-4) kernel of a param tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for keys, leaf in flat:
    path = tuple(k.key for k in keys)
    if path[-1] == 'kernel' and len(leaf.shape) in (2, 4):
      out[path[:-1]] = leaf
  return out


def target_modules(base_params, targets):
  """The module paths (tuples) whose '/'-joined path a target regex finds, in tree order.

  Raises:
    ValueError: a regex (or preset) that selects no module, with examples of the paths.
  """
  regexes = LoraConfig(targets=targets).regexes
  found = kernels(base_params)
  chosen, idle = [], []
  for regex in regexes:
    hits = [p for p in found if re.search(regex, path_str(p))]
    if not hits:
      idle.append(regex)
    chosen.extend(h for h in hits if h not in chosen)
  if idle:
    examples = ', '.join(path_str(p) for p in list(found)[:4])
    raise ValueError(f'LoRA target(s) {idle} match no Dense or Conv kernel of this network; '
                     f'targets are regexes over module paths such as {examples} '
                     f'(presets: {sorted(PRESETS)})')
  order = {p: i for i, p in enumerate(found)}
  return sorted(chosen, key=order.get)


def init(base_params, config, key):
  """New adapters for the targeted modules: A ~ U(+-1/sqrt(fan_in)) (PEFT's and kohya's
  kaiming-uniform), B = 0, so the adapted network starts equal to the base.

  Args:
    base_params: the base parameter tree (arrays or `jax.ShapeDtypeStruct`s: only shapes used).
    config: LoraConfig.
    key: a PRNG key.

  Returns:
    The adapter tree (nested dicts mirroring the base tree).
  """
  targets = _kernels_of(base_params, config.targets)
  shapes = tuple((*k.shape[:-1], config.rank) for k in targets.values())
  downs = _draw_downs(key, shapes, jnp.dtype(config.param_dtype))
  return from_modules({
      path: {'down': down, 'up': jnp.zeros((config.rank, k.shape[-1]), config.param_dtype)}
      for (path, k), down in zip(targets.items(), downs)})


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw_downs(key, shapes, dtype):
  """All A matrices from one uniform draw: one small program however many modules there are."""
  sizes = [int(np.prod(s)) for s in shapes]
  u = jax.random.uniform(key, (sum(sizes),), dtype, -1.0, 1.0)
  out, offset = [], 0
  for shape, size in zip(shapes, sizes):
    bound = 1.0 / np.sqrt(np.prod(shape[:-1]))  # fan_in of the base layer
    out.append((u[offset:offset + size] * bound).reshape(shape))
    offset += size
  return out


def _kernels_of(base_params, targets):
  found = kernels(base_params)
  return {p: found[p] for p in target_modules(base_params, targets)}


def modules(adapters):
  """{module path (tuple): {'down': A, 'up': B}} of an adapter tree."""
  out = {}

  def walk(node, path):
    if isinstance(node, dict) and _ADAPTER_KEYS <= set(node):
      extra = set(node) - _ADAPTER_KEYS
      if extra:
        raise ValueError(f'adapter {path_str(path)} has unknown entries {sorted(extra)}; '
                         "an adapter holds only 'down' and 'up'")
      out[path] = node
    elif isinstance(node, dict):
      for k, v in node.items():
        walk(v, path + (k,))
    else:
      raise ValueError(f'{path_str(path)} is no adapter: expected {{"down", "up"}} dicts')

  walk(adapters, ())
  return out


def from_modules(mods):
  """The adapter tree of {module path (tuple): {'down': A, 'up': B}} (the inverse of modules)."""
  tree = {}
  for path, adapter in mods.items():
    _set(tree, path, adapter)
  return tree


def count_params(adapters):
  """Number of adapter parameters."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(adapters)))


def rank_of(adapter):
  return adapter['down'].shape[-1]


def delta(adapter):
  """A @ B shaped like the base kernel, in float32: (in, out) or (kh, kw, in, out)."""
  down = jnp.asarray(adapter['down'], jnp.float32)
  up = jnp.asarray(adapter['up'], jnp.float32)
  if down.ndim == 2:
    return down @ up
  return jnp.einsum('hwir,ro->hwio', down, up, precision=jax.lax.Precision.HIGHEST)


def alpha_for(alpha, path, rank):
  """The alpha of one module: `alpha` is None (= rank), a number, or {path string: number}."""
  if alpha is None:
    return float(rank)
  if isinstance(alpha, dict):
    key = path_str(path) if isinstance(path, tuple) else path
    if key not in alpha:
      raise ValueError(f'no alpha given for adapter {key}: the alpha dict must name every '
                       f'adapted module (it names {len(alpha)}), or pass one number')
    return alpha[key]
  return alpha


def _entries(adapters, scale, alpha):
  """Normalises one LoRA or a list of (adapters, scale[, alpha]) to [(modules, scale, alpha)]."""
  if isinstance(adapters, (list, tuple)):
    out = []
    for entry in adapters:
      if not isinstance(entry, (list, tuple)) or len(entry) not in (2, 3):
        raise ValueError('several LoRAs are given as [(adapters, scale), ...] or '
                         '[(adapters, scale, alpha), ...]')
      a, s, al = tuple(entry) if len(entry) == 3 else (*entry, alpha)
      out.append((modules(a), s * scale, al))
    return out
  return [(modules(adapters), scale, alpha)]


def apply(base_params, adapters, scale=1.0, alpha=None, dtype=None):
  """The parameter tree with adapted kernels, for the unchanged Linen module.

  Args:
    base_params: the frozen base tree (untouched; untargeted leaves are shared, not copied).
    adapters: an adapter tree, or a list of (adapters, scale) / (adapters, scale, alpha) for
      several LoRAs at once (then `scale` multiplies every entry's scale, and `alpha` stands
      for the alpha of the pairs).
    scale: the LoRA strength (diffusers' `lora_scale`, kohya's multiplier).
    alpha: None (alpha = rank), a number, or {module path string: alpha}.
    dtype: the adapted kernels' dtype. Default: the merge is done in float32 and kept in
      promote(base dtype, adapter dtype), so that float32 adapters on a bf16 base are not
      rounded to bf16 before the module casts them to its compute dtype.

  Returns:
    A parameter tree with the base tree's structure.
  """
  deltas = {}  # module path -> (float32 delta, adapter dtype)
  for mods, s, al in _entries(adapters, scale, alpha):
    for path, adapter in mods.items():
      d = (s * alpha_for(al, path, rank_of(adapter)) / rank_of(adapter)) * delta(adapter)
      dt = jnp.dtype(adapter['down'].dtype)
      if path in deltas:
        d, dt = deltas[path][0] + d, jnp.promote_types(deltas[path][1], dt)
      deltas[path] = (d, dt)
  out = base_params
  for path, (d, adapter_dtype) in deltas.items():
    w = _get(base_params, path + ('kernel',))
    if tuple(w.shape) != tuple(d.shape):
      raise ValueError(f'adapter {path_str(path)} makes a {tuple(d.shape)} kernel but the base '
                       f'kernel is {tuple(w.shape)}: the LoRA belongs to another model')
    out_dtype = dtype or jnp.promote_types(w.dtype, adapter_dtype)
    out = _replace(out, path + ('kernel',),
                   (jnp.asarray(w, jnp.float32) + d).astype(out_dtype))
  return out


def merge(base_params, adapters, scale=1.0, alpha=None):
  """Fuses the adapters into the base, in float32, cast back to each base kernel's dtype."""
  return _apply_in_base_dtype(base_params, adapters, scale, alpha)


def unmerge(merged_params, adapters, scale=1.0, alpha=None):
  """Undoes `merge` (subtracts the same delta): the base again up to rounding."""
  return _apply_in_base_dtype(merged_params, adapters, -scale, alpha)


def _apply_in_base_dtype(base_params, adapters, scale, alpha):
  out = apply(base_params, adapters, scale, alpha, dtype=jnp.float32)
  return jax.tree.map(lambda new, old: new.astype(old.dtype), out, base_params)


def intercept(adapters, scale=1.0, alpha=None, dropout=0.0, rng=None):
  """A context in which Linen Dense/Conv layers add their adapter branch to their output.

  `y = base(x) + scale * (alpha / r) * up(down(dropout(x)))`, PEFT's order of operations: exact
  for dropout > 0 and computed in the layer's compute dtype. Use it inside the function you jit
  (it acts while tracing), around `module.apply({'params': base}, ...)` of the network at the root.

  Args:
    adapters, scale, alpha: as for `apply` (several LoRAs allowed).
    dropout: the probability of zeroing an adapter input element.
    rng: a PRNG key, required with dropout > 0 (folded with each module's path).

  Returns:
    A context manager (`flax.linen.intercept_methods`).
  """
  if dropout > 0 and rng is None:
    raise ValueError('LoRA dropout > 0 needs an rng key: intercept(..., dropout=p, rng=key)')
  entries = _entries(adapters, scale, alpha)

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name != '__call__' or not isinstance(mod, (nn.Dense, nn.Conv)):
      return y
    path = tuple(mod.path)
    hits = [(m[path], s, al) for m, s, al in entries if path in m]
    if not hits:
      return y
    x = args[0] if args else kwargs['inputs']
    if dropout > 0:
      key = jax.random.fold_in(rng, zlib.crc32(path_str(path).encode()))
      keep = jax.random.bernoulli(key, 1.0 - dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
    for adapter, s, al in hits:
      r = rank_of(adapter)
      y = y + (s * alpha_for(al, path, r) / r) * _branch(mod, x, adapter).astype(y.dtype)
    return y

  return nn.intercept_methods(interceptor)


def _branch(mod, x, adapter):
  """up(down(x)) in the layer's compute dtype, with a Conv's stride, padding and dilation."""
  dt = mod.dtype or jnp.result_type(x.dtype, adapter['down'].dtype)
  x, down, up = (jnp.asarray(v, dt) for v in (x, adapter['down'], adapter['up']))
  if down.ndim == 2:
    return (x @ down) @ up
  pair = lambda v: (1, 1) if v is None else ((v, v) if isinstance(v, int) else tuple(v))
  padding = mod.padding
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f'LoRA on a Conv with padding {padding!r} is not supported')
  elif isinstance(padding, int):
    padding = ((padding, padding),) * 2
  else:
    padding = tuple(pair(p) for p in padding)
  h = jax.lax.conv_general_dilated(
      x, down, window_strides=pair(mod.strides), padding=padding,
      rhs_dilation=pair(mod.kernel_dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return h @ up


def prepare(base_params, adapters, scale=1.0, alpha=None, dropout=0.0, rng=None):
  """The params and context for one forward: merged (`apply`) without dropout, else the base
  params with `intercept`. Use: `params, ctx = prepare(...); with ctx: module.apply(...)`."""
  if dropout > 0:
    return base_params, intercept(adapters, scale, alpha, dropout, rng)
  return apply(base_params, adapters, scale, alpha), contextlib.nullcontext()


def _get(tree, path):
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, dict) or k not in node:
      raise KeyError(f'the base tree has no {path_str(path[:i + 1])}: the adapter '
                     f'{path_str(path[:-1])} belongs to another model')
    node = node[k]
  return node


def _set(tree, path, value):
  node = tree
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = value


def _replace(tree, path, value):
  """A copy of `tree` (copying only the dicts along `path`) with `value` at `path`."""
  if not path:
    return value
  out = dict(tree)
  out[path[0]] = _replace(tree[path[0]], path[1:], value)
  return out
