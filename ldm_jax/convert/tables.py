"""The PyTorch state-dict <-> Flax parameter-tree mapping: the key table and the named transforms.

A Flax path mirrors a diffusers/transformers key with list indices folded into the name
(`down_blocks.0.resnets.1.conv1.weight` <-> `down_blocks_0/resnets_1/conv1/kernel`); the leaf is
renamed and re-laid-out by a table keyed on the Flax leaf name and rank. Loading checks every
key both ways and reports all problems in one error; nothing is half-loaded.
"""

import re

import jax
import numpy as np

# Module lists in diffusers/transformers: `name.<i>` in PyTorch is `name_<i>` in Flax. Names such
# as `linear_1` or `layer_norm1` are ordinary attributes and keep their underscore.
LIST_MODULES = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers',
                'upsamplers', 'transformer_blocks', 'net', 'to_out', 'layers')
_LIST_RE = re.compile(r'^(%s)_(\d+)$' % '|'.join(LIST_MODULES))


def conv_oihw_to_hwio(w):
  return np.transpose(w, (2, 3, 1, 0))


def conv_hwio_to_oihw(w):
  return np.transpose(w, (3, 2, 0, 1))


def linear_t(w):
  return np.transpose(w)


def squeeze_1x1_linear_t(w):
  """A 1x1 conv weight (O, I, 1, 1) used as a linear layer (LDM's VAE attention)."""
  return np.transpose(w[:, :, 0, 0])


def identity(w):
  return w


# (Flax leaf name, rank) -> (PyTorch leaf name, to_flax, to_torch).
LEAF_TABLE = {
    ('kernel', 4): ('weight', conv_oihw_to_hwio, conv_hwio_to_oihw),
    ('kernel', 2): ('weight', linear_t, linear_t),
    ('scale', 1): ('weight', identity, identity),
    ('bias', 1): ('bias', identity, identity),
    ('embedding', 2): ('weight', identity, identity),
}


class WeightsMismatchError(ValueError):
  """A state dict that does not fit the model; the message lists every offending key."""


def torch_key(path):
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight'."""
  *modules, leaf = path
  parts = [_LIST_RE.sub(r'\1.\2', m) for m in modules]
  return '.'.join(parts + [_leaf_rule(path, None)[0]])


def _leaf_rule(path, rank):
  leaf = path[-1]
  candidates = [k for k in LEAF_TABLE if k[0] == leaf and (rank is None or k[1] == rank)]
  if not candidates:
    raise KeyError(f'no conversion rule for parameter {"/".join(path)} of rank {rank}')
  return LEAF_TABLE[candidates[0]]


def _flatten(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat):
  tree = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def to_flax(state, abstract, *, name, dtype=None):
  """Maps a PyTorch-layout state dict onto a parameter tree.

  Args:
    state: {torch key: numpy array}, already normalised (aliases renamed, buffers dropped).
    abstract: the model's parameter tree of `jax.ShapeDtypeStruct` (`build.abstract_params`).
    name: the component's name for error messages ('unet', 'vae', ...).
    dtype: the parameters' storage dtype (default: the abstract tree's).

  Returns:
    The parameter tree of numpy arrays.

  Raises:
    WeightsMismatchError: listing every missing, unexpected and mis-shaped key.
  """
  missing, mis_shaped, out, used = [], [], {}, set()
  for path, target in _flatten(abstract).items():
    key, rank = torch_key(path), len(target.shape)
    _, fwd, inv = _leaf_rule(path, rank)
    if key not in state:
      missing.append(key)
      continue
    used.add(key)
    value = np.asarray(state[key])
    if value.ndim == 4 and rank == 2 and value.shape[2:] == (1, 1):
      fwd = squeeze_1x1_linear_t  # a 1x1 conv stored where we use a linear layer
    elif value.ndim != rank:
      fwd = None
    if fwd is None or fwd(value).shape != tuple(target.shape):
      expected = inv(np.broadcast_to(np.zeros((), np.float32), target.shape)).shape
      mis_shaped.append(f'{key}: file has {tuple(value.shape)}, model expects {tuple(expected)}')
      continue
    out[path] = np.asarray(fwd(value), dtype=dtype or target.dtype)
  unexpected = sorted(set(state) - used)
  if missing or unexpected or mis_shaped:
    raise WeightsMismatchError(_report(name, missing, unexpected, mis_shaped, len(out)))
  return _unflatten(out)


def _report(name, missing, unexpected, mis_shaped, ok):
  lines = [f'{name}: the weights do not fit this model ({ok} keys matched). Check that the '
           f'config.json beside the weights describes them, and that they belong to this component.']
  for title, keys in (('missing', missing), ('unexpected', unexpected), ('mis-shaped', mis_shaped)):
    if keys:
      lines.append(f'  {len(keys)} {title}:')
      lines.extend(f'    {k}' for k in keys)
  return '\n'.join(lines)


def to_torch(params):
  """The inverse: {torch key: float32 numpy array} in PyTorch layout, ready for safetensors."""
  state = {}
  for path, value in _flatten(params).items():
    _, _, inv = _leaf_rule(path, np.ndim(value))
    state[torch_key(path)] = np.ascontiguousarray(inv(np.asarray(value, np.float32)))
  return state
