"""FID Inception weights in: `pt_inception-2015-12-05-6726825d.pth` (or safetensors) -> Flax params.

The file pytorch-fid and torch-fidelity download is a PyTorch state dict with torchvision's
Inception-v3 names (`Mixed_6b.branch7x7_2.conv.weight`, `...bn.running_var`, `fc.weight`). The
release predates torch 1.6, whose `torch.save` writes zips, so it may be in the legacy (non-zip)
format: besides zips (`ckpt.load`) and safetensors this module reads that one, through the same
allow-list unpickler: nothing in the file is executed and torch is never imported.

The key table maps each Flax leaf, by its name and rank, to the torch key's last part and a
named transform; the module path is the same on both sides.
"""

import os
import pickle

import numpy as np
from safetensors import numpy as st_numpy

from ldm_jax.convert import ckpt
from ldm_jax.convert import diffusers as diffusers_lib
from ldm_jax.convert import tables
from ldm_jax.models import inception

# (Flax leaf name, rank) -> (PyTorch leaf name, transform to Flax layout).
LEAF_TABLE = {
    ('kernel', 4): ('weight', tables.conv_oihw_to_hwio),  # Conv2d (O, I, kh, kw) -> (kh, kw, I, O)
    ('kernel', 2): ('weight', tables.linear_t),  # fc (1008, 2048) -> (2048, 1008)
    ('scale', 1): ('weight', tables.identity),  # BatchNorm2d gamma
    ('bias', 1): ('bias', tables.identity),  # BatchNorm2d beta, fc bias
    ('mean', 1): ('running_mean', tables.identity),
    ('var', 1): ('running_var', tables.identity),
}
# Buffers of a state dict that carry no weights (saved by torch >= 0.4.1 beside each BatchNorm).
IGNORED_SUFFIXES = ('.num_batches_tracked',)
_LEGACY_PROTOCOL = 1001  # torch's legacy serialization: magic, protocol, sys_info, then the data


def key_table(abstract):
  """{torch key: (Flax path, transform)} for every leaf of the (abstract) parameter tree."""
  table = {}
  for path, leaf in tables._flatten(abstract).items():  # pylint: disable=protected-access
    rule = LEAF_TABLE.get((path[-1], len(leaf.shape)))
    if rule is None:
      raise KeyError(f'no conversion rule for parameter {"/".join(path)} of rank '
                     f'{len(leaf.shape)}')
    table['.'.join(path[:-1] + (rule[0],))] = (path, rule[1])
  return table


def to_flax(state, abstract, dtype=None):
  """Maps a FID Inception state dict onto the parameter tree.

  Args:
    state: {torch key: numpy array}, as `read_state_dict` returns it.
    abstract: `inception.abstract_params(module)`.
    dtype: the parameters' storage dtype (default: the abstract tree's).

  Returns:
    The parameter tree of numpy arrays.

  Raises:
    tables.WeightsMismatchError: listing every missing, unexpected and mis-shaped key.
  """
  flat, missing, mis_shaped = {}, [], []
  targets = tables._flatten(abstract)  # pylint: disable=protected-access
  table = key_table(abstract)
  for key, (path, transform) in table.items():
    if key not in state:
      missing.append(key)
      continue
    value, target = np.asarray(state[key]), targets[path]
    if value.ndim != len(target.shape) or transform(value).shape != tuple(target.shape):
      mis_shaped.append(f'{key}: file has {tuple(value.shape)}, the FID Inception expects '
                        f'{tuple(target.shape)} in Flax layout')
      continue
    flat[path] = np.asarray(transform(value), dtype=dtype or target.dtype)
  unexpected = sorted(k for k in state if k not in table and not k.endswith(IGNORED_SUFFIXES))
  if missing or unexpected or mis_shaped:
    lines = [f'FID Inception: the weights do not fit the network ({len(flat)} of {len(table)} '
             'keys matched). Expected the state dict of pt_inception-2015-12-05-6726825d.pth '
             '(pytorch-fid / torch-fidelity); a torchvision Inception-v3 (1000 classes, '
             'AuxLogits) is a different network.']
    for title, keys in (('missing', missing), ('unexpected', unexpected),
                        ('mis-shaped', mis_shaped)):
      if keys:
        lines.append(f'  {len(keys)} {title}:')
        lines.extend(f'    {k}' for k in keys)
    raise tables.WeightsMismatchError('\n'.join(lines))
  return tables._unflatten(flat)  # pylint: disable=protected-access


def read_state_dict(path):
  """{key: numpy array} from a `.safetensors` file or a `torch.save` file (zip or legacy).

  Raises:
    ckpt.UnsafePickleError: the pickle names anything but tensor storage (nothing executed).
    diffusers.ConversionError: no such file, or not a state dict of tensors.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise diffusers_lib.ConversionError(
        f'FID Inception weights {path} do not exist. Download pt_inception-2015-12-05-6726825d.pth'
        ' (the pytorch-fid / torch-fidelity release) where there is a network and pass its path.')
  if path.endswith('.safetensors'):
    state = st_numpy.load_file(path)
  else:
    magic = ckpt._LEGACY_MAGIC  # pylint: disable=protected-access
    with open(path, 'rb') as f:
      legacy = f.read(len(magic)) == magic
    state = _legacy_load(path) if legacy else ckpt.load(path)
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict) or not all(isinstance(v, np.ndarray) for v in state.values()):
    raise diffusers_lib.ConversionError(f'{path} holds no state dict of tensors (found '
                                        f'{type(state).__name__})')
  return dict(state)


def load(path, module=None, dtype=None):
  """FID Inception parameters from a weights file.

  Args:
    path: `pt_inception-2015-12-05-6726825d.pth` (torch-fidelity's
      `weights-inception-2015-12-05-6726825d.pth` is the same file), or a safetensors file with
      the same keys.
    module: the `inception.FIDInceptionV3` to load into (default: float32).
    dtype: the parameters' storage dtype (default: the module's param_dtype).

  Returns:
    The parameter tree of numpy arrays, for `module.apply({'params': params}, x)`.
  """
  module = module or inception.FIDInceptionV3(inception.InceptionConfig.fid())
  return to_flax(read_state_dict(path), inception.abstract_params(module), dtype)


class _LegacyUnpickler(ckpt._Unpickler):  # pylint: disable=protected-access
  """The allow-list unpickler over a legacy file: storages are filled in after the pickle.

  The legacy format writes the object pickle first and the raw storages after it, so the object
  tree is read twice: once with zero-filled storages (to learn each storage's dtype and size and
  where the raw data start), once with the real ones.
  """

  def __init__(self, file, path, storages=None):
    pickle.Unpickler.__init__(self, file)  # pylint: disable=non-parent-init-called
    self._path, self.storages, self.specs = path, storages, {}

  def persistent_load(self, pid):
    storage_type = ckpt._StorageType  # pylint: disable=protected-access
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == 'storage'
            and isinstance(pid[1], storage_type) and isinstance(pid[2], str)
            and isinstance(pid[4], int) and pid[5] is None):
      raise ckpt.UnsafePickleError(f'{self._path}: refused: an unknown or view storage reference '
                                   f'{pid!r:.80}')
    _, kind, key, _, numel, _ = pid
    self.specs[key] = (kind.dtype, numel)
    if self.storages is None:
      return np.zeros(numel, kind.dtype)
    return self.storages[key]


def _legacy_load(path):
  """Reads a legacy (torch < 1.6) `torch.save` file of tensors; see `_LegacyUnpickler`."""
  try:
    with open(path, 'rb') as f:
      header = [_load_plain(f) for _ in range(3)]  # magic number, protocol version, sys info
      if header[1] != _LEGACY_PROTOCOL:
        raise diffusers_lib.ConversionError(f'{path}: legacy torch protocol {header[1]!r}, '
                                            f'{_LEGACY_PROTOCOL} expected')
      sys_info = header[2] if isinstance(header[2], dict) else {}
      order = '<' if sys_info.get('little_endian', True) else '>'
      start = f.tell()
      first = _LegacyUnpickler(f, path)
      first.load()
      keys = _load_plain(f)
      storages = {}
      for key in keys:
        dtype, numel = first.specs[key]
        size = int(np.frombuffer(f.read(8), order + 'i8')[0])
        raw = f.read(size * dtype.itemsize)
        if size != numel or len(raw) != size * dtype.itemsize:
          raise diffusers_lib.ConversionError(f'{path}: storage {key} is truncated')
        storages[key] = np.frombuffer(raw, dtype.newbyteorder(order)).astype(dtype)
      f.seek(start)
      return _LegacyUnpickler(f, path, storages).load()
  except diffusers_lib.ConversionError:
    raise
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
          KeyError) as e:
    raise diffusers_lib.ConversionError(f'{path}: not a readable legacy torch file '
                                        f'({type(e).__name__}: {e})') from e


def _load_plain(f):
  """A header pickle of plain values (numbers, strings, lists, dicts): no global is allowed."""
  return _PlainUnpickler(f).load()


class _PlainUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    raise ckpt.UnsafePickleError(f'refused: a legacy torch header references {module}.{name}')
